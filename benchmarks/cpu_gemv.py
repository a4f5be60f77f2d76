"""CPU decode matmuls: MKL's F.linear against the reduction torch.compile generates from `gemv.linear`
(zinfer/layers/gemv.py, `traced_as_reduction`), on SmolLM2-135M's fp32 decode shapes.

python benchmarks/cpu_gemv.py [--ms 1,2,4,8]
For each (shape, M): best-of-3 us per call, each call on its own weight copy (the copies span ~300 MB, so every call
reads its weight from DRAM, as a decode step does), GB/s of weight bytes, and in the same run a plain fp32 sum over
280 MB (the rate the DRAM streams to these cores). Prints one JSON line per row.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from zinfer.layers import gemv

SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}


def best_us(fn, x, weights) -> float:
    for w in weights:  # compile, warm
        fn(x, w)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        for w in weights:
            fn(x, w)
        runs.append(time.perf_counter() - start)
    return min(runs) / len(weights) * 1e6


def sum_rate() -> float:
    a = torch.randn(70_000_000)
    a.sum()
    start = time.perf_counter()
    a.sum()
    return a.nbytes / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,2,4,8")
    args = ap.parse_args()
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                      "sum_GB_s": round(sum_rate() / 1e9, 1)}))
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k) for _ in range(max(1, int(300e6 // (n * k * 4))))]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k)
            torch._dynamo.reset()  # one compile per case: no recompile limit, no eager fallback
            compiled = torch.compile(gemv.linear, dynamic=False)
            mkl, ours = best_us(F.linear, x, weights), best_us(compiled, x, weights)
            torch.testing.assert_close(compiled(x, weights[0]), F.linear(x, weights[0]), rtol=1e-4, atol=1e-4)
            rate = {f"{who}_GB_s": round(n * k * 4 / us / 1e3, 1) for who, us in (("mkl", mkl), ("zinfer", ours))}
            print(json.dumps({"shape": name, "N": n, "K": k, "M": m, "mkl_us": round(mkl), "zinfer_us": round(ours),
                              **rate, "reduction": m <= gemv.CPU_REDUCTION_ROWS, "speedup": round(mkl / ours, 2)}))
    print(json.dumps({"sum_GB_s_after": round(sum_rate() / 1e9, 1)}))


if __name__ == "__main__":
    main()
