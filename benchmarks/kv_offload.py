"""KV cache offload, the ZeRO-Inference README's hard case: OPT-66B dummy weights, int4 group 64, streamed from
pinned CPU memory, prompt 512, 32 new tokens, a 24 GiB GPU.

A batch-size sweep, four ways: the KV cache on the GPU ("gpu-cache"), and offloaded to pinned CPU memory with
async writes, decode attention on the GPU after a per-layer prefetch ("offload-gpu-attn"), on the CPU
("offload-cpu-attn", compiled on the CPU; "offload-cpu-attn-eager" as before 2026-12-03), or split between the two,
the planner choosing the rows each takes ("offload-split"). Each row records
run_generation's metrics (total throughput = B·G / total latency,
decode = B·(G-1) / decode latency, prefill = B·P / prefill latency), peak GPU memory, and what the planner's
cost model would pick ("auto_pick"). Per case: the largest batch that ran, and the planner's `max_batch`.

"A 24 GiB GPU" (--gpu-memory): the process is capped at 24 GiB with set_per_process_memory_fraction, so the
cache-on-GPU case runs out where a 24 GiB card would. Weights are streamed like ZeRO-3 offload: every layer
from pinned CPU memory (--weights-gpu-memory keeps as many resident as that budget allows instead).

Run on the device (each call at most 10 minutes: the sweep stops at --time-budget and saves what it has;
results merge into .out/kv_offload.json across calls while the machine stays warm, and are copied to $OUT):
    python benchmarks/kv_offload.py --cases gpu-cache
    python benchmarks/kv_offload.py --cases offload-gpu-attn,offload-cpu-attn --batches 8,32,64
Writes $OUT/kv_offload.json and $OUT/kv_offload.png.
"""

import argparse
import gc
import json
import os
import shutil
import time

import torch

import zinfer
from zinfer.bench.ceilings import get_ceilings
from zinfer.bench.plot import format_table, plot_sweep
from zinfer.config import EngineConfig, parse_bytes
from zinfer.errors import InputError
from zinfer.offload.plan import Bandwidths, free_host_bytes, kv_policy, kv_shape, max_batch
from zinfer.runtime.generator import Generator
from zinfer.weights.loader import build_empty
from zinfer.weights.source import resolve

MODEL, PROMPT, GEN = "opt-66b", 512, 32
FALLBACK_MODELS = ("opt-30b", "opt-13b")  # fp16 when int4 is unavailable and OPT-66B does not fit in host memory
CASES = {
    "gpu-cache": dict(kv_offload=False),
    "offload-gpu-attn": dict(kv_offload=True, kv_attention="gpu", pin_kv_cache=True, async_kv_offload=True),
    "offload-cpu-attn": dict(kv_offload=True, kv_attention="cpu", pin_kv_cache=True, async_kv_offload=True),
    # the batch split between the two: the planner's rows on the GPU, the rest on the CPU, at once
    "offload-split": dict(kv_offload=True, kv_attention="split", pin_kv_cache=True, async_kv_offload=True),
    # attention on the CPU as before 2026-12-03: eager matmuls over fp32 copies (compiled is the default on a GPU)
    "offload-cpu-attn-eager": dict(kv_offload=True, kv_attention="cpu", pin_kv_cache=True, async_kv_offload=True,
                                   compile=False),
}
BATCHES = {"gpu-cache": [1, 4, 8, 16, 24, 32, 48, 64],
           "offload-gpu-attn": [1, 8, 16, 32, 48, 64, 96, 128],
           "offload-cpu-attn": [1, 8, 16, 32, 48, 64, 96, 128],
           "offload-split": [8, 16, 32, 48, 64, 96, 128],
           "offload-cpu-attn-eager": [16]}
STATE = os.path.join(".out", "kv_offload.json")  # ignored by git; survives between calls on a warm machine


