"""Read llama.cpp GGUF files: a Hugging Face config, HF-named fp32 tensors, and a converter to an HF dir.

Only the `llama` architecture (Llama 1/2/3-style checkpoints such as SmolLM2) is supported. Tensors are
dequantized one at a time with `gguf.quants.dequantize`, so at most one fp32 tensor is alive per step.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF key suffix (after "<arch>.") -> HF config key.
_CONFIG_KEYS = {
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}
_TOKEN_ID_KEYS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "padding_token_id",
}
_DEFAULTS = {"rope_theta": 10000.0, "max_position_embeddings": 2048}

# GGUF tensor names -> HF names; "{i}" is the block index.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _float32_value(x: float) -> float:
    # GGUF stores floats as f32: 1e-5 reads back as 9.999999747e-06. Keep the shortest decimal
    # that round-trips through f32, which is the value the original config.json had.
    return float(str(np.float32(x)))


def _architecture(reader: GGUFReader, path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {str(path)!r} has architecture {arch!r}; zinfer reads only {list(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _config_from_reader(reader: GGUFReader, path) -> dict:
    arch = _architecture(reader, path)
    cfg: dict = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    for suffix, hf_key in _CONFIG_KEYS.items():
        value = _field(reader, f"{arch}.{suffix}", _DEFAULTS.get(hf_key))
        if value is not None:
            cfg[hf_key] = value
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in cfg]
    if missing:
        raise ValueError(f"GGUF file {str(path)!r} lacks the {arch} metadata for {missing}")
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("intermediate_size", 4 * cfg["hidden_size"])
    cfg.setdefault("rms_norm_eps", 1e-5)
    if "vocab_size" not in cfg:  # optional key; token_embd's GGUF shape is [hidden, vocab]
        cfg["vocab_size"] = next((int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), None)
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":  # only default rope is read; a scaled one would silently give wrong outputs
        raise ValueError(f"GGUF file {str(path)!r} uses rope scaling {scaling!r}; zinfer reads only default rope")
    cfg["rms_norm_eps"] = _float32_value(cfg["rms_norm_eps"])
    cfg["rope_theta"] = _float32_value(cfg["rope_theta"])
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    # llama.cpp writes key_length only when head_dim != hidden / heads; rope.dimension_count is the full
    # head dim for llama (no partial rotary).
    cfg["head_dim"] = _field(
        reader,
        f"{arch}.attention.key_length",
        _field(reader, f"{arch}.rope.dimension_count", cfg["hidden_size"] // cfg["num_attention_heads"]),
    )
    cfg["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    cfg.update(hidden_act="silu", attention_bias=False, mlp_bias=False)
    for hf_key, gguf_key in _TOKEN_ID_KEYS.items():
        cfg[hf_key] = _field(reader, f"tokenizer.ggml.{gguf_key}")
    return cfg


def read_gguf_config(path) -> dict:
    """The Hugging Face `config.json` dict of a llama GGUF file; ValueError for other architectures."""
    return _config_from_reader(GGUFReader(path), path)


@dataclass(frozen=True)
class _TensorSpec:
    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # HF order: [out, in] for matrices
    rope_heads: int  # >0: rows were permuted by llama.cpp for its rope layout, over this many heads


def _block_part(gguf_name: str) -> tuple[str, str] | None:
    # "blk.7.attn_q.weight" -> ("7", "attn_q.weight")
    prefix, _, rest = gguf_name.partition(".")
    index, _, suffix = rest.partition(".")
    return (index, suffix) if prefix == "blk" and index.isdigit() else None


def _hf_name(gguf_name: str, path) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    block = _block_part(gguf_name)
    if block is not None and block[1] in _BLOCK_NAMES:
        return f"model.layers.{block[0]}.{_BLOCK_NAMES[block[1]]}"
    # e.g. rope_freqs.weight (Llama 3.1 rope scaling) or MoE experts: loading without them would be wrong.
    raise ValueError(f"GGUF file {str(path)!r} has tensor {gguf_name!r}, which zinfer cannot map to llama")


def _tensor_specs(reader: GGUFReader, config: dict, path) -> list[_TensorSpec]:
    rope_heads = {
        "attn_q.weight": config["num_attention_heads"],
        "attn_k.weight": config["num_key_value_heads"],
    }
    specs = []
    for t in reader.tensors:
        # GGUF lists dims fastest-first (ne0 = in_features); HF wants [out, in].
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        block = _block_part(t.name)
        heads = rope_heads.get(block[1], 0) if block else 0
        specs.append(_TensorSpec(t.name, _hf_name(t.name, path), shape, heads))
    return specs


def _unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp's converter reorders each head's rows from HF's [half0 | half1] rotary layout to
    # interleaved pairs: rows (h, i, j) -> (h, j, i) with i in 2, j in head_dim/2. Invert it.
    out_features = w.shape[0]
    w = w.reshape(n_heads, out_features // n_heads // 2, 2, *w.shape[1:])  # [H, D/2, 2, in]
    return w.transpose(1, 2).reshape(out_features, *w.shape[3:])  # [H*2*D/2, in]


def _dequantize(reader: GGUFReader, index: int, spec: _TensorSpec) -> torch.Tensor:
    t = reader.tensors[index]
    array = dequantize(t.data, t.tensor_type)
    if not array.flags.writeable:  # F32 tensors come back as read-only views of the mmap
        array = array.copy()
    w = torch.from_numpy(array).reshape(spec.shape).float()
    return _unpermute_rope(w, spec.rope_heads) if spec.rope_heads else w


def _iter_reader(reader: GGUFReader, specs: list[_TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    for i, spec in enumerate(specs):
        yield spec.hf_name, _dequantize(reader, i, spec)


def iter_gguf_tensors(path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, fp32 tensor in HF shape)` one tensor at a time, Q/K rows back in HF order."""
    reader = GGUFReader(path)
    specs = _tensor_specs(reader, _config_from_reader(reader, path), path)
    yield from _iter_reader(reader, specs)


