"""Where a decode step's time goes: kernel time (profiler, compiled step without the graph) against the
replayed graph's step time. Device only.
  python benchmarks/profile_decode.py [--model llama-3-8b] [--batch 1] [--quant-bits 16|8|4]
"""

import argparse

import torch

import zinfer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quant-bits", type=int, default=16)
    args = ap.parse_args()
    llm = zinfer.LLM(args.model, dummy=True, dtype="bfloat16", device="cuda", quant_bits=args.quant_bits)
    ids = [[100 + i] * 128 for i in range(args.batch)]
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
    print(f"graph replay step: median {times[25]:.3f} ms  min {times[0]:.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            state.forward()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / 3 / 1e3
    print(f"kernel time per step (no graph): {total:.3f} ms over {sum(e.count for e in events) // 3} kernels")
    events.sort(key=lambda e: -e.device_time_total)
    for e in events[:25]:
        print(f"{e.device_time_total / 3 / 1e3:8.3f} ms  {e.count // 3:5d}x  {e.key[:110]}")


if __name__ == "__main__":
    main()