def cap_gpu(nbytes: int) -> None:
    """Behave like a GPU of `nbytes`: the caching allocator raises OutOfMemoryError beyond it."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total))


def fp16_bytes(name: str) -> int:
    return sum(p.numel() for p in build_empty(resolve(name).config).parameters()) * 2


def load(args, notes: list[str]):
    """OPT-66B int4 streamed from pinned CPU; fp16 (and a smaller OPT if 66B does not fit) when int4 is missing."""
    common = dict(dummy=True, dtype="float16", device="cuda", offload="cpu", gpu_memory=args.weights_gpu_memory)
    try:
        return args.model, 4, zinfer.LLM(args.model, quant_bits=4, quant_group_size=64, **common)
    except InputError as err:
        if "not implemented yet" not in str(err):
            raise
        notes.append(f"int4 weights unavailable ({err}): fp16 weights instead")
    name = args.model
    for smaller in FALLBACK_MODELS:
        if fp16_bytes(name) < 0.6 * free_host_bytes():
            break
        notes.append(f"{name} in fp16 ({fp16_bytes(name) / 2**30:.0f} GiB) does not fit in host memory "
                     f"({free_host_bytes() / 2**30:.0f} GiB free): {smaller} instead")
        name = smaller
    return name, 16, zinfer.LLM(name, **common)


def use_case(llm, case: str, bandwidths: Bandwidths) -> None:
    """Point the LLM at a generator with this case's KV placement (the weights stay loaded)."""
    llm.engine.release()
    gc.collect()
    torch.cuda.empty_cache()
    opts = dict(CASES[case])
    compile_attention = opts.pop("compile", None)
    options = EngineConfig(offload="cpu", **opts)
    llm.engine = Generator(llm.model, llm.device, llm.dtype, compile=False,
                           kv=kv_policy(options, llm.device, llm.plan, bandwidths, compile=compile_attention))


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 32000), (batch, PROMPT), generator=g).tolist()


