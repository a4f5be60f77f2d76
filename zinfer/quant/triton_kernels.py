"""Fused dequantize-matmul Triton kernels: out [M, N] = x [M, K] @ dequantize(qw).T (layout: pack.py).

Imported only on CUDA machines with Triton (ops.py imports it lazily).

Dispatch by M = rows of x:
  M <= TUNED_MAX_M           decode sizes: `choose` times the candidates once per shape (cold L2) and keeps the
                             fastest (ZINFER_GEMV=auto; other modes and multi-rank jobs take the first):
      "words"   word GEMV, CUDA cores, fp32 (_gemv_words_kernel): one 32-bit word of codes per thread and row,
                in the layout of the x pairs it meets, so the loop has no layout conversion; a code becomes a
                float by one shift (shared by two int4 codes) and one LOP3 (placed in the mantissa of 1.0, x
                prescaled to match), then one FFMA: ~4 SASS instructions per int4 code in the main loop.
                WIDE loads two words per thread (64 bits, split in registers), PREFETCH carries the next
                tile's loads in registers. BLOCK_M rows of x per program share each decoded code; the grid
                also runs over M, those programs sharing a weight tile through L2. Needs group_size * bits
                a multiple of 32 (64 for WIDE: whole words per group).
      "mma"     tensor-core GEMV (_gemv_mma_kernel, M <= MMA_MAX_M = 8): 16 weight rows times the rows of x as
                the 8 columns of one m16n8k16 MMA, written as inline PTX on per-lane fragments. A pair of codes
                becomes a pair of 16-bit floats C + q by one shift and one LOP3; the MMA sums them times x in
                fp32, and each group's scale and zero are folded in after its chain: 2.5-3.1 SASS instructions
                per int4 code in the main loop (offline sm_90 build), the word kernel's 4.1 spent on CUDA cores.
                Needs group_size * bits a multiple of 256.
      "groups"  group GEMV (_gemv_kernel, M <= GEMV_MAX_M): a tile is [BLOCK_N rows, GROUPS groups, GB bytes
                of one group]; the scale is factored out of each group's sum. Any group size.
      "gemm"    the tensor-core kernel below with its fixed small-M config.
  M <  DEQUANT_MIN_M         GEMM kernel: weight tile [BLOCK_N, BLOCK_K] dequantized in
                             registers, tl.dot (tensor cores) with an fp32 accumulator. Fixed
                             config with split-K up to SMALL_M (few tiles cannot fill the GPU),
                             autotuned above.
  M >= DEQUANT_MIN_M         compute-bound: dequantize the layer with a Triton kernel into a
                             scratch [N, K] and use cuBLAS, whose matmul outruns the fused one.
Split-K writes fp32 partials, summed in split order by one kernel. Codes become floats by mantissa tricks,
not I2F (a quarter-rate instruction that bounded the kernels). Tuning and autotuning run on a shape's first
call: warm up before capturing a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from zinfer.layers.triton_gemv import (
    TIE,
    launch_options,
    reduce_splits,
    several_ranks,
    split_k,
    time_cold,
    wait_previous,
)
from zinfer.quant.pack import QuantizedWeight

GEMV_MAX_M = 2  # at M = 4 the tensor-core GEMM was already 1.3-1.9x faster than the GEMV
SMALL_M = 64  # up to here the GEMM kernel runs a fixed config with split-K
DEQUANT_MIN_M = 256  # at M = 512 dequantize + cuBLAS was ~2x faster than the fused GEMM


@triton.jit
def _codes_to_f32(c):
    # Integer codes < 2^23 -> fp32 without I2F: OR them into the mantissa of 2^23 (0x4B000000),
    # reinterpret as float (= 2^23 + c exactly), subtract 2^23.
    return (c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _dequant_tile(
    q_rows, s_ptr, z_ptr, s_rows, n_mask, k0, KP,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # fp32 [BLOCK_N, BLOCK_K]: rows q_rows ([BN, 1] pointers), columns k0 .. k0 + BLOCK_K of Kp.
    PER: tl.constexpr = 8 // BITS
    BKB: tl.constexpr = BLOCK_K // PER  # bytes per row of the tile
    HALF: tl.constexpr = 1 << (BITS - 1)
    kk = k0 + tl.arange(0, BLOCK_K)
    kb = k0 // PER + tl.arange(0, BKB)
    qb = tl.load(q_rows + kb[None, :], mask=n_mask[:, None] & (kb[None, :] < KP // PER), other=0)
    if BITS == 4:  # [BN, BKB] bytes -> [BN, BK] codes, low nibble first
        codes = tl.reshape(tl.join(qb & 0xF, qb >> 4), (BLOCK_N, BLOCK_K))
    else:
        codes = qb
    if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale per row
        sz_ptr = s_rows[:, None] + k0 // GROUP  # [BN, 1]
        sz_mask = n_mask[:, None]
    else:
        sz_ptr = s_rows[:, None] + (kk // GROUP)[None, :]  # [BN, BK]
        sz_mask = n_mask[:, None] & (kk[None, :] < KP)
    s = tl.load(s_ptr + sz_ptr, mask=sz_mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        return _codes_to_f32(codes) * s + tl.load(z_ptr + sz_ptr, mask=sz_mask, other=0.0).to(tl.float32)
    else:
        return (_codes_to_f32(codes) - HALF) * s


@triton.jit
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, NGROUPS, GROUPS_PER_SPLIT,
    stride_xm, stride_qn, stride_sn, stride_os, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    # x [M, K]; q uint8 [N, NGROUPS * GROUP * BITS / 8]; s, z [N, NGROUPS];
    # out [SPLIT, M, N] (fp32 partials, or x's dtype when SPLIT == 1).
    # GP = GROUP rounded up to a power of two (tl.arange needs one); the rest is masked.
    PER: tl.constexpr = 8 // BITS  # values per byte
    GB: tl.constexpr = GP // PER  # bytes per (padded) group
    HALF: tl.constexpr = 1 << (BITS - 1)  # symmetric offset
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, GROUPS)  # [GR]
    offs_b = tl.arange(0, GB)  # [GB] byte within a group
    offs_e = tl.arange(0, GP)  # [GP] element within a group
    n_mask = offs_n < N
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn  # [BN, 1, 1]
    s_rows = offs_n.to(tl.int64)[:, None] * stride_sn  # [BN, 1]
    # Per (row, group-lane) partial sums; the group lanes are reduced once, after the loop.
    acc = tl.zeros((BLOCK_M, BLOCK_N, GROUPS), dtype=tl.float32)
    g_start = pid_s * GROUPS_PER_SPLIT
    g_end = tl.minimum(g_start + GROUPS_PER_SPLIT, NGROUPS)
    for g0 in range(g_start, g_end, GROUPS):
        grp = g0 + offs_g  # [GR]
        g_mask = grp < g_end
        byte = grp[:, None] * (GROUP // PER) + offs_b[None, :]  # [GR, GB] byte index in the row
        w_mask = n_mask[:, None, None] & (g_mask[:, None] & (offs_b[None, :] < GROUP // PER))[None, :, :]
        qb = tl.load(q_rows + byte[None, :, :], mask=w_mask, other=0)  # uint8 [BN, GR, GB]
        sz_mask = n_mask[:, None] & g_mask[None, :]
        s = tl.load(s_ptr + s_rows + grp[None, :], mask=sz_mask, other=0.0).to(tl.float32)  # [BN, GR]
        if HAS_ZERO:
            z = tl.load(z_ptr + s_rows + grp[None, :], mask=sz_mask, other=0.0).to(tl.float32)
        else:
            z = s * (-HALF)  # (q - HALF) * s = q * s + z
        if BITS == 4:
            q_lo = _codes_to_f32(qb & 0xF)  # element 2b of the group
            q_hi = _codes_to_f32(qb >> 4)  # element 2b + 1
        else:
            q_lo = _codes_to_f32(qb)
        kk = grp[:, None] * GROUP + offs_e[None, :]  # [GR, GP] column of x
        x_mask = g_mask[:, None] & (offs_e[None, :] < GROUP) & (kk < K)
        for m in tl.static_range(BLOCK_M):
            xm = tl.load(x_ptr + m * stride_xm + kk, mask=x_mask & (kk * 0 + m < M), other=0.0).to(tl.float32)
            xsum = tl.sum(xm, axis=1)  # [GR]
            if BITS == 4:  # even / odd elements (one load and a split beat two strided loads)
                x_lo, x_hi = tl.split(tl.reshape(xm, (GROUPS, GB, 2)))
                dq = tl.sum(q_lo * x_lo[None, :, :] + q_hi * x_hi[None, :, :], axis=2)  # [BN, GR]
            else:
                dq = tl.sum(q_lo * xm[None, :, :], axis=2)
            acc += tl.where(offs_m[:, None, None] == m, (dq * s + z * xsum[None, :])[None, :, :], 0.0)
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    acc = tl.sum(acc, axis=2)  # [BM, BN]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_mask[None, :])


@triton.jit
def _and_or(src, M: tl.constexpr, C: tl.constexpr, ASM: tl.constexpr):
    # (src & M) | C in one LOP3 (written plainly, the compiler emitted two); plain ops under the interpreter.
    if ASM:
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
            [src, tl.full(src.shape, M, tl.int32), tl.full(src.shape, C, tl.int32)],
            dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
    else:
        return (src & M) | C


@triton.jit
def _code_f32(src, M: tl.constexpr, ASM: tl.constexpr):
    # The code under mask M (the top bits of an fp32 mantissa) as 1 + q * 2^-b: OR'd into the bits of 1.0.
    return _and_or(src, M, 0x3F800000, ASM).to(tl.float32, bitcast=True)


@triton.jit
def _x_halves(xw, X_BF16: tl.constexpr):
    # int32 pairs of 16-bit floats -> (element 2p, element 2p + 1) as fp32; bf16 -> fp32 is a 16-bit shift.
    if X_BF16:
        return (xw << 16).to(tl.float32, bitcast=True), (xw & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (xw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_dot(w, xw, BITS: tl.constexpr, X_BF16: tl.constexpr, ASM: tl.constexpr):
    # w int32 [BW, BN, 1]: one word of codes per weight row; xw int32 [BW, 1, BM, P]: the pairs of x's 16-bit floats
    # it multiplies, for BM rows of x. Returns (sum_k f_k x'_k - sum x' [BW, BN, BM], sum x [BW, 1, BM]) over the word's
    # span, where f_k = 1 + q_k 2^-b and x'_k = x_k 2^b, so the first is sum q_k x_k. One fma chain per (x row,
    # weight row): each code costs a shift (shared by two int4 codes) and one LOP3, once for all BM rows of x, and
    # one FFMA per row of x.
    if BITS == 4:  # nibble i holds code i. A source puts an odd nibble at bits 12..15 (2^-11) and an even one
        # at 16..19 (2^-7): w as it is (nibbles 3, 4), w << 8 (1, 2), w >> 8 (5, 6), w rotated by 16 (7, 0).
        x02, x13 = tl.split(tl.reshape(xw, (xw.shape[0], 1, xw.shape[2], 2, 2)))  # pairs (0, 2) and (1, 3)
        p0, p2 = tl.split(x02)
        p1, p3 = tl.split(x13)
        e0, o0 = _x_halves(p0, X_BF16)  # x of codes 0, 1
        e1, o1 = _x_halves(p1, X_BF16)
        e2, o2 = _x_halves(p2, X_BF16)
        e3, o3 = _x_halves(p3, X_BF16)
        xsum = (e0 + o0) + (e1 + o1) + ((e2 + o2) + (e3 + o3))  # [BW, 1, BM]
        xs_odd = (o0 + o1) + (o2 + o3)
        dot = -2048.0 * xs_odd - 128.0 * (xsum - xs_odd)  # minus sum x', then the chain adds sum f x'
        u = w.to(tl.uint32, bitcast=True)
        for j in tl.static_range(4):
            if j == 0:
                src, xodd, xeven = w, o1, e2  # codes 3, 4
            elif j == 1:
                src, xodd, xeven = w << 8, o0, e1  # codes 1, 2
            elif j == 2:
                src, xodd, xeven = w >> 8, o2, e3  # codes 5, 6
            else:
                src, xodd, xeven = ((u >> 16) | (u << 16)).to(tl.int32, bitcast=True), o3, e0  # codes 7, 0
            dot = tl.fma(_code_f32(src, 0xF000, ASM), xodd * 2048.0, dot)
            dot = tl.fma(_code_f32(src, 0xF0000, ASM), xeven * 128.0, dot)
    else:  # byte b moved to bits 15..22 (2^-8) by one shift
        p0, p1 = tl.split(tl.reshape(xw, (xw.shape[0], 1, xw.shape[2], 2)))
        e0, o0 = _x_halves(p0, X_BF16)
        e1, o1 = _x_halves(p1, X_BF16)
        xsum = (e0 + o0) + (e1 + o1)
        dot = -256.0 * xsum
        dot = tl.fma(_code_f32(w << 15, 0x7F8000, ASM), e0 * 256.0, dot)
        dot = tl.fma(_code_f32(w << 7, 0x7F8000, ASM), o0 * 256.0, dot)
        dot = tl.fma(_code_f32(w >> 1, 0x7F8000, ASM), e1 * 256.0, dot)
        dot = tl.fma(_code_f32(w >> 9, 0x7F8000, ASM), o1 * 256.0, dot)
    return dot, xsum


@triton.jit
def _words_weights(
    q_rows, s_rows, s_ptr, z_ptr, unit, mask,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    # The weight operands of one tile of _gemv_words_kernel: unit [BW] indices of the load units in the row
    # (hinted max_contiguous 1 by the caller: the hint does not survive as an argument), mask [BW] or None. A unit
    # is one 32-bit word of codes, or two (one 64-bit load) when WIDE. Returns codes int32/int64 [BW, BN, 1],
    # scale and zero fp32 [BW, BN, 1]. Masked-off lanes (the ragged tail) read zero codes and scales: they add
    # nothing.
    WPU: tl.constexpr = 2 if WIDE else 1  # words per unit
    UPG: tl.constexpr = GROUP * BITS // 32 // WPU  # units per group
    HALF: tl.constexpr = 1 << (BITS - 1)
    group = s_rows + (unit // UPG)[:, None, None]  # [BW, BN, 1]
    if mask is None:  # the main loop: unpredicated loads
        w = tl.load(q_rows + unit[:, None, None], eviction_policy="evict_first")
        s = tl.load(s_ptr + group).to(tl.float32)
        z = tl.load(z_ptr + group).to(tl.float32) if HAS_ZERO else s * (-HALF)  # (q - HALF) * s = q * s + z
    else:
        w = tl.load(q_rows + unit[:, None, None], mask=mask[:, None, None], other=0, eviction_policy="evict_first")
        s = tl.load(s_ptr + group, mask=mask[:, None, None], other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + group, mask=mask[:, None, None], other=0.0).to(tl.float32)
        else:
            z = s * (-HALF)
    return w, s, z


@triton.jit
def _words_x(x_rows, unit, mask, BITS: tl.constexpr, WIDE: tl.constexpr):
    # The x operands of a tile: x_rows [BM] pointers to the rows of x; returns the x pairs int32 [BW, 1, BM, P] of
    # each unit's first word and of its second (the first again when not WIDE); masked-off lanes read zero.
    P: tl.constexpr = 32 // BITS // 2  # pairs of x per word
    WPU: tl.constexpr = 2 if WIDE else 1
    offs_p = tl.arange(0, P)[None, None, None, :]
    # the rows of x on axis 2, after the unit's axis: so Triton keeps them in each thread's registers (first, they
    # were spread over lanes, and every use went through shared memory)
    x_ptrs = x_rows[None, None, :, None] + (unit[:, None, None, None] * (P * WPU) + offs_p)
    if mask is None:
        xw = tl.load(x_ptrs)
        xw2 = tl.load(x_ptrs + P) if WIDE else xw
    else:
        lane = mask[:, None, None, None]
        xw = tl.load(x_ptrs, mask=lane, other=0)
        xw2 = tl.load(x_ptrs + P, mask=lane, other=0) if WIDE else xw
    return xw, xw2


@triton.jit
def _words_load(
    q_rows, s_rows, s_ptr, z_ptr, x_rows, unit, mask,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, WIDE: tl.constexpr,
):  # fmt: skip
    # Both operands of one tile: codes, scale, zero (_words_weights) and the x pairs (_words_x).
    w, s, z = _words_weights(q_rows, s_rows, s_ptr, z_ptr, unit, mask, BITS, GROUP, HAS_ZERO, WIDE)
    xw, xw2 = _words_x(x_rows, unit, mask, BITS, WIDE)
    return w, s, z, xw, xw2


@triton.jit
def _words_math(acc, w, s, z, xw, xw2, BITS: tl.constexpr, X_BF16: tl.constexpr, WIDE: tl.constexpr,
                ASM: tl.constexpr):  # fmt: skip
    # acc [BW, BN, BM] + the tile's sum_k w_k x_k = s * sum q x + z * sum x (the word's span lies in one group).
    if WIDE:  # the low word comes first in memory (little-endian)
        dot, xsum = _word_dot(w.to(tl.int32), xw, BITS, X_BF16, ASM)
        dot2, xsum2 = _word_dot((w >> 32).to(tl.int32), xw2, BITS, X_BF16, ASM)
        dot += dot2
        xsum += xsum2
    else:
        dot, xsum = _word_dot(w, xw, BITS, X_BF16, ASM)
    return tl.fma(s, dot, tl.fma(z, xsum, acc))


@triton.jit(do_not_specialize=["M"])
def _gemv_words_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
    M, N, KU, U_PER_SPLIT, stride_xm, stride_qn, stride_sn, stride_os, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, X_BF16: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PREFETCH: tl.constexpr, ASM: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # x: int32 view [M, KU * P * WPU] (pairs of fp16/bf16; K padded to whole groups); q: int32 view [N, KU] of
    # qweight (int64 when WIDE: a unit of two words), one word = 32 / BITS codes; s, z [N, NGROUPS]; out [SPLITS, M,
    # N] (fp32 partials, x's dtype for one split). Grid (M / BLOCK_M, N tiles, splits): a program multiplies its
    # weight tile with BLOCK_M rows of x, decoding each code once for all of them; the programs of one weight tile
    # run together and share it through L2.
    #
    # Codes become floats with one shift (per pair of int4 codes, or per int8 code) and one LOP3 (inline PTX when
    # ASM; the interpreter runs the same and-or as two plain ops): the code is placed in the top of an fp32 mantissa
    # of exponent 0, f = 1 + q * 2^-b, and x is prescaled by 2^b (exact), so sum_k w_k x_k = s * (sum f x' - sum x')
    # + z * sum x over a word's span (one group), the sum an fma chain per row that starts at -sum x'. Precision:
    # the sum f x' is ~2^11 times sum q x for int4, so the cancellation costs ~11 bits of fp32 (relative error
    # ~3e-5 at K = 8192; the group GEMV ~5e-7): below bf16 rounding, about one fp16 ulp on a few outputs. Each
    # thread keeps its own partial sum per row; the reduction across threads happens once, after the loop.
    #
    # Without overlap a program's step is load latency + math: PREFETCH issues the next tile's loads before the
    # current tile's math (operands carried in registers). WIDE halves the load instructions for the same bytes (a
    # 64-bit load, split into its two words in registers).
    #
    # PDL (dependent launch): the first tile's codes and scales are loaded before waiting for the kernel that wrote
    # x (triton_gemv.wait_previous), so they overlap that kernel's tail.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped, not masked: rows need no mask
    q_rows = q_ptr + rows[None, :, None] * stride_qn  # [1, BN, 1]
    s_rows = rows[None, :, None] * stride_sn  # [1, BN, 1]
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * stride_xm  # clamped like the weight rows
    offs_u = tl.arange(0, BLOCK_W)
    acc = tl.zeros((BLOCK_W, BLOCK_N, BLOCK_M), dtype=tl.float32)
    u_start = pid_s * U_PER_SPLIT
    u_end = tl.minimum(u_start + U_PER_SPLIT, KU)
    u_full = u_start + (u_end - u_start) // BLOCK_W * BLOCK_W
    if PREFETCH:
        if u_full > u_start:
            unit = tl.max_contiguous(u_start + offs_u, 1)  # one unit per thread: the x pairs' layout, no shuffle
            w, s, z = _words_weights(q_rows, s_rows, s_ptr, z_ptr, unit, None, BITS, GROUP, HAS_ZERO, WIDE)
            wait_previous(PDL)
            xw, xw2 = _words_x(x_rows, unit, None, BITS, WIDE)
            for u0 in range(u_start, u_full, BLOCK_W):
                # the next tile; the last step reloads its own (a scalar clamp keeps the loads unpredicated: L1 hits)
                unit = tl.max_contiguous(tl.minimum(u0 + BLOCK_W, u_full - BLOCK_W) + offs_u, 1)
                w2, s2, z2, xa, xb = _words_load(q_rows, s_rows, s_ptr, z_ptr, x_rows, unit, None,
                                                 BITS, GROUP, HAS_ZERO, WIDE)  # fmt: skip
                acc = _words_math(acc, w, s, z, xw, xw2, BITS, X_BF16, WIDE, ASM)
                w, s, z, xw, xw2 = w2, s2, z2, xa, xb
    else:
        u_loop = u_start
        if PDL:  # the first tile peeled: its weights before the wait
            if u_full > u_start:
                unit = tl.max_contiguous(u_start + offs_u, 1)
                w, s, z = _words_weights(q_rows, s_rows, s_ptr, z_ptr, unit, None, BITS, GROUP, HAS_ZERO, WIDE)
                wait_previous(PDL)
                xw, xw2 = _words_x(x_rows, unit, None, BITS, WIDE)
                acc = _words_math(acc, w, s, z, xw, xw2, BITS, X_BF16, WIDE, ASM)
                u_loop += BLOCK_W
        for u0 in range(u_loop, u_full, BLOCK_W):
            unit = tl.max_contiguous(u0 + offs_u, 1)
            w, s, z, xw, xw2 = _words_load(q_rows, s_rows, s_ptr, z_ptr, x_rows, unit, None,
                                           BITS, GROUP, HAS_ZERO, WIDE)  # fmt: skip
            acc = _words_math(acc, w, s, z, xw, xw2, BITS, X_BF16, WIDE, ASM)
    wait_previous(PDL)  # (again: returns at once) a split with no full tile
    if u_full < u_end:  # ragged end of the split
        unit = tl.max_contiguous(u_full + offs_u, 1)
        w, s, z, xw, xw2 = _words_load(q_rows, s_rows, s_ptr, z_ptr, x_rows, unit, unit < u_end,
                                       BITS, GROUP, HAS_ZERO, WIDE)  # fmt: skip
        acc = _words_math(acc, w, s, z, xw, xw2, BITS, X_BF16, WIDE, ASM)
    res = tl.sum(acc, axis=0)  # [BN, BM]
    out = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out, res.to(out_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


@triton.jit
def _prmt(a, b, HIGH: tl.constexpr, ASM: tl.constexpr):
    # Two 16-bit halves joined: (a.lo, b.lo), or (a.hi, b.hi) when HIGH; one PRMT.
    if ASM:
        if HIGH:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)  # fmt: skip
        else:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)  # fmt: skip
    elif HIGH:
        return ((a >> 16) & 0xFFFF) | (b & -65536)
    else:
        return (a & 0xFFFF) | (b << 16)


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, X_BF16: tl.constexpr, ASM: tl.constexpr):
    # One warp's m16n8k16 tensor-core product, D = A B + C with fp32 C/D, on the PTX fragments: the operands are
    # [32 * warps] tensors, element i held by thread i (lane = i % 32, g = lane // 4, t = lane % 4). A's registers
    # hold 16-bit pairs (row g, k 2t..2t+1), (row g+8, same k), (row g, k 2t+8..2t+9), (row g+8, ...); B's
    # (k 2t..2t+1, column g), (k 2t+8..2t+9, column g); C and D (row g, columns 2t, 2t+1), (row g+8, same).
    # Without ASM (Triton's interpreter) the same product is computed from those layouts with plain ops.
    if ASM:
        if X_BF16:
            return tl.inline_asm_elementwise(
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
                "{$10,$11,$12,$13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(tl.float32,) * 4, is_pure=True, pack=1)  # fmt: skip
        else:
            return tl.inline_asm_elementwise(
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
                "{$10,$11,$12,$13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
                [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3], dtype=(tl.float32,) * 4, is_pure=True, pack=1)  # fmt: skip
    else:
        W: tl.constexpr = a0.shape[0] // 32
        top = _emulated_rows(a0, a2, b0, b1, X_BF16)  # [W, 8 rows g, 8 columns]
        bottom = _emulated_rows(a1, a3, b0, b1, X_BF16)
        d0, d1 = tl.split(tl.reshape(top, (W, 8, 4, 2)))  # columns 2t, 2t + 1 of lane (g, t)
        d2, d3 = tl.split(tl.reshape(bottom, (W, 8, 4, 2)))
        n: tl.constexpr = 32 * W
        return (c0 + tl.reshape(d0, (n,)), c1 + tl.reshape(d1, (n,)), c2 + tl.reshape(d2, (n,)),
                c3 + tl.reshape(d3, (n,)))  # fmt: skip


@triton.jit
def _emulated_rows(a_lo_k, a_hi_k, b0, b1, X_BF16: tl.constexpr):
    # [W, 8, 8]: out[w, g, n] = sum over t and the four k slots of A (lanes (g, t)) times B (lanes (n, t)).
    W: tl.constexpr = a_lo_k.shape[0] // 32
    a0, a1 = _x_halves(a_lo_k, X_BF16)
    a2, a3 = _x_halves(a_hi_k, X_BF16)
    p0, p1 = _x_halves(b0, X_BF16)
    p2, p3 = _x_halves(b1, X_BF16)
    out = tl.sum(tl.reshape(a0, (W, 8, 1, 4)) * tl.reshape(p0, (W, 1, 8, 4)), axis=3)
    out += tl.sum(tl.reshape(a1, (W, 8, 1, 4)) * tl.reshape(p1, (W, 1, 8, 4)), axis=3)
    out += tl.sum(tl.reshape(a2, (W, 8, 1, 4)) * tl.reshape(p2, (W, 1, 8, 4)), axis=3)
    return out + tl.sum(tl.reshape(a3, (W, 8, 1, 4)) * tl.reshape(p3, (W, 1, 8, 4)), axis=3)


@triton.jit
def _mma_word(w_a, w_b, p0, p1, p2, p3, d0, d1, d2, d3, e0, e1, e2, e3,
              BITS: tl.constexpr, X_BF16: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    # One 32-bit word of codes per lane for rows g (w_a) and g + 8 (w_b) of a 16-row tile, times the x values of
    # the word's columns (pairs p0..p3 of 16-bit x; int8 uses p0, p1): adds sum_k (C + q_k) x_k to the tile's
    # chain (d) and sum_k x_k to the x-sum chain (e; a second row tile discards its own). Codes enter the tensor core as
    # 16-bit floats C + q, exact, built two at a time by one LOP3 that ORs a pair of codes into the mantissas of
    # two copies of C (OFFSET in _gemv_mma_kernel). The MMA's k order is the lanes' own; B is x permuted to match.
    if BITS == 4:  # nibble h and h + 4 of a word form one pair: (w >> 4h) & 0x000F000F
        MAGIC: tl.constexpr = 0x43004300 if X_BF16 else 0x64006400  # C = 128 (bf16) / 1024 (fp16)
        for e in tl.static_range(2):  # A's k slots 2t..2t+1 take nibbles (2e, 2e+4), slots 2t+8..9 (2e+1, 2e+5)
            if e == 0:
                b0, b1 = _prmt(p0, p2, False, ASM), _prmt(p0, p2, True, ASM)  # (x0, x4), (x1, x5)
            else:
                b0, b1 = _prmt(p1, p3, False, ASM), _prmt(p1, p3, True, ASM)  # (x2, x6), (x3, x7)
            d0, d1, d2, d3 = _mma(_and_or(w_a >> (8 * e), 0x000F000F, MAGIC, ASM),
                                  _and_or(w_b >> (8 * e), 0x000F000F, MAGIC, ASM),
                                  _and_or(w_a >> (8 * e + 4), 0x000F000F, MAGIC, ASM),
                                  _and_or(w_b >> (8 * e + 4), 0x000F000F, MAGIC, ASM),
                                  b0, b1, d0, d1, d2, d3, X_BF16, ASM)  # fmt: skip
            e0, e1, e2, e3 = _mma_ones(b0, b1, e0, e1, e2, e3, X_BF16, ASM)
    else:  # bytes 0 and 2 in slots 2t..2t+1, 1 and 3 in 2t+8..9
        b0, b1 = _prmt(p0, p1, False, ASM), _prmt(p0, p1, True, ASM)  # (x0, x2), (x1, x3)
        if X_BF16:  # 8 bits do not fit bf16's 7-bit mantissa: low nibbles as 128 + l, high ones as 2048 + 16 h
            d0, d1, d2, d3 = _mma(_and_or(w_a, 0x000F000F, 0x43004300, ASM),
                                  _and_or(w_b, 0x000F000F, 0x43004300, ASM),
                                  _and_or(w_a >> 8, 0x000F000F, 0x43004300, ASM),
                                  _and_or(w_b >> 8, 0x000F000F, 0x43004300, ASM),
                                  b0, b1, d0, d1, d2, d3, X_BF16, ASM)  # fmt: skip
            d0, d1, d2, d3 = _mma(_and_or(w_a >> 4, 0x000F000F, 0x45004500, ASM),
                                  _and_or(w_b >> 4, 0x000F000F, 0x45004500, ASM),
                                  _and_or(w_a >> 12, 0x000F000F, 0x45004500, ASM),
                                  _and_or(w_b >> 12, 0x000F000F, 0x45004500, ASM),
                                  b0, b1, d0, d1, d2, d3, X_BF16, ASM)  # fmt: skip
        else:  # fp16's 10-bit mantissa takes a whole byte: 1024 + q
            d0, d1, d2, d3 = _mma(_and_or(w_a, 0x00FF00FF, 0x64006400, ASM),
                                  _and_or(w_b, 0x00FF00FF, 0x64006400, ASM),
                                  _and_or(w_a >> 8, 0x00FF00FF, 0x64006400, ASM),
                                  _and_or(w_b >> 8, 0x00FF00FF, 0x64006400, ASM),
                                  b0, b1, d0, d1, d2, d3, X_BF16, ASM)  # fmt: skip
        e0, e1, e2, e3 = _mma_ones(b0, b1, e0, e1, e2, e3, X_BF16, ASM)
    return d0, d1, d2, d3, e0, e1, e2, e3


@triton.jit
def _mma_ones(b0, b1, e0, e1, e2, e3, X_BF16: tl.constexpr, ASM: tl.constexpr):
    # e + (all-ones A) B: every row of the product is the sum of B's column, x's sum over these k for x rows 2t
    # (e0 = e2) and 2t + 1 (e1 = e3); four accumulators kept, so the chain needs no register copies.
    ONES: tl.constexpr = 0x3F803F80 if X_BF16 else 0x3C003C00
    one = tl.full(b0.shape, ONES, tl.int32)
    return _mma(one, one, one, one, b0, b1, e0, e1, e2, e3, X_BF16, ASM)


@triton.jit(do_not_specialize=["M"])
def _gemv_mma_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
    M, N, NG, G_PER_SPLIT, stride_xm, stride_qn, stride_sn, stride_os, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, X_BF16: tl.constexpr,
    TILES: tl.constexpr, WARPS: tl.constexpr, GPI: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Tensor-core GEMV for M <= 8 rows of x: out[m, n] = sum_k x[m, k] w[n, k], x the MMA's B (its 8 columns are
    # the rows of x), 16 weight rows per MMA tile, TILES tiles per program; the program's warps take turns over
    # the split's groups, GPI groups at a time, and add their sums at the end. x: int64 view [M, KP / 4] (four
    # 16-bit values per unit); q: int64 view [N, KP * BITS / 64]; s, z [N, NG]; out [SPLITS, M, N].
    #
    # Per group and weight row, lane t loads the 64-bit units t, t + 4, ... (four lanes read a row's 32 bytes at
    # once) and the x values of those units' columns. Each pair of codes becomes a pair of 16-bit floats (C + q)
    # by one shift and one LOP3; an MMA chain per group sums (C + q) x in fp32 (products exact), and a chain with
    # all-ones A sums x; then acc += s * chain + (z - C s) * xsum folds the group's scale and zero in.
    L: tl.constexpr = 32 * WARPS
    UPG: tl.constexpr = GROUP * BITS // 64  # 64-bit units of codes per row and group
    UPL: tl.constexpr = UPG // 4  # per lane
    XPU: tl.constexpr = 16 // BITS  # 64-bit units of x per unit of codes (16 or 8 values)
    HALF: tl.constexpr = 1 << (BITS - 1)
    # C of _mma_word's codes C + q: int4 128 (bf16) / 1024 (fp16); int8 bf16 128 + 2048 (two planes), fp16 1024
    OFFSET: tl.constexpr = (128.0 if X_BF16 else 1024.0) if BITS == 4 else (2176.0 if X_BF16 else 1024.0)
    i = tl.arange(0, L)
    lane = i % 32
    warp = i // 32
    g = lane // 4
    t = lane % 4
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    x_row = x_ptr + tl.minimum(g, M - 1).to(tl.int64) * stride_xm  # lane (g, t) supplies B's column g: row g of x
    row0 = pid_n * (16 * TILES) + g
    # the rows' pointers, computed once: rows g, g + 8 of each tile, clamped (not masked) to the last row
    ra0 = tl.minimum(row0, N - 1).to(tl.int64)
    rb0 = tl.minimum(row0 + 8, N - 1).to(tl.int64)
    ra1 = tl.minimum(row0 + 16, N - 1).to(tl.int64)
    rb1 = tl.minimum(row0 + 24, N - 1).to(tl.int64)
    qa0, qb0 = q_ptr + ra0 * stride_qn, q_ptr + rb0 * stride_qn
    qa1, qb1 = q_ptr + ra1 * stride_qn, q_ptr + rb1 * stride_qn
    sa0, sb0 = s_ptr + ra0 * stride_sn, s_ptr + rb0 * stride_sn
    sa1, sb1 = s_ptr + ra1 * stride_sn, s_ptr + rb1 * stride_sn
    za0, zb0 = z_ptr + ra0 * stride_sn, z_ptr + rb0 * stride_sn
    za1, zb1 = z_ptr + ra1 * stride_sn, z_ptr + rb1 * stride_sn
    my_unit = t  # lane t's first unit of a group's row; then t + 4, ...
    my_group = warp * GPI
    zero = tl.zeros((L,), dtype=tl.float32)
    acc0, acc1, acc2, acc3 = zero, zero, zero, zero  # tile 0: (row g, x rows 2t / 2t+1), (row g+8, ...)
    bcc0, bcc1, bcc2, bcc3 = zero, zero, zero, zero  # tile 1 (TILES == 2)
    g_lo = pid_s * G_PER_SPLIT
    g_hi = tl.minimum(g_lo + G_PER_SPLIT, NG)
    wait_previous(PDL)
    for g0 in range(g_lo, g_hi, WARPS * GPI):
        for u in tl.static_range(GPI):
            grp = g0 + my_group + u
            ok = grp < g_hi
            gc = tl.minimum(grp, g_hi - 1)  # a group past the split's end reads the last one, weighted 0
            d0, d1, d2, d3, e0, e1, e2, e3 = zero, zero, zero, zero, zero, zero, zero, zero
            f0, f1, f2, f3 = zero, zero, zero, zero
            for h in tl.static_range(UPL):
                unit = tl.max_contiguous(gc * UPG + my_unit + 4 * h, 1)  # one unit per thread: no vector across lanes
                xu = tl.max_contiguous(gc * (GROUP // 4) + (my_unit + 4 * h) * XPU, 1)
                qa = tl.load(qa0 + unit, eviction_policy="evict_first")
                qb = tl.load(qb0 + unit, eviction_policy="evict_first")
                if TILES == 2:
                    qa2 = tl.load(qa1 + unit, eviction_policy="evict_first")
                    qb2 = tl.load(qb1 + unit, eviction_policy="evict_first")
                for j in tl.static_range(2):  # the unit's two words: the low one first in memory
                    if BITS == 4:
                        xa = tl.load(x_row + xu + 2 * j)
                        xb = tl.load(x_row + xu + 2 * j + 1)
                        p0, p1, p2, p3 = xa.to(tl.int32), (xa >> 32).to(tl.int32), xb.to(tl.int32), \
                            (xb >> 32).to(tl.int32)  # fmt: skip
                    else:
                        xa = tl.load(x_row + xu + j)
                        p0, p1 = xa.to(tl.int32), (xa >> 32).to(tl.int32)
                        p2, p3 = p0, p1
                    d0, d1, d2, d3, e0, e1, e2, e3 = _mma_word(
                        (qa >> (32 * j)).to(tl.int32), (qb >> (32 * j)).to(tl.int32), p0, p1, p2, p3,
                        d0, d1, d2, d3, e0, e1, e2, e3,
                        BITS, X_BF16, ASM)  # fmt: skip
                    if TILES == 2:
                        f0, f1, f2, f3, _, _, _, _ = _mma_word(
                            (qa2 >> (32 * j)).to(tl.int32), (qb2 >> (32 * j)).to(tl.int32), p0, p1, p2, p3,
                            f0, f1, f2, f3, e0, e1, e2, e3,
                            BITS, X_BF16, ASM)  # fmt: skip
            acc0, acc1, acc2, acc3 = _mma_fold(acc0, acc1, acc2, acc3, d0, d1, d2, d3, e0, e1,
                                               sa0 + gc, sb0 + gc, za0 + gc, zb0 + gc, ok,
                                               HAS_ZERO, HALF, OFFSET)  # fmt: skip
            if TILES == 2:
                bcc0, bcc1, bcc2, bcc3 = _mma_fold(bcc0, bcc1, bcc2, bcc3, f0, f1, f2, f3, e0, e1,
                                                   sa1 + gc, sb1 + gc, za1 + gc, zb1 + gc, ok,
                                                   HAS_ZERO, HALF, OFFSET)  # fmt: skip
    out = out_ptr + pid_s * stride_os
    _mma_store(out, acc0, acc1, acc2, acc3, pid_n * (16 * TILES), M, N, stride_om, WARPS)
    if TILES == 2:
        _mma_store(out, bcc0, bcc1, bcc2, bcc3, pid_n * (16 * TILES) + 16, M, N, stride_om, WARPS)


@triton.jit
def _mma_fold(a0, a1, a2, a3, d0, d1, d2, d3, e0, e1, s_a, s_b, z_a, z_b, ok,
              HAS_ZERO: tl.constexpr, HALF: tl.constexpr, OFFSET: tl.constexpr):  # fmt: skip
    # acc += s * sum (C + q) x + (z - C s) * sum x for rows g (s_a, z_a: pointers to its scale and zero) and g + 8;
    # a group past the split's end (not ok) weighs 0.
    sa = tl.where(ok, tl.load(s_a).to(tl.float32), 0.0)
    sb = tl.where(ok, tl.load(s_b).to(tl.float32), 0.0)
    if HAS_ZERO:
        za = tl.where(ok, tl.load(z_a).to(tl.float32), 0.0) - OFFSET * sa
        zb = tl.where(ok, tl.load(z_b).to(tl.float32), 0.0) - OFFSET * sb
    else:  # (q - HALF) * s
        za = sa * -(HALF + OFFSET)
        zb = sb * -(HALF + OFFSET)
    return (tl.fma(sa, d0, tl.fma(za, e0, a0)), tl.fma(sa, d1, tl.fma(za, e1, a1)),
            tl.fma(sb, d2, tl.fma(zb, e0, a2)), tl.fma(sb, d3, tl.fma(zb, e1, a3)))  # fmt: skip


@triton.jit
def _mma_store(out, a0, a1, a2, a3, first_row, M, N, stride_om, WARPS: tl.constexpr):
    # The warps' sums added, then lane (g, t) writes rows first_row + g (a0, a1) and + g + 8 (a2, a3) for x rows
    # 2t (a0, a2) and 2t + 1 (a1, a3).
    lane = tl.arange(0, 32)
    row = first_row + lane // 4
    m = 2 * (lane % 4)
    _mma_store_one(out, a0, row, m, M, N, stride_om, WARPS)
    _mma_store_one(out, a1, row, m + 1, M, N, stride_om, WARPS)
    _mma_store_one(out, a2, row + 8, m, M, N, stride_om, WARPS)
    _mma_store_one(out, a3, row + 8, m + 1, M, N, stride_om, WARPS)


@triton.jit
def _mma_store_one(out, a, row, m, M, N, stride_om, WARPS: tl.constexpr):
    res = tl.sum(tl.reshape(a, (WARPS, 32)), axis=0)
    tl.store(out + m * stride_om + row, res.to(out.dtype.element_ty), mask=(m < M) & (row < N))


@triton.jit
def _gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, KP, K_PER_SPLIT, M_BUCKET,
    stride_xm, stride_qn, stride_sn, stride_os, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
):  # fmt: skip
    # x [M, K]; q uint8 [N, KP * BITS / 8]; s, z [N, KP / GROUP]; out [SPLIT, M, N].
    # M_BUCKET only keys the autotuner. K_PER_SPLIT is a multiple of BLOCK_K.
    # SWAP_AB computes out.T = W @ x.T: the dequantized W (registers) is the MMA's A operand, which
    # Hopper's wgmma can read from registers, and BLOCK_M (tokens) may be as small as 16.
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    # Grouped ordering: GROUP_SIZE_M row-tiles share each weight tile while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_SIZE_M * num_pid_n
    first_m = (pid // in_group) * GROUP_SIZE_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn  # [BN, 1]
    s_rows = offs_n.to(tl.int64) * stride_sn  # [BN]
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, KP), BLOCK_K):
        kk = k0 + offs_k  # [BK]
        x = tl.load(x_rows + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)  # [BM, BK]
        w = _dequant_tile(q_rows, s_ptr, z_ptr, s_rows, n_mask, k0, KP, BITS, GROUP, HAS_ZERO, BLOCK_N, BLOCK_K)
        if SWAP_AB:  # fp32 accumulation
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)  # [BN, BM]
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)  # [BM, BN]
    out = out_ptr + pid_s * stride_os
    if SWAP_AB:
        out += offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])
    else:
        out += offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, z_ptr, out_ptr, N, K, KP, stride_qn, stride_sn, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out [N, K] (true K) = the dense weight, in out's dtype.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    q_rows = q_ptr + offs_n.to(tl.int64)[:, None] * stride_qn
    w = _dequant_tile(q_rows, s_ptr, z_ptr, offs_n.to(tl.int64) * stride_sn, n_mask, k0, KP,
                      BITS, GROUP, HAS_ZERO, BLOCK_N, BLOCK_K)  # fmt: skip
    kk = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + kk[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & (kk[None, :] < K))


_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_SIZE_M": 8, "SWAP_AB": sw}, num_warps=w, num_stages=s)
    for bm, bn, sw, w, s in [
        (64, 128, False, 4, 4),
        (128, 128, False, 8, 3),
        (128, 256, False, 8, 3),
        (64, 128, True, 4, 4),
        (128, 128, True, 8, 3),
        (256, 128, True, 8, 3),
        (128, 64, True, 4, 4),
    ]
]
_gemm_tuned = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "BITS", "GROUP", "HAS_ZERO"])(
    _gemm_kernel
)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gemm_block_k(group: int) -> int:
    """Largest usual BLOCK_K that divides the group (one scale per tile row), else 64 (gathered)."""
    return next((bk for bk in (64, 32, 16) if group % bk == 0), 64)


def _split(units: int, tiles: int, n_sm: int, unit_step: int) -> int:
    """Units (groups, or K) per split, a multiple of unit_step, so that tiles * splits ~ 4
    programs per SM while each split still loops at least 4 times; no split from 2 tiles per SM
    (the fp32 partials' traffic then costs more than it gains: gate_up at M = 64, 130 -> 97 us)."""
    want = 1 if tiles >= 2 * n_sm else max(1, min(-(-4 * n_sm // tiles), units // (4 * unit_step)))
    per = -(-units // want)
    return -(-per // unit_step) * unit_step


def _gemv_config(m: int, n: int, qw: QuantizedWeight, n_sm: int) -> dict:
    g = qw.spec.group_size
    gp = triton.next_power_of_2(g)
    gb = gp // qw.spec.per_byte
    block_n = 4  # many small programs: measured best on H100 for M = 1
    groups = max(1, 2048 // (block_n * gb))  # ~2 KiB of packed weight per tile
    ngroups = qw.padded_k // g
    per = _split(ngroups, triton.cdiv(n, block_n), n_sm, groups)
    return dict(BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, GROUPS=groups, GP=gp,
                GROUPS_PER_SPLIT=per, num_warps=4)  # fmt: skip


def _small_gemm_config(m: int, n: int, qw: QuantizedWeight, n_sm: int) -> dict:
    bm = max(16, triton.next_power_of_2(m))
    bn, bk = 64, _gemm_block_k(qw.spec.group_size)
    per = _split(qw.padded_k, triton.cdiv(m, bm) * triton.cdiv(n, bn), n_sm, bk)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_SIZE_M=1, K_PER_SPLIT=per, SWAP_AB=False,
                num_warps=4, num_stages=3)  # fmt: skip


def _sm_count(x: torch.Tensor) -> int:
    return _num_sms(x.device.index or 0) if x.is_cuda else 8  # not CUDA: Triton's interpreter


def _partials(out: torch.Tensor, splits: int) -> torch.Tensor:
    """Where a kernel writes: `out` itself, or fp32 split-K partials [splits, M, N]."""
    if splits == 1:
        return out.unsqueeze(0)
    return torch.empty(splits, *out.shape, dtype=torch.float32, device=out.device)


def words_ok(qw: QuantizedWeight, wide: bool = False) -> bool:
    """Whether the word kernel takes this weight: whole 32-bit words of codes per group (64-bit pairs of words when
    `wide`), a qweight aligned to its load unit."""
    q, s, unit = qw.qweight, qw.spec, 8 if wide else 4
    return (s.group_size * s.bits) % (8 * unit) == 0 and q.stride(-1) == 1 and q.stride(0) % unit == 0 \
        and q.data_ptr() % unit == 0


def _x_pairs(x: torch.Tensor, kp: int, unit: torch.dtype = torch.int32) -> torch.Tensor:
    """x [M, K] fp16/bf16 viewed as `unit` (int32: pairs [M, kp / 2]; int64: fours [M, kp / 4]); a copy
    zero-padded to kp when K < kp or x is not aligned to the unit."""
    m, k = x.shape
    per = unit.itemsize // x.element_size()  # values per unit
    if k != kp or x.stride(0) % per or x.data_ptr() % unit.itemsize:
        padded = x.new_zeros(m, kp)
        padded[:, :k] = x
        x = padded
    return x.view(unit)


def gemv_words(x: torch.Tensor, qw: QuantizedWeight, out: torch.Tensor, cfg: dict | None = None) -> None:
    """The word kernel: x [M, K] (unit column stride; M small), out [M, N] contiguous; cfg overrides the first
    WORDS_TILES entry that takes qw."""
    (m, _), (n, _) = x.shape, qw.shape
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gemv_words: x must be fp16 or bf16 (read as 16-bit pairs), got {x.dtype}")
    kw = qw.qweight.shape[1] // 4  # 32-bit words per row
    tile = next((t for t in WORDS_TILES if words_ok(qw, t[4])), WORDS_TILES[-1])  # the last is not WIDE
    cfg = cfg or {}
    tile = tuple(cfg.get(key, v) for key, v in zip(WORDS_TILE_KEYS, tile))  # the default split: for the tile asked
    cfg = {**_words_config(m, n, kw, tile, _sm_count(x), cfg.get("BLOCK_M", 1)), **cfg}
    wide = cfg["WIDE"]
    if not words_ok(qw, wide):
        bits = 64 if wide else 32
        raise ValueError(f"gemv_words: needs group_size * bits % {bits} == 0 and a qweight aligned to {bits} bits, "
                         f"got {qw.spec}")  # fmt: skip
    q = qw.qweight.view(torch.int64 if wide else torch.int32)  # [N, KU] load units
    ku = q.shape[1]
    per = cfg.pop("U_PER_SPLIT") or ku
    splits = triton.cdiv(ku, per)
    xw = _x_pairs(x, qw.padded_k)
    part = _partials(out, splits)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), splits)
    _gemv_words_kernel[grid](
        xw, q, qw.scale, qw.zero if qw.zero is not None else qw.scale, part,
        m, n, ku, per, xw.stride(0), q.stride(0), qw.scale.stride(0), part.stride(0), part.stride(1),
        BITS=qw.spec.bits, GROUP=qw.spec.group_size, HAS_ZERO=qw.zero is not None,
        X_BF16=x.dtype == torch.bfloat16, ASM=x.is_cuda, num_stages=1, **launch_options(x), **cfg,
    )  # fmt: skip
    if splits > 1:
        reduce_splits(part, out)


MMA_MAX_M = 8  # rows of x the tensor-core GEMV takes: the MMA's 8 columns
# (TILES, WARPS, GPI) of the tensor-core GEMV, in order of preference: 16-row weight tiles per program, warps per
# program (taking turns over the groups), groups a warp loads before its MMAs
MMA_TILES = [(1, 4, 2), (1, 4, 4), (2, 4, 2), (1, 8, 1)]
MMA_TILE_KEYS = ("TILES", "WARPS", "GPI")


def mma_ok(qw: QuantizedWeight) -> bool:
    """Whether the tensor-core GEMV takes this weight: groups of whole 256-bit runs of codes per row (int4 group
    64 / 128, int8 group 32 / 64 / ...), a qweight aligned to 64 bits."""
    q, s = qw.qweight, qw.spec
    return (s.group_size * s.bits) % 256 == 0 and q.stride(-1) == 1 and q.stride(0) % 8 == 0 \
        and q.data_ptr() % 8 == 0


def _has_mma(x: torch.Tensor) -> bool:
    """Whether x's GPU has the m16n8k16 bf16 / fp16 MMA (compute capability 8.0 and later)."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 0)


def _mma_config(n: int, qw: QuantizedWeight, tile: tuple, n_sm: int, split: bool = True) -> dict:
    """Launch config of an MMA_TILES entry; with `split`, groups per split so that the programs' warps fill the GPU
    (~16 per SM) while each split still loops at least twice."""
    t = dict(zip(MMA_TILE_KEYS, tile))
    ngroups = qw.padded_k // qw.spec.group_size
    step = t["WARPS"] * t["GPI"]  # groups per program and loop step
    programs = triton.cdiv(n, 16 * t["TILES"])
    splits = 1
    if split:
        splits = max(1, min(-(-16 * n_sm // (programs * t["WARPS"])), ngroups // (2 * step)))
    per = -(-triton.cdiv(ngroups, splits) // step) * step
    return dict(**t, G_PER_SPLIT=per if per < ngroups else None)


def gemv_mma(x: torch.Tensor, qw: QuantizedWeight, out: torch.Tensor, cfg: dict | None = None) -> None:
    """The tensor-core GEMV: x [M <= MMA_MAX_M, K] fp16/bf16 (unit column stride), out [M, N] contiguous; cfg
    overrides the first MMA_TILES entry's config."""
    (m, _), (n, _) = x.shape, qw.shape
    if x.dtype not in (torch.float16, torch.bfloat16) or m > MMA_MAX_M:
        raise ValueError(f"gemv_mma: x must be fp16 or bf16 with at most {MMA_MAX_M} rows, got {x.dtype} "
                         f"{list(x.shape)}")  # fmt: skip
    if not mma_ok(qw):
        raise ValueError(f"gemv_mma: needs group_size * bits % 256 == 0 and a qweight aligned to 64 bits, "
                         f"got {qw.spec}")  # fmt: skip
    if not out.is_contiguous():
        raise ValueError("gemv_mma: out must be contiguous")
    if m == 0:
        return
    qw = _contiguous(qw)  # one row stride for scale and zero
    cfg = cfg or {}
    tile = tuple(cfg.get(key, v) for key, v in zip(MMA_TILE_KEYS, MMA_TILES[0]))
    cfg = {**_mma_config(n, qw, tile, _sm_count(x)), **cfg}
    ngroups = qw.padded_k // qw.spec.group_size
    per = cfg.pop("G_PER_SPLIT") or ngroups
    splits = triton.cdiv(ngroups, per)
    xu = _x_pairs(x, qw.padded_k, torch.int64)
    q = qw.qweight.view(torch.int64)
    part = _partials(out, splits)
    grid = (triton.cdiv(n, 16 * cfg["TILES"]), splits)
    _gemv_mma_kernel[grid](
        xu, q, qw.scale, qw.zero if qw.zero is not None else qw.scale, part,
        m, n, ngroups, per, xu.stride(0), q.stride(0), qw.scale.stride(0), part.stride(0), part.stride(1),
        BITS=qw.spec.bits, GROUP=qw.spec.group_size, HAS_ZERO=qw.zero is not None, X_BF16=x.dtype == torch.bfloat16,
        ASM=x.is_cuda, num_warps=cfg["WARPS"], num_stages=1, **launch_options(x),
        **{k: cfg[k] for k in MMA_TILE_KEYS},
    )  # fmt: skip
    if splits > 1:
        reduce_splits(part, out)


def _words_config(m: int, n: int, kw: int, tile: tuple, n_sm: int, block_m: int = 1) -> dict:
    """Launch config of a WORDS_TILES entry for a weight of n rows and kw 32-bit words per row, block_m rows of x
    per program."""
    t = dict(zip(WORDS_TILE_KEYS, tile))
    units = kw // 2 if t["WIDE"] else kw
    per = split_k(units, triton.cdiv(m, block_m) * triton.cdiv(n, t["BLOCK_N"]), t["BLOCK_W"], n_sm)  # load units
    return dict(BLOCK_M=block_m, **t, U_PER_SPLIT=per)


def gemv(x: torch.Tensor, qw: QuantizedWeight, out: torch.Tensor, cfg: dict | None = None) -> None:
    """x [M, K] (unit column stride), out [M, N] contiguous; cfg overrides _gemv_config."""
    (m, _), (n, k) = x.shape, qw.shape
    cfg = {**_gemv_config(m, n, qw, _sm_count(x)), **(cfg or {})}
    per = cfg.pop("GROUPS_PER_SPLIT")
    splits = triton.cdiv(qw.padded_k // qw.spec.group_size, per)
    part = _partials(out, splits)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), splits)
    _gemv_kernel[grid](
        x, qw.qweight, qw.scale, qw.zero if qw.zero is not None else qw.scale, part,
        m, n, k, qw.padded_k // qw.spec.group_size, per,
        x.stride(0), qw.qweight.stride(0), qw.scale.stride(0), part.stride(0), part.stride(1),
        BITS=qw.spec.bits, GROUP=qw.spec.group_size, HAS_ZERO=qw.zero is not None, **cfg,
    )  # fmt: skip
    if splits > 1:
        reduce_splits(part, out)


def gemm(x: torch.Tensor, qw: QuantizedWeight, out: torch.Tensor, cfg: dict | None = None) -> None:
    """x [M, K] (unit column stride), out [M, N] contiguous. Autotuned unless M <= SMALL_M or cfg."""
    (m, _), (n, k) = x.shape, qw.shape
    args = dict(BITS=qw.spec.bits, GROUP=qw.spec.group_size, HAS_ZERO=qw.zero is not None)
    tensors = (x, qw.qweight, qw.scale, qw.zero if qw.zero is not None else qw.scale)
    m_bucket = min(triton.next_power_of_2(m), 4096)
    if m > SMALL_M and cfg is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), 1)
        _gemm_tuned[grid](
            *tensors, out, m, n, k, qw.padded_k, qw.padded_k, m_bucket,
            x.stride(0), qw.qweight.stride(0), qw.scale.stride(0), 0, out.stride(0),
            BLOCK_K=_gemm_block_k(qw.spec.group_size), **args,
        )  # fmt: skip
        return
    cfg = {**_small_gemm_config(m, n, qw, _sm_count(x)), **(cfg or {})}
    per = cfg.pop("K_PER_SPLIT")
    if per % cfg["BLOCK_K"]:
        raise ValueError(f"gemm: K_PER_SPLIT={per} must be a multiple of BLOCK_K={cfg['BLOCK_K']}")
    splits = triton.cdiv(qw.padded_k, per)
    part = _partials(out, splits)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), splits)
    _gemm_kernel[grid](
        *tensors, part, m, n, k, qw.padded_k, per, m_bucket,
        x.stride(0), qw.qweight.stride(0), qw.scale.stride(0), part.stride(0), part.stride(1),
        **args, **cfg,
    )  # fmt: skip
    if splits > 1:
        reduce_splits(part, out)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in `dtype`, by one Triton kernel (pack.dequantize's torch ops
    make fp32 temporaries and take ~10x longer)."""
    n, k = qw.shape
    out = torch.empty(n, k, dtype=dtype, device=qw.device)
    bn, bk = 64, _gemm_block_k(qw.spec.group_size)
    grid = (triton.cdiv(n, bn), triton.cdiv(qw.padded_k, bk))
    _dequant_kernel[grid](
        qw.qweight, qw.scale, qw.zero if qw.zero is not None else qw.scale, out, n, k, qw.padded_k,
        qw.qweight.stride(0), qw.scale.stride(0), out.stride(0),
        BITS=qw.spec.bits, GROUP=qw.spec.group_size, HAS_ZERO=qw.zero is not None, BLOCK_N=bn, BLOCK_K=bk,
    )  # fmt: skip
    return out


def fused_matmul(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """x [..., K] fp16/bf16 on CUDA -> [..., N] in x's dtype."""
    n, k = qw.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m > 0:
        with torch.cuda.device(x.device):
            qw = _contiguous(qw)
            if m <= TUNED_MAX_M:
                kind, cfg = choose(x2, qw)
                _LAUNCH[kind](x2, qw, out, dict(cfg))
            elif m < DEQUANT_MIN_M:
                gemm(x2, qw, out)
            else:
                torch.matmul(x2, dequantize(qw, x.dtype).t(), out=out)
    return out.view(*x.shape[:-1], n)


