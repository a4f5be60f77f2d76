"""Dense skinny matmul (zinfer/layers/triton_gemv.py) against cuBLAS F.linear, on Llama-3-8B's decode shapes.

Run on the GPU:  python benchmarks/gemv.py [--ms 1,4,16] [--shapes qkv,o_proj,gate_up,down,lm_head] [--dtype bfloat16]
For each (shape, M): median us per call replayed in a CUDA graph, each call on its own weight copy (together the
copies span ~4x the L2, so every call reads its weight from HBM, as a decode step does; no launch overhead, as in
zinfer's graph-captured decode), for cuBLAS, the config `choose` picks (timed with do_bench, L2 flushed), and every
candidate. GB/s = (weight + x + out bytes) / time, and that as a fraction of the device-to-device copy bandwidth
(zinfer.bench.ceilings: bytes read + written). Prints a table and a batch-1 decode-step estimate (32 layers +
LM head); writes $OUT/gemv.json (or ./gemv.json). About a minute, most of it Triton compiling ~10 kernels.
--sweep also times a wider grid of tiles (for revising triton_gemv's candidate list; ~40 more compiles, so pass
fewer shapes or Ms to stay within a few minutes).
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from zinfer.bench.ceilings import get_ceilings
from zinfer.layers import triton_gemv as tg

SHAPES = {  # name: (N, K) of a Llama-3-8B weight as zinfer runs it (q/k/v and gate/up fused)
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
PER_STEP = {"qkv": 32, "o_proj": 32, "gate_up": 32, "down": 32, "lm_head": 1}  # calls per decode step


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate through so that they span ~4x a 50-60 MB L2."""
    return max(2, min(32, -(-240_000_000 // nbytes)))


def graph_time(fns, reps: int = 30) -> float:
    """Median us per call of fns (one per weight copy), captured back to back in one CUDA graph."""
    for f in fns:  # warm-up: compile, lazy init, cuBLAS heuristics
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
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    del g
    return sorted(times)[len(times) // 2]


def sweep_configs(m, n, k, n_sm):
    """A wider grid than triton_gemv.candidates: each tile with and without its split-K."""
    tiles = [("dot", bn, bk, w, s) for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for w, s in ((4, 3), (4, 6))]
    if m == 1:
        tiles += [("gemv", bn, 256 * w, w, s) for bn in (1, 2, 4, 8) for w in (2, 4, 8) for s in (1, 3)]
    out = []
    for kernel, bn, bk, w, s in tiles:
        per = tg.split_k(k, -(-n // bn), bk, n_sm)
        out += [tg.Config(kernel, bn, bk, w, s, p) for p in sorted({0, per})]
    return out


def run_case(name, n, k, m, dtype, ws, copy_bw, sweep=False):
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    nbytes = (n * k + m * k + m * n) * x.element_size()
    chosen = tg.choose(x, ws[0], None)
    cands = tg.candidates(m, n, k, tg.sm_count(x))
    extra = [c for c in sweep_configs(m, n, k, tg.sm_count(x)) if c not in cands] if sweep else []
    us = {"cublas": graph_time([lambda w=w: F.linear(x, w) for w in ws])}
    for c in cands + extra:
        us[str(c)] = graph_time([lambda w=w, c=c: tg.launch(x, w, None, c) for w in ws])
    ref = F.linear(x.float(), ws[0].float())
    y = tg.launch(x, ws[0], None, chosen).float()
    gbps = lambda t: nbytes / (t * 1e-6) / 1e9
    _, dobench = tg.tuned()[tg.tuning_key(x, ws[0], None)]
    return dict(name=name, n=n, k=k, m=m, bytes=nbytes, chosen=str(chosen), heuristic=str(cands[0]),
                us=us, us_chosen=us[str(chosen)], gbps_cublas=gbps(us["cublas"]), gbps_chosen=gbps(us[str(chosen)]),
                frac_cublas=gbps(us["cublas"]) * 1e9 / copy_bw, frac_chosen=gbps(us[str(chosen)]) * 1e9 / copy_bw,
                best=min(us, key=us.get), do_bench_us={str(c): t * 1e3 for c, t in dobench},
                max_rel_err=((y - ref).abs().max() / ref.abs().max()).item())  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ms", default="1,4,16")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--sweep", action="store_true", help="also time a wider grid of tiles")
    a = p.parse_args()
    start = time.perf_counter()
    dtype = getattr(torch, a.dtype)
    ceil = get_ceilings("cuda")
    copy_bw = ceil["device_copy_bytes_per_s"]
    print(f"device {torch.cuda.get_device_name()}, {tg.sm_count(torch.empty(0, device='cuda'))} SMs, "
          f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write; {ceil['measured_at']})")
    print("us per call, CUDA-graph replay, weights rotated past L2; frac = GB/s / copy bandwidth")
    print(f"{'case':<16}{'cuBLAS us':>10}{'GB/s':>7}{'frac':>6}{'ours us':>10}{'GB/s':>7}{'frac':>6}{'speedup':>8}"
          f"{'err':>9}  chosen (fastest in graph if different)")
    torch.manual_seed(0)
    rows = []
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        ws = [w] + [w.clone() for _ in range(copies_for(w.numel() * w.element_size()) - 1)]
        for m in (int(v) for v in a.ms.split(",")):
            r = run_case(name, n, k, m, dtype, ws, copy_bw, a.sweep)
            rows.append(r)
            best = f"  (fastest {r['best']}: {r['us'][r['best']]:.1f} us)" if r["best"] != r["chosen"] else ""
            print(f"{name + f' M={m}':<16}{r['us']['cublas']:>10.1f}{r['gbps_cublas']:>7.0f}{r['frac_cublas']:>6.2f}"
                  f"{r['us_chosen']:>10.1f}{r['gbps_chosen']:>7.0f}{r['frac_chosen']:>6.2f}"
                  f"{r['us']['cublas'] / r['us_chosen']:>7.2f}x{r['max_rel_err']:>9.1e}  {r['chosen']}{best}")
        del w, ws
        torch.cuda.empty_cache()
    step = {}
    for m in sorted({r["m"] for r in rows}):
        sel = [r for r in rows if r["m"] == m]
        if {r["name"] for r in sel} == set(SHAPES):
            cub = sum(PER_STEP[r["name"]] * r["us"]["cublas"] for r in sel) / 1e3
            ours = sum(PER_STEP[r["name"]] * r["us_chosen"] for r in sel) / 1e3
            step[m] = dict(cublas_ms=cub, ours_ms=ours)
            print(f"decode step M={m}, matmuls only (32 layers + LM head): cuBLAS {cub:.3f} ms, ours {ours:.3f} ms")
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=tg.triton.__version__,
                  dtype=a.dtype, copy_bw=copy_bw, ceilings=ceil, rows=rows, step_matmul_ms=step,
                  seconds=time.perf_counter() - start)  # fmt: skip
    path = os.path.join(os.environ.get("OUT", "."), "gemv.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
