"""Fused int4/int8 dequantize-matmul vs bf16 matmul vs dequantize-then-matmul, on Llama-3-8B shapes.

Run on the GPU:  python benchmarks/quant_kernels.py [--bits 4] [--ms 1,16,512] [--sweep]
Prints a table (median ms via triton.testing.do_bench, L2 flushed before each run) with achieved
GB/s = (packed weight + x + out bytes) / time, and the floor of that traffic at the measured copy
bandwidth. Writes $OUT/quant_kernels.json when OUT is set. --sweep times kernel configs around
the built-in heuristics (for tuning them), printing the best per case. For int4 with bf16 x, PyTorch's own int4
weight-only matmul (tinygemm, torch.ops.aten._weight_int4pack_mm) is timed on the same weights, repacked.
"""

import argparse
import json
import os

import torch
import triton
from triton.testing import do_bench

from zinfer.quant import triton_kernels as tk
from zinfer.quant.ops import quant_matmul
from zinfer.quant.pack import dequantize, quantize
from zinfer.quant.spec import QuantSpec

SHAPES = {  # name: (N, K) of a Llama-3-8B Linear weight
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}


def bench(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")  # ms


def graph_time(fns, reps: int = 30) -> float:
    """Median ms per call of fns (each on its own weight copy, so together they overflow L2 and
    every call reads its weight from DRAM, as a decode step does), replayed as one CUDA graph:
    no launch overhead, as in zinfer's graph-captured decode."""
    for f in fns:  # warm-up: compile, autotune
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    del g
    return sorted(times)[len(times) // 2]


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate through so that they span ~4x a 50 MB L2."""
    return max(2, min(32, -(-200_000_000 // nbytes)))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / (bench(lambda: b.copy_(a)) * 1e-3)


def make_weights(n, k, spec, dtype, dense=False):
    w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
    qws = [quantize(w, spec) for _ in range(copies_for(quantize(w[:1], spec).nbytes * n))]
    ws = [w.clone() for _ in range(copies_for(w.numel() * w.element_size()))] if dense else []
    return qws, ws


def tinygemm_pack(qw, inner_k_tiles: int = 8):
    """zinfer's int4 layout -> PyTorch's tinygemm layout (torch.ops.aten._weight_int4pack_mm, gpt-fast's int4
    kernel): codes packed high nibble first and tiled by _convert_weight_to_int4pack; scales and zeros bf16
    [K/G, N, 2] for w = (q - 8) * scale + zero', so zero' = zero + 8 * scale (0 when symmetric)."""
    from zinfer.quant.pack import unpack

    codes = unpack(qw.qweight, 4)
    packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, 0::2] << 4) | codes[:, 1::2], inner_k_tiles)
    zero = qw.zero + 8 * qw.scale if qw.zero is not None else torch.zeros_like(qw.scale)
    sz = torch.stack([qw.scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def tinygemm_times(x, qws, ref):
    """{inner_k_tiles: (graph ms, relative error)} of torch's int4 weight-only matmul on the same weights, or
    the reason it cannot run."""
    if x.dtype != torch.bfloat16 or qws[0].spec.bits != 4 or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "needs bf16 x, int4 and torch.ops.aten._weight_int4pack_mm"
    g, res, mm = qws[0].spec.group_size, {}, torch.ops.aten._weight_int4pack_mm
    for tiles in (2, 4, 8):
        try:
            packs = [tinygemm_pack(q, tiles) for q in qws]
            y = mm(x, packs[0][0], g, packs[0][1]).float()
            res[tiles] = (graph_time([lambda p=p: mm(x, p[0], g, p[1]) for p in packs]),
                          ((y - ref).norm() / ref.norm()).item())  # fmt: skip
        except RuntimeError as e:  # shape or version limits of the op
            res[tiles] = str(e).splitlines()[0]
    return res


def run_case(name, n, k, m, spec, dtype, bw):
    qws, ws = make_weights(n, k, spec, dtype, dense=True)
    qw, w = qws[0], ws[0]
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    io = (m * k + m * n) * x.element_size()
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    t = {
        "torch_mm": graph_time([lambda w=w: x @ w.t() for w in ws]),
        "dequant_then_mm": graph_time([lambda q=q: x @ dequantize(q, dtype).t() for q in qws[:2]]),
        "triton_dequant_then_mm": graph_time([lambda q=q: x @ tk.dequantize(q, dtype).t() for q in qws]),
        "gemm_kernel": graph_time([lambda q=q: tk.gemm(x, q, out) for q in qws]) if m > 1 else float("nan"),
        "fused": graph_time([lambda q=q: quant_matmul(x, q) for q in qws]),
        "fused_eager": bench(lambda: quant_matmul(x, qw)),
    }
    ref = x.float() @ dequantize(qw, torch.float32).t()
    rel = ((quant_matmul(x, qw).float() - ref).norm() / ref.norm()).item()
    tiny = tinygemm_times(x, qws, ref)
    best = getattr(tk._gemm_tuned, "best_config", None) if m > tk.SMALL_M else None  # of the gemm_kernel run
    tuned = {key[5:8]: v for key, v in tk.tuned().items() if key[1] == dtype and key[2] == spec.bits}
    chosen, cands = tuned.get((m, n, k), (None, []))  # M <= TUNED_MAX_M: every candidate kernel, timed cold
    row = dict(name=name, n=n, k=k, m=m, bits=spec.bits, group=spec.group_size, symmetric=spec.symmetric,
               packed_bytes=qw.nbytes, rel_err=rel, ms=t, gemm_config=str(best) if best else None,
               chosen=list(chosen) if chosen else None,
               candidates_us=[(kind, cfg, ms * 1e3) for kind, cfg, ms in cands],
               # the same candidates replayed in a CUDA graph over rotated weight copies, as decode runs them: the
               # tuner's cold timings include each launch's Python cost, which can exceed these kernels' GPU time
               candidates_graph_us=[(kind, cfg, 1e3 * graph_time(
                   [lambda q=q, kind=kind, cfg=cfg: tk._LAUNCH[kind](x, q, out, dict(cfg)) for q in qws]))
                   for kind, cfg, _ in cands],
               tinygemm=tiny,
               gbps_fused=(qw.nbytes + io) / (t["fused"] * 1e-3) / 1e9,
               gbps_torch_mm=(w.numel() * w.element_size() + io) / (t["torch_mm"] * 1e-3) / 1e9,
               floor_ms=(qw.nbytes + io) / bw * 1e3,  # bytes over the copy bandwidth (read + write)
               # the best any dequantize-then-matmul could do: write the dense weight once, then matmul
               deq_mm_floor_ms=t["torch_mm"] + (qw.nbytes + w.numel() * w.element_size()) / bw * 1e3,
               tflops_fused=2 * m * n * k / (t["fused"] * 1e-3) / 1e12)  # fmt: skip
    return row


def sweep(n, k, m, spec, dtype, kinds=("groups", "words", "gemm")):
    """Graph-timed kernel configs around the heuristics: [(config, ms)], fastest first; kinds picks the kernels."""
    qws, _ = make_weights(n, k, spec, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    out = torch.empty(m, n, device="cuda", dtype=dtype)
    n_sm = tk._sm_count(x)
    cfgs = []
    if m <= 4 and "groups" in kinds:
        gb = triton.next_power_of_2(spec.group_size) // spec.per_byte
        ngroups = qws[0].padded_k // spec.group_size
        for block_n in (2, 4, 8) if m == 1 else (4, 8):
            for tile in (1024, 2048, 4096) if m == 1 else (2048,):
                groups = min(ngroups, max(1, tile // (block_n * gb)))
                per = tk._split(ngroups, triton.cdiv(n, block_n), n_sm, groups)
                cfgs.append((tk.gemv, dict(BLOCK_N=block_n, GROUPS=groups, GROUPS_PER_SPLIT=per)))
    if m <= 4 and "words" in kinds:
        kw = qws[0].qweight.shape[1] // 4  # the word kernel over a wider grid of tiles than the tuner's list
        for wide in (False, True) if tk.words_ok(qws[0]) else ():
            for bn in (2, 4, 8, 16) if tk.words_ok(qws[0], wide) else ():
                for warps in (2, 4, 8):
                    for bw in (32 * warps, 64 * warps):
                        for prefetch in (False, True):
                            tile = (bn, bw, warps, prefetch, wide)
                            cfgs.append((tk.gemv_words, tk._words_config(m, n, kw, tile, n_sm)))
    bm = max(16, triton.next_power_of_2(m))
    for swap in (False, True) if "gemm" in kinds else ():
        for bn in (64, 128):
            for bk in (64, 128):
                for warps in (4, 8):
                    for split in (True, False):
                        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
                        per = tk._split(qws[0].padded_k, tiles, n_sm, bk) if split else qws[0].padded_k
                        cfgs.append((tk.gemm, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, K_PER_SPLIT=per, SWAP_AB=swap,
                                                   num_warps=warps, num_stages=3, GROUP_SIZE_M=1)))  # fmt: skip
    res = [("heuristic", graph_time([lambda q=q: quant_matmul(x, q) for q in qws]))]
    for fn, cfg in cfgs:
        ms = graph_time([lambda q=q, fn=fn, cfg=cfg: fn(x, q, out, cfg=dict(cfg)) for q in qws])
        res.append((f"{fn.__name__} {cfg}", ms))
    return sorted(res, key=lambda r: r[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="4,8")
    p.add_argument("--ms", default="1,2,4,16,64,128,256,512")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--symmetric", action="store_true")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--sweep", action="store_true", help="time kernel configs instead of the table")
    p.add_argument("--sweep-kinds", default="groups,words,gemm", help="kernels the sweep times")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    ms = [int(v) for v in a.ms.split(",")]
    specs = [QuantSpec(int(b), 64, 1, a.symmetric) for b in a.bits.split(",")]
    shapes = [(s, *SHAPES[s]) for s in a.shapes.split(",")]
    torch.manual_seed(0)
    if a.sweep:
        report = {}
        for spec in specs:
            for name, n, k in shapes:
                for m in ms:
                    res = sweep(n, k, m, spec, dtype, a.sweep_kinds.split(","))
                    heur = next(t for c, t in res if c == "heuristic")
                    print(f"int{spec.bits} {name} M={m}: heuristic {heur * 1e3:.1f} us; best:")
                    for cfg, t in res[:3]:
                        print(f"    {t * 1e3:8.1f} us  {cfg}")
                    report[f"int{spec.bits}-{name}-m{m}"] = res
        _write(report, "quant_kernels_sweep.json")
        return
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s (read+write)")
    print("median us per call, CUDA-graph replay, weights rotated past L2 (fused_eager: one eager call)")
    print("deq+mm: torch dequantize; tdeq+mm: Triton dequantize kernel; gemm: the fused GEMM kernel forced")
    print(f"{'case':<22}{'torch_mm':>10}{'deq+mm':>10}{'tdeq+mm':>10}{'gemm':>10}{'fused':>10}{'eager':>10}"
          f"{'floor':>10}{'fused GB/s':>12}{'vs deq+mm':>10}{'vs tdeq':>8}{'vs mm':>8}{'rel_err':>9}")  # fmt: skip
    rows = []
    for spec in specs:
        for name, n, k in shapes:
            for m in ms:
                r = run_case(name, n, k, m, spec, dtype, bw)
                rows.append(r)
                print(_fmt_row(f"int{spec.bits} {name} M={m}", r), r["gemm_config"] or "")
                for (kind, cfg, us), (_, _, graph_us) in zip(r["candidates_us"], r["candidates_graph_us"]):
                    mark = "   <- chosen" if [kind, cfg] == r["chosen"] else ""
                    print(f"    {us:8.1f} us cold  {graph_us:8.1f} us in a graph  {kind} {cfg}{mark}")
                tiny = r["tinygemm"]
                for tiles, v in tiny.items() if isinstance(tiny, dict) else []:
                    print(f"    tinygemm inner_k_tiles={tiles}: " +
                          (f"{v[0] * 1e3:8.1f} us in a graph, rel err {v[1]:.1e}" if isinstance(v, tuple) else v))
    _write(dict(device=torch.cuda.get_device_name(), copy_bw=bw, dtype=a.dtype, rows=rows), "quant_kernels.json")


def _fmt_row(label, r):
    t, us = r["ms"], lambda ms: f"{ms * 1e3:>9.1f}u"
    return (
        f"{label:<22}{us(t['torch_mm'])}{us(t['dequant_then_mm'])}{us(t['triton_dequant_then_mm'])}"
        f"{us(t['gemm_kernel'])}{us(t['fused'])}{us(t['fused_eager'])}{us(r['floor_ms'])}{r['gbps_fused']:>12.0f}"
        f"{t['dequant_then_mm'] / t['fused']:>9.2f}x{t['triton_dequant_then_mm'] / t['fused']:>7.2f}x"
        f"{t['torch_mm'] / t['fused']:>7.2f}x{r['rel_err']:>9.1e}"
    )


def _write(obj, fname):
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, fname), "w") as f:
            json.dump(obj, f, indent=1)
        print(f"wrote {os.path.join(out, fname)}")


if __name__ == "__main__":
    main()