def _contiguous(qw: QuantizedWeight) -> QuantizedWeight:
    if all(t.is_contiguous() for t in qw.tensors().values()):
        return qw
    return qw._map(lambda t: t.contiguous())


# ---- choosing a kernel for decode-sized M ---------------------------------------------------------------------------
# Every (M, N, K, format) up to TUNED_MAX_M rows is timed once, cold L2, against its candidates, and the first within
# TIE of the fastest is kept: the same mechanism as the dense skinny matmuls (zinfer/layers/triton_gemv.py), under the
# same switch (ZINFER_GEMV: "auto" times; "heuristic" / "off" and ranks of a multi-process job take the first).

TUNED_MAX_M = 4
MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, where the word kernel puts its N tiles
# Tiles (WORDS_TILE_KEYS) of the word kernel, in order of preference; BLOCK_W = load units
# per row and step, one unit (a word, or two with WIDE) per thread per row when BLOCK_W = 32 * num_warps, so the x
# pairs and the codes share one layout (a contiguous tile made Triton vectorize the word loads and move them through
# shared memory with barriers, seen in the TTGIR). Measured on every Llama-3-8B shape at M = 1 (H200, 2026-12-02,
# CUDA graphs): the first was the fastest or within 3% of it, int4 and int8; PREFETCH won only int8 down_proj (3%);
# BLOCK_N 4 / 16 never. The non-WIDE entries serve weights whose groups are not whole 64-bit pairs of words.
WORDS_TILE_KEYS = ("BLOCK_N", "BLOCK_W", "num_warps", "PREFETCH", "WIDE")
WORDS_TILES = [(8, 128, 4, False, True), (8, 256, 4, False, True), (8, 256, 4, True, True),
               (8, 256, 4, False, False), (8, 128, 4, False, False)]  # fmt: skip
