"""Attention over the KV cache, shared by every model family.

Two paths: prefill (many queries) uses PyTorch's fused `scaled_dot_product_attention`
(flash when the batch has no padding); decode (one query per row) reads each cached key/value
once for the query heads that share it: two batched matmuls over the grouped heads, or (opt-in,
ZINFER_DECODE_ATTENTION=fused) one Triton kernel on a CUDA fp16/bf16 cache without an additive
bias (triton_attention.py); both are CUDA-graph friendly.
A cache attended on the CPU may ask for the same math written as multiply-and-sum and compiled
(`compiled_reduction`): see `decode_attention`.
"""

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zinfer.layers.gemv import MODE as GEMV_MODE


def parse_decode(value: str | None) -> str:
    v = (value or "matmul").strip().lower()
    if v not in ("fused", "matmul"):
        raise ValueError(f"ZINFER_DECODE_ATTENTION must be fused or matmul, got {value!r}")
    return v


# ZINFER_DECODE_ATTENTION (read once at import): matmul (default: the batched matmuls) or fused (the Triton kernel
# where it applies; CPU-tested under Triton's interpreter and built for sm_90, not yet run or timed on a GPU: the
# default stays until it is measured). ZINFER_GEMV=off, the cuBLAS-only baseline, keeps it off.
FUSED_DECODE = (parse_decode(os.environ.get("ZINFER_DECODE_ATTENTION")) == "fused" and GEMV_MODE != "off"
                and importlib.util.find_spec("triton") is not None)  # fmt: skip


@dataclass
class AttentionInputs:
    """What one forward pass needs to know about the batch; built once per step by the runtime."""

    positions: torch.Tensor  # [B, S] token positions (rotary / learned embeddings); pads hold 0
    slots: torch.Tensor  # [S] cache slots this step writes (shared by all rows: left padding)
    kv_len: int  # keys in slots [0, kv_len) are read
    mask: torch.Tensor | None  # [B, 1, S, kv_len] bool, True = may attend; None = plain causal, no padding
    key_positions: torch.Tensor | None = None  # [B, kv_len] positions of cached keys (ALiBi)


class CachedAttention(nn.Module):
    """Attention of q over the cache after writing k, v. No parameters: projections live in the model."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = (
            layer_idx, num_heads, num_kv_heads, head_dim)
        self.scale = scale if scale is not None else head_dim ** -0.5

    def forward(self, q, k, v, cache, inp: AttentionInputs, bias: torch.Tensor | None = None):
        # q: [B, H, S, D]; k, v: [B, H_kv, S, D]; bias: [B or 1, H, 1, kv_len] additive (ALiBi)
        if q.shape[2] == 1:  # the cache stores k, v and runs the math where its keys live (device or host)
            out = cache.attend(self.layer_idx, q, k, v, inp, bias, self._decode)
            b, h, s, d = out.shape
            return out.transpose(1, 2).reshape(b, s, h * d)
        keys, values = cache.write(self.layer_idx, k, v, inp.slots, inp.kv_len)
        if inp.mask is None and bias is None:
            # no padding and nothing cached before: flash attention on this step's own k, v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        else:
            mask = inp.mask
            if mask is None:  # unpadded prefill of an ALiBi model: plain causal
                mask = torch.ones(q.shape[2], inp.kv_len, dtype=torch.bool, device=q.device).tril()
            if bias is not None:
                mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
            group = self.num_heads // self.num_kv_heads
            if group > 1:  # the masked fused kernels take equal head counts
                keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        b, h, s, d = out.shape
        return out.transpose(1, 2).reshape(b, s, h * d)

    def _decode(self, q, keys, values, mask, bias, compiled_reduction: bool = False):
        if compiled_reduction:
            return _compiled_decode()(q, keys, values, mask, bias, self.scale, self.num_kv_heads, reduce=True)
        return decode_attention(q, keys, values, mask, bias, self.scale, self.num_kv_heads)


def decode_attention(q, keys, values, mask, bias, scale: float, kv_heads: int, reduce: bool = False):
    """One query per row over its cached keys and values.

    q: [B, H, 1, D] -> [B, H_kv, G, D] so each cached head is read once for its G query heads. keys, values:
    [B, H_kv, T, D] (any strides), mask: [B, 1, 1, T], bias: [B or 1, H, 1, T], all on one device: the compute
    device, or the host for a CPU-attended offloaded cache.
    reduce: the two products as multiply-and-sum in fp32 instead of matmuls (fp32 out). Eagerly that would
    materialise [B, H_kv, G, T, D]; compiled for the CPU (`_compiled_decode`) it is one vectorised pass over the
    keys and one over the values, reading a half-precision cache as it lies, where a batched matmul of one
    query row is slow on the CPU and half-precision matmuls first need an fp32 copy of the cache.
    """
    if FUSED_DECODE and q.is_cuda and bias is None and not reduce and _fusable(q, keys, values, kv_heads):
        return fused_decode_attention(q, keys, values, mask, scale, kv_heads)
    b, h, _, d = q.shape
    g = h // kv_heads
    qg = q.view(b, kv_heads, g, d)
    if reduce:
        scores = (qg.float().unsqueeze(-2) * keys.float().unsqueeze(2)).sum(-1) * scale  # [B, H_kv, G, T]
    else:
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale
    if bias is not None:
        scores = scores + bias.float().view(bias.shape[0], kv_heads, g, -1)
    if mask is not None:  # None: a one-token unpadded prompt, which sees only itself
        scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    probs = scores.softmax(-1)
    if reduce:
        return (probs.unsqueeze(-1) * values.float().unsqueeze(2)).sum(-2).view(b, h, 1, d)
    return torch.matmul(probs.to(values.dtype), values).view(b, h, 1, d)  # [B, H, 1, D]


@functools.cache
def _compiled_decode():
    # dynamic: the cached length grows every step and batches differ; one compile serves them (per dtype, and
    # per mask / bias present or not)
    return torch.compile(decode_attention, dynamic=True)


def _fusable(q, keys, values, kv_heads: int) -> bool:
    """Whether the fused kernel takes these operands: fp16/bf16 throughout, a power-of-two head size of at least 16
    (its tl.dot), unit stride along it."""
    d = q.shape[-1]
    return (q.dtype in (torch.float16, torch.bfloat16) and keys.dtype == q.dtype and values.dtype == q.dtype
            and keys.shape[-1] == d and values.shape[-1] == d and d >= 16 and d & (d - 1) == 0
            and q.stride(-1) == 1 and keys.stride(-1) == 1 and values.stride(-1) == 1)  # fmt: skip


# one opaque operator for torch.compile, as the skinny matmuls (gemv.py): dynamo does not trace the launch code
@torch.library.custom_op("zinfer::decode_attention", mutates_args=())
def fused_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                           scale: float, kv_heads: int) -> torch.Tensor:
    from zinfer.layers import triton_attention

    return triton_attention.decode_attention(q, keys, values, mask, scale, kv_heads)


@fused_decode_attention.register_fake
def _(q, keys, values, mask, scale, kv_heads):
    return q.new_empty(q.shape)
