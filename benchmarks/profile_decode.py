"""Where a decode step's time goes: kernel time (profiler, compiled step without the graph) against the
replayed graph's step time, with the kernels grouped into matmuls, attention and the rest. Device only.
  python benchmarks/profile_decode.py [--model llama-3-8b] [--batch 1] [--quant-bits 16,4,4+head,8] [--top 25]
One model per --quant-bits value, in that order; $OUT/profile_decode.json holds every kernel's time.
"""

import argparse
import gc
import json
import os

import torch
from in_gpu import variant_tag, weight_variants  # this folder: run as a script

import zinfer

# kernel-name fragments -> group; the first group whose fragment a name holds wins. cuBLAS kernels (nvjet ...) count as
# matmuls, attention's batched ones included: their names do not say which (the launch-order listing does)
GROUPS = (("matmul", ("gemv", "skinny", "gemm", "mma", "nvjet", "cutlass", "xmma", "sm90_", "splitk", "reduce_kernel")),
          ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
          ("fused elementwise", ("triton_",)))


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, parts in GROUPS if any(p in low for p in parts)), "other")


def profile(model: str, batch: int, bits: int, head: bool, top: int) -> dict:
    first, tail = 20, 8  # kernels listed from the start (the first layer) and the end (LM head, sampling) of a step
    quant = {} if bits == 16 else dict(quant_bits=bits, quant_lm_head=head)
    llm = zinfer.LLM(model, dummy=True, dtype="bfloat16", device="cuda", **quant)
    ids = [[100 + i] * 128 for i in range(batch)]
    llm.generate(ids, zinfer.SamplingParams(max_new_tokens=8, ignore_eos=True))
    state = llm.engine.state
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(50):
        start.record()
        state.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            state.forward()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    kernels = sorted(((e.key, e.device_time_total / steps, e.count // steps) for e in events), key=lambda k: -k[1])
    groups: dict[str, list[float]] = {}
    for name, us, count in kernels:
        g = groups.setdefault(group_of(name), [0.0, 0])
        g[0] += us
        g[1] += count
    total = sum(k[1] for k in kernels)
    tag = variant_tag(bits, head, 64)
    print(f"\n== {tag} batch {batch}: graph replay median {times[25]:.3f} ms, min {times[0]:.3f} ms; "
          f"kernel time without the graph {total / 1e3:.3f} ms over {sum(k[2] for k in kernels)} kernels")
    for g, (us, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"  {g:18} {us / 1e3:7.3f} ms  {count:5d} kernels  {us / max(count, 1):7.1f} us each")
    for name, us, count in kernels[:top]:
        print(f"{us / 1e3:8.3f} ms  {count:5d}x  {us / max(count, 1):7.1f} us  {name[:100]}")
    # the last profiled step's kernels in launch order: each weight's own time (names alone do not tell the layers'
    # matmuls from the LM head's, or cuBLAS GEMVs from attention's batched matmuls)
    launched = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    order = [(e.name, e.time_range.elapsed_us()) for e in launched[len(launched) - len(launched) // steps:]]
    print(f"one step's kernels in launch order, the first {first} and the last {tail}:")
    for n, us in order[:first] + [("...", 0.0)] + order[-tail:]:
        print(f"  {us:7.1f} us  {n[:100]}")
    llm.engine.release()
    del llm, state
    gc.collect()
    torch.cuda.empty_cache()
    return dict(replay_ms_median=times[25], replay_ms_min=times[0], kernel_ms=total / 1e3,
                groups={g: dict(ms=us / 1e3, count=c) for g, (us, c) in groups.items()},
                step_in_order=[dict(name=n, us=us) for n, us in order],
                kernels=[dict(name=n, us_per_step=us, count=c) for n, us, c in kernels])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quant-bits", type=weight_variants, default="16", help="as in_gpu.py's")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    results = dict(model=args.model, batch=args.batch, device=torch.cuda.get_device_name(), runs={})
    for bits, head in args.quant_bits:
        results["runs"][variant_tag(bits, head, 64)] = profile(args.model, args.batch, bits, head, args.top)
    with open(os.path.join(os.environ.get("OUT", "."), "profile_decode.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