_LAUNCH = {"words": gemv_words, "groups": gemv, "gemm": gemm, "mma": gemv_mma}
_chosen: dict[tuple, tuple[str, dict]] = {}  # timed choices
_heuristic: dict[tuple, tuple[str, dict]] = {}  # untimed ones (ZINFER_GEMV != auto, several ranks)
_timings: dict[tuple, list[tuple[str, dict, float]]] = {}


def candidates(x: torch.Tensor, qw: QuantizedWeight) -> list[tuple[str, dict]]:
    """(kernel, config) pairs worth timing for x [M, K] @ qw, the heuristic's pick first."""
    m, n = x.shape[0], qw.shape[0]
    out = []
    if x.dtype in (torch.float16, torch.bfloat16):
        kw = qw.qweight.shape[1] // 4
        tiles = [t for t in WORDS_TILES if words_ok(qw, t[4]) and triton.cdiv(n, t[0]) <= MAX_GRID_Y]  # grid axis 1
        out += [("words", _words_config(m, n, kw, tile, _sm_count(x))) for tile in tiles]
        if m > 1:  # all rows of x in one program, each code decoded once for them; one unit per thread (with two,
            # the 4-row WIDE kernel spilled registers in its offline sm_90 build)
            out += [("words", _words_config(m, n, kw, tile, _sm_count(x), triton.next_power_of_2(m)))
                    for tile in tiles if tile[1] == 32 * tile[2]]
        if m <= MMA_MAX_M and mma_ok(qw) and _has_mma(x):
            for tile in MMA_TILES:  # with the split that fills the GPU, and (when it splits) without
                cfgs = [_mma_config(n, qw, tile, _sm_count(x)), _mma_config(n, qw, tile, _sm_count(x), False)]
                out += [("mma", cfg) for cfg in cfgs[: 1 if cfgs[0] == cfgs[1] else 2]]
    if m <= GEMV_MAX_M:
        out.append(("groups", {}))
    out.append(("gemm", {}))
    return out


