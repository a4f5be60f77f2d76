"""Bad input fails early with a message that says what is wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import zinfer
from helpers import make_checkpoint
from zinfer.errors import CheckpointError, InputError, ModelNotFoundError, UnsupportedModelError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", directory)
    return directory


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_unknown_model_type(tmp_path, ckpt):
    _copy(ckpt, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt_bigcode"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"'gpt_bigcode' is not supported; supported: bloom, llama"):
        zinfer.LLM(str(tmp_path), device="cpu")


def test_missing_tensor(tmp_path, ckpt):
    _copy(ckpt, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        zinfer.LLM(str(tmp_path), device="cpu")


def test_wrong_shape(tmp_path, ckpt):
    _copy(ckpt, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj.weight' has shape \(8, 64\), the model expects \(64, 64\)"):
        zinfer.LLM(str(tmp_path), device="cpu")


def test_truncated_safetensors(tmp_path, ckpt):
    _copy(ckpt, tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated safetensors file: tensors need \d+ bytes, file has \d+"):
        zinfer.LLM(str(tmp_path), device="cpu")


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        zinfer.LLM(str(tmp_path / "no-such-model"), device="cpu")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        zinfer.LLM(str(tmp_path), device="cpu")


def test_builtin_without_dummy():
    with pytest.raises(ModelNotFoundError, match="built-in config without weights: pass dummy=True"):
        zinfer.LLM("opt-125m", device="cpu").generate([[1, 2]])


@pytest.fixture(scope="module")
def llm(ckpt):
    return zinfer.LLM(str(ckpt), device="cpu")


def test_prompt_longer_than_context(llm):
    with pytest.raises(InputError, match="prompt 0 has 129 tokens, longer than the model's context of 128"):
        llm.generate([[3] * 129])


def test_prompt_filling_context_generates_what_fits(llm):
    out = llm.generate([[3] * 126], zinfer.SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_empty_prompt_list(llm):
    with pytest.raises(InputError, match="no prompts given"):
        llm.generate([])


def test_empty_prompt(llm):
    with pytest.raises(InputError, match="prompt 1 is empty"):
        llm.generate([[1, 2], []])


def test_string_prompt_without_tokenizer(llm):
    with pytest.raises(InputError, match="has no tokenizer"):
        llm.generate(["hello"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(temperature=-1.0), "temperature must be >= 0, got -1.0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_k=-2), "top_k must be >= 0, got -2"),
    (dict(min_new_tokens=9, max_new_tokens=4), r"min_new_tokens must be in \[0, max_new_tokens=4\], got 9"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(InputError, match=message):
        zinfer.SamplingParams(**kwargs)


def test_unknown_engine_option(ckpt):
    with pytest.raises(TypeError, match="unknown engine option\\(s\\): warp_speed"):
        zinfer.LLM(str(ckpt), device="cpu", warp_speed=9)
