"""RLHF hybrid engine, the issue's case: a Llama-3-8B-shaped bf16 model with LoRA (rank 16 on q/k/v/o) generates
batch 16 x (256 prompt + 256 new) tokens through zinfer's HybridEngine and through `generate` on the peft model
itself, in the same run; and what the eval() switch costs next to generation.

Run on the device:  python benchmarks/hybrid.py [--cycles 3] [--no-peer]
Writes $OUT/hybrid.json (or ./hybrid.json). Random weights; greedy, exactly `gen` new tokens a row.
Smoke run on a CPU:  python benchmarks/hybrid.py --device cpu --model smollm2-135m --batch 2 --prompt 8 --gen 4
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from zinfer.hybrid import HybridEngine
from zinfer.weights.source import config_from_dict

CASES = {
    "llama3-8b-lora16-b16-p256-g256": dict(model="llama-3-8b", rank=16, targets=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"],
                                           batch=16, prompt=256, gen=256),
}
CONFIGS = Path(__file__).resolve().parents[1] / "zinfer" / "weights" / "configs"


def build(case, device: torch.device):
    """The training model: transformers Llama (random init, on the device, bf16) under peft LoRA."""
    import peft
    import transformers

    config = config_from_dict(json.loads((CONFIGS / f"{case['model']}.json").read_text()), case["model"])
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # init_lora_weights=False: B is random too, so the fused weights really differ from the base ones
    lora = peft.LoraConfig(r=case["rank"], lora_alpha=2 * case["rank"], target_modules=case["targets"],
                           init_lora_weights=False)
    return peft.get_peft_model(model, lora)


def workload(case, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(vocab, 32000), (case["batch"], case["prompt"]), generator=g).to(device)
    return ids, torch.ones_like(ids)


def gib(n: int) -> float:
    return n / 2**30


class Memory:
    """GPU memory counters (zeros on a CPU smoke run)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()


def run_engine(model, case, cycles: int, training_bytes: int, mem: Memory):
    """RLHF iterations: eval() (the switch) -> generate -> train(); the first one compiles and captures.
    `training_bytes`: GPU memory of the training model alone, to show what eval() adds."""
    engine = HybridEngine(model)
    ids, mask = workload(case, model.config.vocab_size, engine.device)
    new = case["gen"]
    runs, tokens = [], None
    for _ in range(cycles):
        mem.reset_peak()
        t = time.perf_counter()
        engine.eval()
        switch = time.perf_counter() - t
        after_eval = mem.allocated()
        t = time.perf_counter()
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
        mem.sync()
        generate = time.perf_counter() - t
        tokens = out[:, ids.shape[1]:]
        timings = engine.last_timings
        engine.train()
        runs.append(dict(eval_s=switch, generate_s=generate, prefill_s=timings.prefill, decode_total_s=timings.total,
                         capture_s=timings.capture, eval_added_gib=gib(after_eval - training_bytes),
                         peak_gib=gib(mem.peak()), after_train_gib=gib(mem.allocated())))
        print("zinfer", json.dumps(runs[-1]), flush=True)
    steady = runs[1:] or runs
    b = case["batch"]
    out = dict(iterations=runs, engine_timings=engine.timings,
               eval_s=statistics.median(r["eval_s"] for r in steady),
               generate_s=statistics.median(r["generate_s"] for r in steady),
               first_generate_s=runs[0]["generate_s"])
    out["tok_s"] = b * new / out["generate_s"]
    out["eval_over_generate"] = out["eval_s"] / out["generate_s"]
    return out, tokens


def run_peer(model, case, mem: Memory, repeats: int = 2):
    """transformers `generate` on the peft model itself (LoRA unmerged, as an RLHF trainer without an engine)."""
    ids, mask = workload(case, model.config.vocab_size, next(model.parameters()).device)
    new = case["gen"]
    model.eval()
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    times, tokens = [], None
    for _ in range(repeats):
        mem.sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, **kw)
        mem.sync()
        times.append(time.perf_counter() - t)
        tokens = out[:, ids.shape[1]:]
    model.train()
    generate = statistics.median(times)
    return dict(generate_s=generate, tok_s=case["batch"] * new / generate, runs=times), tokens


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """bf16 greedy paths diverge after near-ties; report how long rows agree, not a pass/fail."""
    same = (a == b).int().cumprod(dim=1).sum(dim=1).float()  # [B]: tokens equal before the first difference
    return dict(first_token_equal=float((a[:, 0] == b[:, 0]).float().mean()), mean_equal_prefix=float(same.mean()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--cycles", type=int, default=3, help="eval/generate/train iterations (first one is cold)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--device", default="cuda")
    for key in ("model", "batch", "prompt", "gen", "rank"):  # overrides of the cases (smoke runs)
        ap.add_argument(f"--{key}", type=str if key == "model" else int)
    args = ap.parse_args()
    device = torch.device(args.device)
    mem = Memory(device)
    name_of = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = dict(device=name_of, torch=torch.__version__, cases={})
    overrides = {k: getattr(args, k) for k in ("model", "batch", "prompt", "gen", "rank") if getattr(args, k)}
    for name in args.cases.split(","):
        case = dict(CASES[name], **overrides)
        t = time.perf_counter()
        model = build(case, device)
        mem.sync()
        training_bytes = mem.allocated()
        r = dict(case=case, build_s=time.perf_counter() - t, training_model_gib=gib(training_bytes))
        r["zinfer"], ours = run_engine(model, case, args.cycles, training_bytes, mem)
        if not args.no_peer:
            r["peft_generate"], theirs = run_peer(model, case, mem)
            r["speedup_vs_peft_generate"] = r["peft_generate"]["generate_s"] / r["zinfer"]["generate_s"]
            r["tokens_vs_peft"] = agreement(ours.cpu(), theirs.cpu())
        results["cases"][name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "zinfer"}), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = os.path.join(os.environ.get("OUT", "."), "hybrid.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'case':34} {'eval s':>7} {'gen s':>7} {'eval/gen':>8} {'tok/s':>8} {'peft gen s':>10} {'speedup':>7}")
    for name, r in results["cases"].items():
        z, p = r["zinfer"], r.get("peft_generate", {})
        print(f"{name:34} {z['eval_s']:7.3f} {z['generate_s']:7.2f} {z['eval_over_generate']:8.3f} {z['tok_s']:8.1f} "
              f"{p.get('generate_s', 0):10.2f} {r.get('speedup_vs_peft_generate', 0):7.1f}")


if __name__ == "__main__":
    main()