def choose(x: torch.Tensor, qw: QuantizedWeight) -> tuple[str, dict]:
    """The kernel for x @ qw: looked up by shape and format, so a call after the first (eager decode runs one per
    layer and token) costs a dict lookup; timed on a shape's first call in "auto" mode, else the heuristic's pick."""
    from zinfer.layers import gemv as dense

    s = qw.spec
    # the last fields: whether this tensor's alignment admits the word kernel (a view may not, where another did)
    key = (str(x.device), x.dtype, s.bits, s.group_size, s.symmetric, x.shape[0], *qw.shape, words_ok(qw),
           words_ok(qw, wide=True))  # fmt: skip
    tune = dense.MODE == "auto" and x.is_cuda and not several_ranks()
    known = _chosen.get(key) if tune else _heuristic.get(key)
    if known is not None:
        return known
    cands = candidates(x, qw)
    if not tune:
        _heuristic[key] = cands[0]
        return cands[0]
    if torch.cuda.is_current_stream_capturing():  # cannot time now; do not remember, so a later call can
        return cands[0]
    out = torch.empty(x.shape[0], qw.shape[0], dtype=x.dtype, device=x.device)
    times = [(kind, cfg, time_cold(lambda k=kind, c=cfg: _LAUNCH[k](x, qw, out, dict(c)))) for kind, cfg in cands]
    best = min(t for *_, t in times)
    _timings[key] = times
    _chosen[key] = next((kind, cfg) for kind, cfg, t in times if t <= TIE * best)
    return _chosen[key]


def tuned() -> dict[tuple, tuple[tuple[str, dict], list[tuple[str, dict, float]]]]:
    """What `choose` measured so far: key -> ((kernel, config), [(kernel, config, median ms)])."""
    return {key: (_chosen[key], _timings[key]) for key in _chosen}
