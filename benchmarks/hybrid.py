"""RLHF hybrid engine, the issue's case: a Llama-3-8B-shaped bf16 model with LoRA (rank 16 on q/k/v/o) generates
batch 16 x (256 prompt + 256 new) tokens through zinfer's HybridEngine and through `generate` on the peft model
itself, in the same run; and what the eval() switch costs next to generation.

Run on the device:  python benchmarks/hybrid.py [--cycles 3] [--no-peer]
Writes $OUT/hybrid.json (or ./hybrid.json). Random weights; greedy, exactly `gen` new tokens a row.
Smoke run on a CPU:  python benchmarks/hybrid.py --device cpu --model smollm2-135m --batch 2 --prompt 8 --gen 4

Tensor-parallel generation inside a distributed trainer (the training model FSDP2-sharded over all ranks):
    torchrun --nproc-per-node 2 benchmarks/hybrid.py --inference-tp-size 2 [--compare-json hybrid.json] [--eager]
Each rank holds `batch` prompts of its own (data parallel, seeded by rank). Runs, one after the other on the
same sharded model: `tp{N}-own-prompts` (each group generates all its ranks' prompts in one batch),
`tp{N}-same-prompts` (every rank passes the same prompts: one batch of `batch` rows over N GPUs, the figure to
set beside the single-GPU one) and `tp1` (each rank gathers the whole model and generates its own prompts).
Rank 0 prints and writes $OUT/hybrid_tp.json; `--compare-json` adds the single-GPU run's figures.
Smoke run on a CPU:  torchrun --nproc-per-node 2 benchmarks/hybrid.py --inference-tp-size 2 --device cpu \
    --cases smoke-tiny-llama --cycles 2
"""

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from zinfer.hybrid import HybridEngine
from zinfer.weights.source import config_from_dict

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
CASES = {
    "llama3-8b-lora16-b16-p256-g256": dict(model="llama-3-8b", rank=16, targets=QKVO, batch=16, prompt=256, gen=256),
    # a Llama-3-shaped model small enough for a CPU (GQA: 4 query heads, 2 KV heads): checks the script runs
    "smoke-tiny-llama": dict(model="llama-3-8b", rank=4, targets=QKVO, batch=2, prompt=8, gen=4,
                             config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=256, vocab_size=512,
                                         bos_token_id=1, eos_token_id=2)),
}
DEFAULT_CASE = "llama3-8b-lora16-b16-p256-g256"
CONFIGS = Path(__file__).resolve().parents[1] / "zinfer" / "weights" / "configs"


def build(case, device: torch.device):
    """The training model: transformers Llama (random init, on the device, bf16) under peft LoRA."""
    import peft
    import transformers

    data = json.loads((CONFIGS / f"{case['model']}.json").read_text())
    config = config_from_dict(dict(data, **case.get("config", {})), case["model"])
    torch.manual_seed(0)
    with device:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # init_lora_weights=False: B is random too, so the fused weights really differ from the base ones
    lora = peft.LoraConfig(r=case["rank"], lora_alpha=2 * case["rank"], target_modules=case["targets"],
                           init_lora_weights=False)
    return peft.get_peft_model(model, lora)