def _safetensors_header(specs: list[_TensorSpec], dtype: torch.dtype) -> bytes:
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        nbytes = itemsize * int(np.prod(spec.shape))
        header[spec.hf_name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned


def _write_safetensors(path: Path, tensors, specs: list[_TensorSpec], dtype: torch.dtype) -> None:
    # Streamed: the header is known from GGUF shapes, so each tensor is written as soon as it is
    # dequantized and never more than one lives in memory (safetensors' save_file needs them all).
    header = _safetensors_header(specs, dtype)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for (name, tensor), spec in zip(tensors, specs):
            assert name == spec.hf_name and tuple(tensor.shape) == spec.shape, (name, spec)
            f.write(tensor.to(dtype).contiguous().view(-1).view(torch.uint8).numpy())


def _save_tokenizer(gguf_path: Path, out_dir: Path, reader: GGUFReader) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _field(reader, "tokenizer.chat_template")
    tokenizer.save_pretrained(str(out_dir))


def convert_gguf_to_hf(gguf_path, out_dir, dtype: torch.dtype = torch.float32, progress: bool = True) -> Path:
    """Write `config.json`, tokenizer files and `model.safetensors` (in `dtype`) for a llama GGUF file."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} is not one of {list(_SAFETENSORS_DTYPES)}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(gguf_path)
    config = _config_from_reader(reader, gguf_path)
    specs = _tensor_specs(reader, config, gguf_path)  # fails on unknown tensors before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _save_tokenizer(gguf_path, out_dir, reader)
    show = progress and sys.stderr.isatty()
    bar = tqdm(_iter_reader(reader, specs), total=len(specs), desc=f"converting {gguf_path.name}", disable=not show)
    _write_safetensors(out_dir / "model.safetensors", bar, specs, dtype)
    return out_dir
