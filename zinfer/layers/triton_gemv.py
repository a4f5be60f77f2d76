"""Dense skinny matmul for decode: out [M, N] = x [M, K] @ W.T (+ bias), W [N, K] as nn.Linear holds it, M <= 16.

Imported only where Triton is (gemv.py imports it lazily). At decode sizes the matmul is a stream over W: every
weight byte is read once and used for M multiply-adds, so time = weight bytes / HBM bandwidth when the kernel keeps
enough loads in flight. cuBLAS's M = 1 GEMV reached ~3.1 of the H200's 4.2 TB/s copy ceiling (BENCHMARKS.md).

Two kernels, both reading W in [BLOCK_N rows, BLOCK_K] tiles with 16-byte vector loads along K:
  _gemv_kernel (M = 1)   CUDA cores, fp32. Each thread keeps its elementwise products in an fp32 [BN, BK]
                         accumulator; the K reduction happens once, after the loop (no cross-thread traffic
                         per tile). Few rows per program (2-8) give 500+ programs for N >= 4096.
  _skinny_kernel (M<=16) tensor cores: acc [BN, 16] = W_tile @ x_tile.T with fp32 accumulation (W is the A
                         operand, so BN >= 64 can use Hopper's wgmma); x is padded to 16 rows by clamping row
                         indices (padded rows are computed and not stored).
The main K loop is unmasked (clamped row indices instead of row masks), so every load vectorises; the ragged end of K
is one masked step after the loop. With NUM_STAGES > 1 the loop is software-pipelined (loads into shared memory, a
few tiles in flight per program).

Split-K, when N / BLOCK_N programs cannot fill the GPU: each split writes fp32 partials [S, M, N]; one reduction
kernel sums them in split order, adds the bias and rounds once: deterministic (no atomics).

Programmatic dependent launch (Hopper on): a kernel may start while the kernel before it in the stream is still
finishing. The GEMVs load their first weight tile (in a forward pass the kernel just before a matmul never writes
its weights), then wait for the previous kernel (`gdc_wait`: it has finished and its writes are visible), then read
x; after the wait they let the next kernel launch early. So a GEMV's first loads overlap the tail of the norm or
activation kernel before it instead of starting after it. The switch, ZINFER_PDL, is gemv.py's.

Choosing a config: `candidates()` lists a handful per (M bucket, N, K), the heuristic's pick first. In "auto" mode
`choose()` times each (and cuBLAS, listed last) once per key with a cold L2, as decode reads weights cold, and keeps
the first candidate within TIE of the fastest: a timing wobble between near-equal configs does not flip the choice.
Timing happens on the first call of a shape, which must come before CUDA-graph capture (decode warms up first); a
call during capture that finds no choice uses the heuristic's.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from zinfer.layers.gemv import PDL_WANTED, pdl_supported

TIE = 1.02  # candidates within 2% of the fastest count as tied; the earlier (heuristic-preferred) one wins


def pdl(x: torch.Tensor) -> bool:
    """Whether kernels reading x launch with programmatic dependent launch (ZINFER_PDL on, CUDA, sm_90 or newer)."""
    return PDL_WANTED and x.is_cuda and pdl_supported(x.device.index if x.device.index is not None
                                                      else torch.cuda.current_device())


def launch_options(x: torch.Tensor) -> dict:
    """The launch arguments of a kernel that takes a `PDL` constexpr: PDL itself, and Triton's launch flag."""
    on = pdl(x)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_previous(PDL: tl.constexpr):
    """Under dependent launch: wait until the kernel before has finished (its writes visible), then let the
    kernel after launch. Everything a kernel reads that an earlier kernel wrote must be read after this."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, N, K, K_PER_SPLIT, stride_wn, stride_os,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # x [K] (one row, unit stride); w [N, K] (unit column stride); out [SPLITS, N] (x's dtype when one split)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_n, N - 1)  # clamped, not masked: the loop's loads stay unpredicated
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    k_full = k_start + (k_end - k_start) // BLOCK_K * BLOCK_K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_loop = k_start
    if PDL:  # the first tile's weights are loaded before waiting for the kernel that wrote x
        if k_full > k_start:
            kk = k_start + offs_k
            w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")
            wait_previous(PDL)
            acc += w.to(tl.float32) * tl.load(x_ptr + kk).to(tl.float32)[None, :]
            k_loop += BLOCK_K
        wait_previous(PDL)  # (again: returns at once) no full tile
    for k0 in tl.range(k_loop, k_full, BLOCK_K, num_stages=NUM_STAGES):
        kk = k0 + offs_k
        w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")  # read once: keep x, not W, in L2
        x = tl.load(x_ptr + kk)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if k_full < k_end:  # ragged end of K (the last split only)
        kk = k_full + offs_k
        k_mask = kk < k_end
        w = tl.load(w_rows + kk[None, :], mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + kk, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    res = tl.sum(acc, axis=1)  # [BN]
    if HAS_BIAS:
        res += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_s * stride_os + offs_n, res.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, K_PER_SPLIT, stride_xm, stride_wn, stride_os, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # x [M, K], w [N, K] (unit column strides); out [SPLITS, M, N] (x's dtype when one split)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None] * stride_xm  # [BM, 1]
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    k_full = k_start + (k_end - k_start) // BLOCK_K * BLOCK_K
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    wait_previous(PDL)
    for k0 in tl.range(k_start, k_full, BLOCK_K, num_stages=NUM_STAGES):
        kk = k0 + offs_k
        w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")  # [BN, BK]
        x = tl.load(x_rows + kk[None, :])  # [BM, BK]
        acc = tl.dot(w, tl.trans(x), acc)  # [BN, BM], fp32
    if k_full < k_end:
        kk = k_full + offs_k
        k_mask = (kk < k_end)[None, :]
        w = tl.load(w_rows + kk[None, :], mask=k_mask, other=0.0, eviction_policy="evict_first")
        x = tl.load(x_rows + kk[None, :], mask=k_mask, other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


@triton.jit
def _reduce_kernel(part_ptr, b_ptr, out_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # part fp32 [SPLITS, M, N] -> out [M, N] (contiguous): the splits summed in order, plus the bias, rounded once
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Config:
    """One way to run the matmul. kernel: "gemv" (M = 1, CUDA cores), "dot" (tensor cores) or "cublas"."""

    kernel: str
    block_n: int = 0
    block_k: int = 0
    num_warps: int = 4
    num_stages: int = 1
    k_per_split: int = 0  # 0: no split

    def __str__(self) -> str:
        if self.kernel == "cublas":
            return "cublas"
        split = f" k/split={self.k_per_split}" if self.k_per_split else ""
        return f"{self.kernel} BN={self.block_n} BK={self.block_k} w={self.num_warps} s={self.num_stages}{split}"


# (kernel, BLOCK_N, BLOCK_K, num_warps, num_stages), in order of preference (first guesses, not yet measured:
# benchmarks/gemv.py times them all). gemv tiles are one K sweep of the whole program wide, BLOCK_K = 8 elements
# (16 bytes) x 32 lanes x num_warps, so x's [BLOCK_K] vector has the same thread layout as a row of the W tile; any
# other width made Triton move x through shared memory, with two barriers, on every step (seen in the PTX).
_GEMV_TILES = [("gemv", 4, 1024, 4, 1), ("gemv", 8, 1024, 4, 1), ("gemv", 8, 512, 2, 1), ("gemv", 8, 1024, 4, 3),
               ("gemv", 2, 2048, 8, 1)]  # fmt: skip
_DOT_TILES = [("dot", 64, 128, 4, 4), ("dot", 32, 128, 4, 4), ("dot", 128, 64, 4, 4), ("dot", 16, 256, 2, 4)]
DOT_BLOCK_M = 16  # tl.dot's smallest tile; x rows are padded to it


def m_bucket(m: int) -> int:
    return triton.next_power_of_2(m)


def split_k(k: int, tiles: int, block_k: int, n_sm: int) -> int:
    """K per split (a multiple of block_k; 0 for no split): enough programs for ~2 per SM, while each split still
    loops over >= 4 tiles of K (shorter splits spend more on partials and their reduction than they gain)."""
    if tiles >= n_sm:
        return 0
    splits = min(-(-2 * n_sm // tiles), k // (4 * block_k))
    if splits <= 1:
        return 0
    per = -(-k // splits)
    return -(-per // block_k) * block_k


def candidates(m: int, n: int, k: int, n_sm: int) -> list[Config]:
    """Configs worth timing for this shape, the heuristic's pick first. A tile whose programs cannot fill the GPU
    is listed with its split-K and, after it, without (one launch, fewer programs)."""
    tiles = _GEMV_TILES + _DOT_TILES if m == 1 else _DOT_TILES
    out = []
    for kernel, bn, bk, w, s in tiles:
        bk = min(bk, max(16, triton.next_power_of_2(k)))  # tiny K: no tile wider than K
        per = split_k(k, triton.cdiv(n, bn), bk, n_sm)
        out.append(Config(kernel, bn, bk, w, s, per))
        if per:
            out.append(Config(kernel, bn, bk, w, s, 0))
    return out


def launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cfg: Config) -> torch.Tensor:
    """out [M, N] in x's dtype. x [M, K] and w [N, K] with unit column strides."""
    if cfg.kernel == "cublas":
        return F.linear(x, w, bias)
    (m, k), n = x.shape, w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    per = cfg.k_per_split or k
    splits = triton.cdiv(k, per)
    part = out.unsqueeze(0) if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    b = bias if bias is not None else w  # a pointer the kernel never reads
    on_kernel = bias is not None and splits == 1
    grid = (triton.cdiv(n, cfg.block_n), splits)
    meta = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **launch_options(x))
    if cfg.kernel == "gemv":
        if m != 1:
            raise ValueError(f"the gemv kernel takes one row of x, got M={m}")
        _gemv_kernel[grid](x, w, b, part, n, k, per, w.stride(0), part.stride(0), HAS_BIAS=on_kernel, **meta)
    elif cfg.kernel == "dot":
        _skinny_kernel[grid](
            x, w, b, part, m, n, k, per, x.stride(0), w.stride(0), part.stride(0), part.stride(1),
            HAS_BIAS=on_kernel, BLOCK_M=max(DOT_BLOCK_M, triton.next_power_of_2(m)), **meta,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown kernel {cfg.kernel!r}; expected 'gemv', 'dot' or 'cublas'")
    if splits > 1:
        reduce_splits(part, out, bias)
    return out


def reduce_splits(part: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """out [M, N] (contiguous) = fp32 split partials [S, M, N] summed in split order (+ bias), rounded once."""
    mn, block = out.numel(), 1024
    _reduce_kernel[(triton.cdiv(mn, block),)](part, bias if bias is not None else out, out, mn, out.shape[-1],
                                              part.shape[0], HAS_BIAS=bias is not None, BLOCK=block)  # fmt: skip


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(x: torch.Tensor) -> int:
    return _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 8


_chosen: dict[tuple, Config] = {}  # (device, dtype, bias?, M bucket, N, K) -> the config chosen by timing
_timings: dict[tuple, list[tuple[Config, float]]] = {}  # same key -> every candidate's median ms


def tuning_key(x, w, bias) -> tuple:
    return (str(x.device), x.dtype, bias is not None, m_bucket(x.shape[0]), w.shape[0], x.shape[1])


SPIN_CYCLES = 400_000  # ~0.2 ms at Hopper's clock: several times any candidate's Python launch cost


def time_cold(fn, reps: int = 15) -> float:
    """Median ms of fn's GPU time with a cold L2 (a 256 MB write before each run: decode reads every weight from
    HBM, and a 4096 x 4096 bf16 weight would otherwise stay in the 50-60 MB L2 between runs). Each run waits
    behind a spin kernel, so all of fn's launches are queued before its first kernel starts, as they are when
    decode replays a CUDA graph: timed around bare launches, a 10 us kernel measured its ~30-50 us of Python
    launch cost, and a candidate with two launches (split-K + reduction) paid it twice."""
    fn()  # compile
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        torch.cuda._sleep(SPIN_CYCLES)  # private PyTorch API: a kernel that spins N cycles
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[reps // 2]


def several_ranks() -> bool:
    """Whether this process is one of several torch.distributed ranks. Tensor-parallel ranks compute replicated
    layers (the LM head, an MoE router) each on their own and must get bitwise the same result, so they must run
    the same kernel: timing on each rank could pick differently (a 2% tie, noise), so they take the heuristic
    choice, which depends on the shape alone."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def choose(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, tune: bool = True) -> Config:
    (m, k), n = x.shape, w.shape[0]
    cands = candidates(m, n, k, sm_count(x))
    if not tune or not x.is_cuda or several_ranks():
        return cands[0]
    key = tuning_key(x, w, bias)
    if key in _chosen:
        return _chosen[key]
    if torch.cuda.is_current_stream_capturing():  # cannot time now; do not remember, so a later call can
        return cands[0]
    times = [(c, time_cold(lambda c=c: launch(x, w, bias, c))) for c in cands + [Config("cublas")]]
    best = min(t for _, t in times)
    _timings[key] = times
    _chosen[key] = next(c for c, t in times if t <= TIE * best)
    return _chosen[key]


def tuned() -> dict[tuple, tuple[Config, list[tuple[Config, float]]]]:
    """What `choose` measured so far: key -> (choice, [(candidate, median ms)])."""
    return {key: (_chosen[key], _timings[key]) for key in _chosen}


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, tune: bool = True) -> torch.Tensor:
    """x [M, K] (M <= 16) @ w.T (+ bias) -> [M, N] contiguous, in x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    if x.shape[0] == 0:
        return torch.empty(0, w.shape[0], dtype=x.dtype, device=x.device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return launch(x, w, bias, choose(x, w, bias, tune))