def workload(case, vocab: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
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


def run_engine(model, case, cycles: int, training_bytes: int, mem: Memory, inference_tp_size: int = 1,
               prompt_seed: int = 0, label: str = "zinfer", show: bool = True, compile: bool | None = None):
    """RLHF iterations: eval() (the switch) -> generate -> train(); the first one compiles and captures.
    `training_bytes`: GPU memory of the training model alone, to show what eval() adds. `gather_s` of an
    iteration (FSDP2 all-gathers, inside eval) is known when the next eval() closes it."""
    engine = HybridEngine(model, inference_tp_size=inference_tp_size, compile=compile)
    ids, mask = workload(case, model.config.vocab_size, engine.device, prompt_seed)
    new = case["gen"]
    runs, tokens = [], None
    for _ in range(cycles):
        mem.reset_peak()
        t = time.perf_counter()
        engine.eval()
        switch = time.perf_counter() - t
        if runs:
            runs[-1]["gather_s"] = engine.timings["gather_s"]
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
        if show:
            print(label, json.dumps(runs[-1]), flush=True)
    steady = runs[1:] or runs
    b = case["batch"]
    out = dict(iterations=runs, engine_timings=engine.timings,
               eval_s=statistics.median(r["eval_s"] for r in steady),
               generate_s=statistics.median(r["generate_s"] for r in steady),
               first_generate_s=runs[0]["generate_s"])
    gathers = [r["gather_s"] for r in runs if "gather_s" in r]  # all but the last iteration's
    if gathers:
        out["gather_s"] = statistics.median(gathers[1:] or gathers)
    out["tok_s"] = b * new / out["generate_s"]  # this rank's rows
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
    ap.add_argument("--cases", default=DEFAULT_CASE, help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--cycles", type=int, default=3, help="eval/generate/train iterations (first one is cold)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--inference-tp-size", type=int, default=1,
                    help="> 1: under torchrun, FSDP2-shard the training model over all ranks and generate with "
                         "tensor parallelism over groups of this many ranks")
    ap.add_argument("--no-tp1", action="store_true", help="distributed: skip the inference_tp_size=1 run")
    ap.add_argument("--eager", action="store_true", help="decode without torch.compile and CUDA graphs")
    ap.add_argument("--compare-json", help="distributed: a single-GPU hybrid.json to set beside the results")
    for key in ("model", "batch", "prompt", "gen", "rank"):  # overrides of the cases (smoke runs)
        ap.add_argument(f"--{key}", type=str if key == "model" else int)
    args = ap.parse_args()
    if args.inference_tp_size > 1 or "WORLD_SIZE" in os.environ:
        return main_distributed(args)
    device = torch.device(args.device)
    mem = Memory(device)
    name_of = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = dict(device=name_of, torch=torch.__version__, cases={})
    overrides = case_overrides(args)
    for name in args.cases.split(","):
        case = dict(CASES[name], **overrides)
        t = time.perf_counter()
        model = build(case, device)
        mem.sync()
        training_bytes = mem.allocated()
        r = dict(case=case, build_s=time.perf_counter() - t, training_model_gib=gib(training_bytes))
        r["zinfer"], ours = run_engine(model, case, args.cycles, training_bytes, mem,
                                       compile=False if args.eager else None)
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


def case_overrides(args) -> dict:
    return {k: getattr(args, k) for k in ("model", "batch", "prompt", "gen", "rank") if getattr(args, k)}


# --- tensor-parallel generation inside a distributed trainer ----------------------------------------------------

def shard(model) -> None:
    """FSDP2 over every rank of the job: each decoder layer, then the rest (as a trainer would)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)


def main_distributed(args):
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit(f"--inference-tp-size {args.inference_tp_size} runs one process per GPU: start it with "
                         f"torchrun --nproc-per-node {args.inference_tp_size} benchmarks/hybrid.py ...")
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world, tp = dist.get_rank(), dist.get_world_size(), args.inference_tp_size
    main_rank = rank == 0
    mem = Memory(device)
    results = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, world_size=world, inference_tp_size=tp, eager=args.eager, cases={})
    # (label, inference_tp_size, prompts seeded by rank?)
    runs = [(f"tp{tp}-own-prompts", tp, True), (f"tp{tp}-same-prompts", tp, False)]
    if not args.no_tp1 and tp > 1:
        runs.append(("tp1", 1, True))
    for name in args.cases.split(","):
        case = dict(CASES[name], **case_overrides(args))
        t = time.perf_counter()
        model = build(case, device)
        shard(model)
        mem.sync()
        training_bytes = mem.allocated()
        r = dict(case=case, build_s=time.perf_counter() - t, training_model_gib_per_rank=gib(training_bytes))
        tokens = {}
        for label, size, own in runs:
            r[label], tokens[label] = run_engine(model, case, args.cycles, training_bytes, mem, size,
                                                 prompt_seed=rank if own else 0, label=label, show=main_rank,
                                                 compile=False if args.eager else None)
            gc.collect()  # the finished engine's decode state (CUDA graph pool) before the next one captures
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # tp1 ranks generate independently: the job waits for the slowest (tp groups step in lockstep)
            every = [None] * world
            dist.all_gather_object(every, r[label]["generate_s"])
            r[label]["generate_s_slowest_rank"] = max(every)
            # rows generated in the job per second: own prompts are distinct on every rank; the same prompts
            # are distinct only across groups
            distinct = world if own else world // size
            r[label]["rows_in_job"] = distinct * case["batch"]
            r[label]["job_tok_s"] = distinct * case["batch"] * case["gen"] / max(every)
        if "tp1" in r:
            own = f"tp{tp}-own-prompts"
            r["generate_speedup_vs_tp1"] = r["tp1"]["generate_s"] / r[own]["generate_s"]
            r["job_tok_s_vs_tp1"] = r[own]["job_tok_s"] / r["tp1"]["job_tok_s"]
            r["eval_s_vs_tp1"] = r[own]["eval_s"] / r["tp1"]["eval_s"]
            r["tokens_vs_tp1"] = agreement(tokens[own].cpu(), tokens["tp1"].cpu())
        if args.compare_json:  # the single-GPU run (python benchmarks/hybrid.py): the same batch on one GPU
            single = json.loads(Path(args.compare_json).read_text())
            if name in single["cases"]:
                z, same = single["cases"][name]["zinfer"], r[f"tp{tp}-same-prompts"]
                r["single_gpu"] = dict(device=single["device"], eval_s=z["eval_s"], generate_s=z["generate_s"],
                                       tok_s=z["tok_s"], generate_speedup=z["generate_s"] / same["generate_s"])
        results["cases"][name] = r
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if main_rank:
        print(json.dumps(results, indent=1), flush=True)
        out = os.path.join(os.environ.get("OUT", "."), "hybrid_tp.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\n{'case / run':48} {'eval s':>7} {'gather s':>8} {'gen s':>7} {'rows/job':>8} {'job tok/s':>9}")
        for name, r in results["cases"].items():
            for label, _, _ in runs:
                z = r[label]
                print(f"{name + ' / ' + label:48} {z['eval_s']:7.3f} {z.get('gather_s', 0):8.3f} "
                      f"{z['generate_s']:7.2f} {z['rows_in_job']:8d} {z['job_tok_s']:9.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
