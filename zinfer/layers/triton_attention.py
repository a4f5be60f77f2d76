"""Decode attention as one Triton kernel: one query per row over its cached keys and values.

attention.py's `decode_attention` sends a CUDA fp16/bf16 cache without an additive bias here. Unfused, decode
attention is three kernels a layer (q·K batched matmul, softmax, P·V batched matmul), each a few µs of mostly launch
and ramp at decode sizes (~7 µs a layer for Llama-3-8B at batch 1 on an H100, BENCHMARKS.md).

One program per (row, KV head, split of the keys) loads the KV head's G = H / H_kv query heads once (padded to 16 rows
for tl.dot), walks its keys in BLOCK_T tiles (loads software-pipelined) with an online softmax in fp32 (scores,
running max and sum), and accumulates P·V in fp32 from P rounded to the cache's dtype (the unfused form rounds the
normalised probabilities before its second matmul, this kernel the unnormalised ones: not bitwise the same, equal
within bf16 rounding). With one split the program writes the output; with several (long caches,
few heads: one SM per head would be slow) each writes its fp32 partial (max, sum, sum of P·V) and a second kernel
merges them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from zinfer.layers.triton_gemv import launch_options, sm_count, wait_previous

BLOCK_T = 64  # keys per tile
KEYS_PER_SPLIT = 256  # a split's keys, at least: a program streams several tiles


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stat_ptr,
    T, T_PER_SPLIT, scale,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_mb, stride_mt,
    stride_ob, stride_oh,
    KV_HEADS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # q [B, H, D] (H = KV_HEADS * G, unit stride on D); keys, values [B, KV_HEADS, T, D]; mask [B, T] (uint8, 1 =
    # may attend) when HAS_MASK; out [B, H, D]. SPLIT: part [B * KV_HEADS, S, GP, D] and stat [B * KV_HEADS, S, 2,
    # GP] (max, sum) fp32 instead of out.
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    b = pid // KV_HEADS
    h = pid % KV_HEADS
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    wait_previous(PDL)
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_g < G)[:, None], other=0.0)  # [GP, D]; padded rows are zeros
    b64, h64 = b.to(tl.int64), h.to(tl.int64)  # offsets in 64 bits: a long cache passes 2^31 elements
    k_rows = k_ptr + b64 * stride_kb + h64 * stride_kh
    v_rows = v_ptr + b64 * stride_vb + h64 * stride_vh
    t_start = sid * T_PER_SPLIT
    t_end = tl.minimum(t_start + T_PER_SPLIT, T)
    m_i = tl.full((GP,), -1e30, tl.float32)  # finite: a split whose keys are all masked stays NaN-free
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for t0 in tl.range(t_start, t_end, BLOCK_T, num_stages=NUM_STAGES):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        ok = offs_t < t_end
        k = tl.load(k_rows + offs_t[:, None] * stride_kt + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_rows + offs_t[:, None] * stride_vt + offs_d[None, :], mask=ok[:, None], other=0.0)
        if HAS_MASK:
            ok = ok & (tl.load(mask_ptr + b * stride_mb + offs_t * stride_mt, mask=ok, other=0) != 0)
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # [GP, BT] fp32
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLIT:
        S = tl.num_programs(1)
        at = pid * S + sid
        tl.store(part_ptr + (at * GP + offs_g)[:, None] * D + offs_d[None, :], acc)
        tl.store(stat_ptr + at * 2 * GP + offs_g, m_i)
        tl.store(stat_ptr + at * 2 * GP + GP + offs_g, l_i)
    else:
        out = out_ptr + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :]
        tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=(offs_g < G)[:, None])


@triton.jit
def _attention_merge_kernel(
    part_ptr, stat_ptr, out_ptr, S, stride_ob, stride_oh,
    KV_HEADS: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    # the S partials of one (row, KV head), one at a time with a running max (registers for one [GP, D] tile
    # whatever S): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, M = max_s m_s
    pid = tl.program_id(0)
    b = pid // KV_HEADS
    h = pid % KV_HEADS
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    m_run = tl.full((GP,), -1e30, tl.float32)
    total = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    for s in range(S):
        at = pid * S + s
        m = tl.load(stat_ptr + at * 2 * GP + offs_g)
        l_s = tl.load(stat_ptr + at * 2 * GP + GP + offs_g)
        part = tl.load(part_ptr + (at * GP + offs_g)[:, None] * D + offs_d[None, :])
        m_new = tl.maximum(m_run, m)
        old, new = tl.exp(m_run - m_new), tl.exp(m - m_new)
        total = total * old + l_s * new
        acc = acc * old[:, None] + part * new[:, None]
        m_run = m_new
    out = out_ptr + b * stride_ob + (h * G + offs_g)[:, None] * stride_oh + offs_d[None, :]
    tl.store(out, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=(offs_g < G)[:, None])


def split_plan(batch: int, kv_heads: int, t: int, n_sm: int) -> tuple[int, int]:
    """(splits, keys per split) of a cache of t keys: one split while the (row, KV head) programs are many or the
    cache short; else enough for about one program per SM, each streaming at least KEYS_PER_SPLIT keys. A split's
    keys are whole BLOCK_T tiles; no split is empty."""
    want = max(1, min(triton.cdiv(t, KEYS_PER_SPLIT), n_sm // (batch * kv_heads)))
    per = triton.cdiv(triton.cdiv(t, want), BLOCK_T) * BLOCK_T
    return triton.cdiv(t, per), per


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, kv_heads: int) -> torch.Tensor:
    """q [B, H, 1, D]; keys, values [B, H_kv, T, D]; mask [B, 1, 1, T] bool (True = may attend) or None.
    Returns [B, H, 1, D] in q's dtype."""
    b, h, _, d = q.shape
    t = keys.shape[2]
    if t == 0:
        raise ValueError("decode attention over an empty cache: a decode step attends at least to its own key")
    g = h // kv_heads
    gp = max(16, triton.next_power_of_2(g))
    out = torch.empty(b, h, 1, d, dtype=q.dtype, device=q.device)
    splits, per = split_plan(b, kv_heads, t, sm_count(q))
    m = mask.view(torch.uint8) if mask is not None else q  # [B or 1, 1, 1, T]; a pointer never read without a mask
    if splits > 1:
        part = torch.empty(b * kv_heads, splits, gp, d, dtype=torch.float32, device=q.device)
        stat = torch.empty(b * kv_heads, splits, 2, gp, dtype=torch.float32, device=q.device)
    else:
        part = stat = out  # not written
    _decode_attention_kernel[(b * kv_heads, splits)](
        q, keys, values, m, out, part, stat, t, per, scale,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        m.stride(0) if mask is not None and m.shape[0] > 1 else 0, m.stride(-1) if mask is not None else 0,
        out.stride(0), out.stride(1),
        KV_HEADS=kv_heads, G=g, GP=gp, D=d, BLOCK_T=BLOCK_T, HAS_MASK=mask is not None, SPLIT=splits > 1,
        NUM_STAGES=2, num_warps=4, **launch_options(q),
    )  # fmt: skip
    if splits > 1:
        _attention_merge_kernel[(b * kv_heads,)](part, stat, out, splits, out.stride(0), out.stride(1),
                                                 KV_HEADS=kv_heads, G=g, GP=gp, D=d)  # fmt: skip
    return out
