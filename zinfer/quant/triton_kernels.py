"""Fused dequantize-matmul Triton kernels: out [M, N] = x [M, K] @ dequantize(qw).T (layout: pack.py).

Imported only on CUDA machines with Triton (ops.py imports it lazily).

Dispatch by M = rows of x (thresholds measured on an H100, benchmarks/quant_kernels.py):
  M <= GEMV_MAX_M            GEMV kernel: CUDA cores, fp32. A tile is [BLOCK_N rows, GROUPS
                             groups, GB bytes of one group], so scale and zero are one load per
                             (row, group), and the scale is factored out of the group sum:
                             sum_k x_k (q_k s + z) = s * sum_k x_k q_k + z * sum_k x_k. 4-bit bytes
                             split into low / high nibbles meet the even / odd elements of x.
  M <  DEQUANT_MIN_M         GEMM kernel: weight tile [BLOCK_N, BLOCK_K] dequantized in
                             registers, tl.dot (tensor cores) with an fp32 accumulator. Fixed
                             config with split-K up to SMALL_M (few tiles cannot fill the GPU),
                             autotuned above.
  M >= DEQUANT_MIN_M         compute-bound: dequantize the layer with a Triton kernel into a
                             scratch [N, K] and use cuBLAS, whose matmul outruns the fused one.
Split-K writes fp32 partials, reduced by torch. Codes become floats by the 2^23 trick, not I2F
(a quarter-rate instruction that bounded the kernels). Autotuning benchmarks on a shape's first
call: warm up before capturing a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

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
        out.copy_(part.sum(0))


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
        out.copy_(part.sum(0))


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
            if m <= GEMV_MAX_M:
                gemv(x2, qw, out)
            elif m < DEQUANT_MIN_M:
                gemm(x2, qw, out)
            else:
                torch.matmul(x2, dequantize(qw, x.dtype).t(), out=out)
    return out.view(*x.shape[:-1], n)


def _contiguous(qw: QuantizedWeight) -> QuantizedWeight:
    if all(t.is_contiguous() for t in qw.tensors().values()):
        return qw
    return qw._map(lambda t: t.contiguous())
