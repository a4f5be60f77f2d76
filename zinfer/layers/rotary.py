"""Rotary position embeddings (RoPE) with the Hugging Face scaling variants.

`rope_parameters(config)` turns a transformers 4 or 5 config into one flat dict; `RotaryEmbedding`
turns positions into cos/sin tables; `apply_rotary` rotates q or k with them ("rotate_half" layout:
the first half of the rotary dims pairs with the second half, as in HF Llama checkpoints).

Frequencies follow `transformers.modeling_rope_utils` (5.x), computed in float32 on the CPU like
HF's init, so cos/sin match a transformers model loaded the usual way.

Meta device: the buffers are non-persistent (not in the state dict) and are functions of the config, so
the module recomputes them whenever it is moved or cast. A model built on `meta` and loaded with
`load_state_dict(..., assign=True)` can simply be moved with `.to(device)`; `to_empty(device=...)` also
yields correct values. To place them explicitly, call `init_buffers(device)`; `reset_parameters()`
recomputes on the buffers' current device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")

# Types whose pretraining length lives in `original_max_position_embeddings` (transformers fills it in).
_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")


def _check_type(rope_type: str) -> None:
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def rope_parameters(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """Flat RoPE dict from a HF config: `rope_type`, `rope_theta`, `partial_rotary_factor`, scaling keys.

    transformers 5 keeps everything in `config.rope_parameters` (nested per layer type for some models:
    pass `layer_type`); transformers 4 has `config.rope_theta` plus an optional `config.rope_scaling`
    whose type key may be the legacy `type`.
    """
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if layer_type is not None:
        rope = rope[layer_type]
    out = dict(rope)
    rope_type = out.pop("type", None)
    out["rope_type"] = out.get("rope_type") or rope_type or "default"
    if out["rope_type"] == "su":  # early Phi-3 checkpoints name longrope "su"
        out["rope_type"] = "longrope"
    if out.get("rope_theta") is None:
        # GPT-NeoX-style 4.x configs call the base `rotary_emb_base`
        theta = getattr(config, "rope_theta", None) or getattr(config, "rotary_emb_base", None)
        out["rope_theta"] = float(theta or 10000.0)
    if out.get("partial_rotary_factor") is None:
        prf = getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None)
        out["partial_rotary_factor"] = float(prf or 1.0)
    if out["rope_type"] in _NEEDS_ORIGINAL_MAX:
        # Phi-3 keeps the pretraining length at the top level; transformers gives that one priority
        top = getattr(config, "original_max_position_embeddings", None)
        if top is not None:
            out["original_max_position_embeddings"] = top
        out.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return out


def _exponents(dim: int) -> torch.Tensor:
    # [dim/2] float32: 2i / dim, the RoPE exponent of pair i
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** _exponents(dim))


def _llama3_inv_freq(rope: dict, dim: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(rope["rope_theta"], dim)
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (> old_len / lo) are interpolated by `factor`, short ones (< old_len / hi) kept,
    # and the band between blends the two linearly in old_len / wavelen.
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: dict, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    base = rope["rope_theta"]
    orig = rope["original_max_position_embeddings"]
    # DeepSeek-V3-style configs omit `factor`: the context extension ratio stands in for it
    factor = rope.get("factor") or max_pos / orig
    attn = rope.get("attention_factor")
    if attn is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attn = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attn = _yarn_mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the pretraining length
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    # ramp: 0 for pairs below `low` (extrapolate: keep original freq), 1 above `high` (interpolate)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** _exponents(dim)
    extrapolate = 1 - ramp  # written as transformers does: (1 - extrapolate) is not bit-equal to ramp
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolate) + 1.0 / pos_freqs * extrapolate
    return inv_freq, float(attn)


def _longrope_attention_factor(rope: dict, max_pos: int) -> float:
    orig = rope["original_max_position_embeddings"]
    # Phi-3 configs omit `factor`: the context extension ratio stands in for it
    factor = rope.get("factor") or max_pos / orig
    attn = rope.get("attention_factor")
    if attn is not None:
        return float(attn)
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def _longrope_inv_freq(rope: dict, dim: int, which: str) -> torch.Tensor:
    ext = torch.tensor(rope[which], dtype=torch.float32)  # [dim/2] per-pair stretch
    return 1.0 / (ext * rope["rope_theta"] ** _exponents(dim))


class RotaryEmbedding(nn.Module):
    """positions [B, S] -> (cos, sin), each float32 [B, S, rot_dim], already times `attention_scaling`.

    rot_dim = int(head_dim * partial_rotary_factor). Data-dependent choices run on the device, with no
    host sync, and are written into the buffers in place (CUDA-graph safe):
      * dynamic: `cached_len` tracks the largest seq_len (max position + 1 over the batch) seen; frequencies
        are NTK-rescaled for it once it exceeds `max_position_embeddings`, and reset to the originals when a
        batch is shorter than that again (transformers' grow/reset rule).
      * longrope: long factors when seq_len > original_max_position_embeddings, else short factors.
    `inv_freq` always holds the frequencies the last forward used. Moving or casting the module
    recomputes the buffers, which also resets the dynamic state.
    """

    def __init__(self, head_dim: int, rope: dict, max_position_embeddings: int, device=None):
        super().__init__()
        self.rope_type = rope.get("rope_type", "default")
        _check_type(self.rope_type)
        self.rope = dict(rope)
        self.head_dim = head_dim
        self.rot_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        self.max_position_embeddings = max_position_embeddings
        self.original_max = rope.get("original_max_position_embeddings", max_position_embeddings)
        self.attention_scaling = 1.0
        if self.rope_type == "yarn":
            self.attention_scaling = _yarn(self.rope, self.rot_dim, max_position_embeddings)[1]
        elif self.rope_type == "longrope":
            self.attention_scaling = _longrope_attention_factor(self.rope, max_position_embeddings)
        self.init_buffers(device)

    def _cpu_buffers(self) -> dict[str, torch.Tensor]:
        r, dim, t = self.rope, self.rot_dim, self.rope_type
        if t == "longrope":
            short = _longrope_inv_freq(r, dim, "short_factor")
            return {
                "inv_freq": short,
                "short_inv_freq": short.clone(),
                "long_inv_freq": _longrope_inv_freq(r, dim, "long_factor"),
            }
        if t == "dynamic":
            base = _base_inv_freq(r["rope_theta"], dim)
            return {
                "inv_freq": base,
                "original_inv_freq": base.clone(),
                "cached_len": torch.tensor(self.max_position_embeddings, dtype=torch.int64),
            }
        if t == "linear":
            return {"inv_freq": _base_inv_freq(r["rope_theta"], dim) / r["factor"]}
        if t == "llama3":
            return {"inv_freq": _llama3_inv_freq(r, dim)}
        if t == "yarn":
            return {"inv_freq": _yarn(r, dim, self.max_position_embeddings)[0]}
        return {"inv_freq": _base_inv_freq(r["rope_theta"], dim)}

    @torch.no_grad()
    def init_buffers(self, device=None) -> None:
        """(Re)compute all buffers on `device` (default: the current default device, e.g. `meta` inside
        `with torch.device("meta")`). Values are computed on the CPU in float32, then moved."""
        device = torch.get_default_device() if device is None else torch.device(device)
        with torch.device("cpu"):
            bufs = self._cpu_buffers()
        for name, value in bufs.items():
            self.register_buffer(name, value.to(device), persistent=False)

    def reset_parameters(self) -> None:
        """Recompute buffers on their current device (the `to_empty` + `reset_parameters` convention)."""
        self.init_buffers(self.inv_freq.device)

    def _apply(self, fn, recurse=True):
        # Every buffer is a function of the config, so rather than converting values, find where `fn` sends
        # a tensor and recompute there. This lets `.to(device)` leave `meta` (Tensor.to refuses: no data),
        # leaves no garbage after `to_empty`, and keeps float32 under `model.to(torch.bfloat16)`.
        # The module has no parameters or children, so nothing else needs `fn`.
        try:
            device = fn(torch.empty(0, device=self.inv_freq.device)).device
        except NotImplementedError:  # moving off meta: a CPU probe tells the destination
            device = fn(torch.empty(0)).device
        self.init_buffers(device)
        return self

    def _ntk_inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        # seq_len: 0-d int64 on device; float32 arithmetic in transformers' order so values match bit for bit
        r, dim, max_pos = self.rope, self.rot_dim, self.max_position_embeddings
        factor = r["factor"]
        seq_len = torch.clamp(seq_len, min=max_pos)
        base = r["rope_theta"] * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exps = torch.arange(0, dim, 2, dtype=torch.int64, device=seq_len.device).float() / dim
        return 1.0 / (base**exps)

    @torch.no_grad()
    def _update_inv_freq(self, positions: torch.Tensor) -> None:
        seq_len = positions.max() + 1  # 0-d, stays on device: no host sync
        if self.rope_type == "dynamic":
            limit, cached = self.max_position_embeddings, self.cached_len
            reset = (seq_len < limit) & (cached > limit)
            cached_new = torch.where(reset, limit, torch.maximum(cached, seq_len))
            self.cached_len.copy_(cached_new)
            scaled = self._ntk_inv_freq(cached_new)
            self.inv_freq.copy_(torch.where(cached_new > limit, scaled, self.original_inv_freq))
        else:  # longrope
            long = seq_len > self.original_max
            self.inv_freq.copy_(torch.where(long, self.long_inv_freq, self.short_inv_freq))

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, S] int64 -> cos, sin: [B, S, rot_dim] float32
        if self.rope_type in ("dynamic", "longrope"):
            self._update_inv_freq(positions)
        freqs = positions[..., None].float() * self.inv_freq.float()  # [B, S, rot_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate_half layout: both halves share a frequency
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin

    def extra_repr(self) -> str:
        return (
            f"rope_type={self.rope_type!r}, rot_dim={self.rot_dim}, head_dim={self.head_dim}, "
            f"attention_scaling={self.attention_scaling:.4f}"
        )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim = cos.shape[-1] dims of x; the rest (partial rotary) pass through.

    x: [B, H, S, D]; cos, sin: [B, S, rot_dim]. The math runs in the promoted dtype (float32 for
    float32 tables) and the result is cast back to x.dtype.
    """
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, rot]: broadcast over heads
    xr = x[..., :rot]
    x1, x2 = xr.chunk(2, dim=-1)
    out = (xr * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)
