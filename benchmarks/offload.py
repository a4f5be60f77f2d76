"""Weight offload, named cases: zinfer streaming from pinned CPU / NVMe vs accelerate's cpu_offload.

Run on the device:  python benchmarks/offload.py [--cases all-cpu,half-gpu,nvme,all-cpu-int4] [--no-peer]
Llama-3-8B shape, fp16 dummy weights, batch 16, prompt 512, 32 new tokens (the issue's workload). A case name
ending in -int4 / -int8 streams group-wise quantized weights (group 64) instead.
Each case also reports the peak rise of host memory in use while it loads (sampled every 0.2 s).
Writes $OUT/offload.json.
"""

import argparse
import gc
import json
import os
import statistics
import tempfile
import threading
import time

import torch

import zinfer
from zinfer.bench.ceilings import get_ceilings
from zinfer.offload.plan import free_host_bytes, unit_bytes
from zinfer.weights.loader import build_empty
from zinfer.weights.source import resolve

MODEL, BATCH, PROMPT, GEN = "llama-3-8b", 16, 512, 32


def host_in_use() -> int:
    """Bytes of host memory in use (physical minus available): what a load draws shows up here, pinned included."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") - free_host_bytes()


class HostPeak:
    """Around a load: the peak rise of host memory in use, sampled every 0.2 s on a thread."""

    def __enter__(self):
        self.base = self.peak = host_in_use()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.2):
            self.peak = max(self.peak, host_in_use())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, host_in_use())
        self.rise_gib = (self.peak - self.base) / 2**30


def workload(vocab):
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, min(vocab, 32000), (BATCH, PROMPT), generator=g).tolist()


def run(llm, repeats=2, gen=GEN):
    ids = workload(llm.config.vocab_size)
    params = zinfer.SamplingParams(max_new_tokens=gen, ignore_eos=True)
    llm.generate(ids, zinfer.SamplingParams(max_new_tokens=2, ignore_eos=True))
    runs = []
    for _ in range(repeats):
        llm.generate(ids, params)
        runs.append((llm.last_timings.prefill, llm.last_timings.total))
    prefill = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    step = (total - prefill) / (gen - 1)
    streamed = sum(u.nbytes for u in llm.plan.streamed) if llm.plan else 0
    return dict(prefill_s=prefill, total_s=total, decode_step_ms=step * 1e3, decode_tok_s=BATCH / step,
                streamed_gib=streamed / 2**30)


def peer_accelerate(config):
    import accelerate
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    accelerate.cpu_offload(model, execution_device=torch.device("cuda"))
    ids = torch.tensor(workload(config.vocab_size), device="cuda")

    def timed(new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    prefill = timed(1)
    total = timed(8)  # accelerate streams synchronously: 8 tokens are enough to time a step
    step = (total - prefill) / 7
    return dict(prefill_s=prefill, decode_step_ms=step * 1e3, decode_tok_s=BATCH / step, gen_tokens=8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="all-cpu,half-gpu,nvme")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    ceil = get_ceilings("cuda", disk_dir=tempfile.gettempdir())
    h2d = ceil["h2d_pinned_bytes_per_s"]
    disk = next(iter(ceil.get("disk", {}).values()), {}).get("bytes_per_s")  # O_DIRECT read rate
    results = dict(device=torch.cuda.get_device_name(), ceilings=ceil, cases={})
    for name in args.cases.split(","):
        t = time.perf_counter()
        place, _, bits = name.partition("-int")
        quant = dict(quant_bits=int(bits), quant_group_size=64) if bits else {}
        with HostPeak() as host:
            if place == "all-cpu":
                llm = zinfer.LLM(MODEL, dummy=True, dtype="float16", device="cuda", offload="cpu", **quant)
            elif place == "half-gpu":
                sizes = unit_bytes(build_empty(resolve(MODEL).config), torch.float16)  # meta shapes, no load
                budget = sizes["rest"] + 2 * sizes["layers.0"] + 16 * sizes["layers.0"]
                llm = zinfer.LLM(MODEL, dummy=True, dtype="float16", device="cuda", offload="cpu", gpu_memory=budget)
            elif place == "nvme":
                llm = zinfer.LLM(MODEL, dummy=True, dtype="float16", device="cuda", offload="nvme",
                                 offload_dir=os.path.join(tempfile.gettempdir(), "zinfer-offload"), **quant)
            elif place == "mixtral-over-gpu":
                cap = min(torch.cuda.mem_get_info()[0] - (4 << 30), 70 << 30)
                llm = zinfer.LLM("mixtral-8x7b", dummy=True, dtype="bfloat16", device="cuda", offload="auto",
                                 gpu_memory=cap)
            else:
                raise SystemExit(f"unknown case {name}")
        load_s = time.perf_counter() - t
        print(f"{name}: loaded in {load_s:.1f} s, host memory in use rose by at most {host.rise_gib:.1f} GiB",
              flush=True)
        if place in ("nvme", "mixtral-over-gpu"):  # steps take seconds (NVMe) or one call's limit is near (Mixtral)
            r = run(llm, repeats=1, gen=4 if place == "nvme" else 8)
        else:
            r = run(llm)
        r["load_s"], r["quant_bits"], r["load_host_peak_rise_gib"] = load_s, int(bits or 16), host.rise_gib
        bw = disk if place == "nvme" and disk else h2d
        r["floor_step_ms"] = r["streamed_gib"] * 2**30 / bw * 1e3
        r["step_over_floor"] = r["decode_step_ms"] / r["floor_step_ms"] if r["floor_step_ms"] else None
        r["resident_layers"] = sum(1 for u in llm.plan.units[1:] if u.place == "gpu")
        print(name, "zinfer", json.dumps(r), flush=True)  # before the peer, which may outlast the call
        if name == "all-cpu" and not args.no_peer:
            config = llm.config
            llm.streamer.close()
            del llm
            gc.collect()
            torch.cuda.empty_cache()
            r["accelerate_cpu_offload"] = peer_accelerate(config)
            r["speedup_vs_accelerate"] = r["decode_tok_s"] / r["accelerate_cpu_offload"]["decode_tok_s"]
        else:
            llm.streamer.close()
            del llm
        gc.collect()
        torch.cuda.empty_cache()
        results["cases"][name] = r
        print(name, json.dumps(r), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "offload.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