def run(llm, case: str, batch: int, gen: int, auto) -> dict:
    row = dict(case=case, batch_size=batch)
    torch.cuda.reset_peak_memory_stats()
    try:
        llm.generate(prompts(batch, llm.config.vocab_size), zinfer.SamplingParams(max_new_tokens=gen, ignore_eos=True))
    except (torch.OutOfMemoryError, InputError) as err:  # the batch does not fit: the sweep of this case ends
        llm.engine.release()
        reset_streamer(llm)
        gc.collect()
        torch.cuda.empty_cache()
        return dict(row, status="oom" if isinstance(err, torch.OutOfMemoryError) else "refused",
                    error=str(err).splitlines()[0][:300])
    t = llm.last_timings
    choice = llm.engine.kv_choice
    return dict(row, status="ok", prefill_s=t.prefill, total_s=t.total,
                prefill_throughput=batch * PROMPT / t.prefill,
                decode_throughput=batch * (gen - 1) / max(t.total - t.prefill, 1e-10),
                total_throughput=batch * gen / t.total,
                decode_step_ms=(t.total - t.prefill) / max(gen - 1, 1) * 1e3,
                peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30,
                kv_method=choice.method if choice else "device",
                est_step_ms={"gpu": choice.gpu_s * 1e3, "cpu": choice.cpu_s * 1e3,
                             "split": choice.split_s * 1e3} if choice else None,
                gpu_rows=choice.gpu_rows if choice else None,
                auto_pick=auto.pick(kv_shape(llm.model, llm.dtype), batch, PROMPT + gen // 2).method)


def predicted(llm, cap: int) -> dict:
    """The planner's largest batch for each case, from the memory left after the weights are in place."""
    gc.collect()
    torch.cuda.empty_cache()  # blocks loading freed (quantizing a layer) are free for the cache too
    free_gpu = max(0, cap - torch.cuda.memory_reserved())
    free_host = free_host_bytes()
    out = dict(free_gpu_gib=free_gpu / 2**30, free_host_gib=free_host / 2**30)
    for case, opts in CASES.items():
        out[case] = max_batch(llm.model, llm.dtype, PROMPT + GEN, free_gpu, free_host, opts["kv_offload"],
                              opts.get("kv_attention", "gpu"), PROMPT)
    return out


def merged(rows: list[dict], results: dict) -> list[dict]:
    """Earlier calls' rows for the same model and bits, replaced where this call ran the same batch."""
    if not os.path.exists(STATE):
        return rows
    with open(STATE) as f:
        old = json.load(f)
    if (old.get("model"), old.get("quant_bits"), old.get("gen_len")) != (
            results["model"], results["quant_bits"], results["gen_len"]):
        return rows
    new = {(r["case"], r["batch_size"]) for r in rows}
    return [r for r in old.get("rows", []) if (r["case"], r["batch_size"]) not in new] + rows


def save(results: dict, out_dir: str) -> None:
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    results["largest_batch_run"] = {c: max((r["batch_size"] for r in ok if r["case"] == c), default=0)
                                    for c in CASES}
    for path in (STATE, os.path.join(out_dir, "kv_offload.json")):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    if ok:
        png = plot_sweep(ok, "batch_size", "total_throughput", os.path.join(out_dir, "kv_offload.png"),
                         title=f"{results['model']} int{results['quant_bits']}, prompt {PROMPT}, gen "
                               f"{results['gen_len']}, {results['gpu_gib']:.0f} GiB GPU", series="case")
        if os.path.abspath(png) != os.path.abspath(STATE.replace(".json", ".png")):
            shutil.copy(png, STATE.replace(".json", ".png"))


def reset_streamer(llm) -> None:
    """A forward pass cut short by OutOfMemoryError leaves prefetched units queued in the weight streamer:
    forget them (their copies are ordered on its copy stream) so the next pass fetches from its first layer."""
    if llm.streamer is not None:
        llm.streamer.ready.clear()


def batches_for(spec: str | None, case: str, planner_max: dict) -> list[int]:
    """--batches "8,16" (every case) or "gpu-cache=8,16;offload-cpu-attn=16,64" (per case; others: defaults);
    "max" stands for the planner's largest batch of the case."""
    if not spec:
        return BATCHES[case]
    if "=" in spec:
        per = dict(part.split("=", 1) for part in spec.split(";") if part)
        if case not in per:
            return BATCHES[case]
        spec = per[case]
    return [planner_max[case] if b == "max" else int(b) for b in spec.split(",")]


def sweep(llm, args, bandwidths, results, start) -> None:
    rows = []
    for case in args.cases.split(","):
        use_case(llm, case, bandwidths)
        auto = kv_policy(EngineConfig(offload="cpu", kv_offload=True, pin_kv_cache=True), llm.device, llm.plan,
                         bandwidths)
        if CASES[case].get("kv_attention") in ("cpu", "split") and CASES[case].get("compile") is not False:
            # compile attention on the CPU once (dynamic shapes: one compile serves every batch) outside the timing
            t = time.perf_counter()
            llm.generate(prompts(2, llm.config.vocab_size), zinfer.SamplingParams(max_new_tokens=3, ignore_eos=True))
            results["notes"].append(f"{case}: warm-up (CPU attention compile) {time.perf_counter() - t:.1f} s")
        for batch in batches_for(args.batches, case, results["planner_max_batch"]):
            if time.perf_counter() - start > args.time_budget:
                results["notes"].append(f"time budget spent: {case} stopped before batch {batch}")
                results["rows"] = merged(rows, results)
                return
            row = run(llm, case, batch, args.gen_len, auto)
            rows.append(row)
            print(json.dumps(row), flush=True)
            results["rows"] = merged(rows, results)
            save(results, args.out)
            if row["status"] != "ok":
                break
    results["rows"] = merged(rows, results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes for every case, or per case: "
                    "'gpu-cache=8,16;offload-cpu-attn=16,max' ('max': the planner's largest; default: each "
                    "case's list)")
    ap.add_argument("--gen-len", type=int, default=GEN)
    ap.add_argument("--gpu-memory", default="24GiB", help="the GPU size to behave like")
    ap.add_argument("--weights-gpu-memory", default=None, help="GPU budget for resident weights (default: stream all)")
    ap.add_argument("--time-budget", type=float, default=480, help="seconds before the sweep stops and saves")
    ap.add_argument("--out", default=os.environ.get("OUT", ".out"))
    args = ap.parse_args()
    start = time.perf_counter()
    cap = parse_bytes(args.gpu_memory)
    ceil_gpu, ceil_cpu = get_ceilings("cuda"), get_ceilings("cpu")
    bandwidths = Bandwidths(ceil_gpu["h2d_pinned_bytes_per_s"], ceil_cpu["device_copy_bytes_per_s"],
                            ceil_cpu["matmul_flops_per_s"], "measured", ceil_cpu["host_read_bytes_per_s"])
    cap_gpu(cap)
    notes = []
    host_before = free_host_bytes()
    name, bits, llm = load(args, notes)
    load_s = time.perf_counter() - start
    results = dict(model=name, quant_bits=bits, prompt_len=PROMPT, gen_len=args.gen_len, gpu_gib=cap / 2**30,
                   device=torch.cuda.get_device_name(), load_s=load_s, bandwidths=bandwidths.__dict__,
                   streamed_gib=sum(u.nbytes for u in llm.plan.streamed) / 2**30, notes=notes,
                   # what loading took from host memory, against the streamed bytes it must hold
                   host_free_before_load_gib=host_before / 2**30,
                   host_taken_by_load_gib=(host_before - free_host_bytes()) / 2**30,
                   planner_max_batch=predicted(llm, cap), rows=[])
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}), flush=True)
    sweep(llm, args, bandwidths, results, start)
    save(results, args.out)
    print(format_table(results["rows"], ["case", "batch_size", "status", "total_throughput", "decode_throughput",
                                         "prefill_s", "total_s", "peak_gpu_gib", "kv_method", "auto_pick"]))
    print("largest batch run:", results["largest_batch_run"], "planner:", results["planner_max_batch"])


if __name__ == "__main__":
    main()
