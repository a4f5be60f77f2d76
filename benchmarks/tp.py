"""Tensor parallelism on the device: batch-1 decode of a large model at tp=N against tp=1, and greedy-token
parity of tp=N against tp=1 on a few models.

Run on a 2-GPU machine:  torchrun --nproc-per-node 2 benchmarks/tp.py [--model llama-3-8b] [--gen 128]
Smoke test on a CPU:     torchrun --nproc-per-node 2 benchmarks/tp.py --device cpu --dtype float32 \
                             --model opt-125m --parity-models opt-125m --prompt 8 --gen 4 --repeats 1
Writes $OUT/tp.json (or ./tp.json) from rank 0 and prints a summary. Dummy weights (the same on every rank as
in one process); tp=1 runs on rank 0 while the other ranks wait. Parity runs eagerly (no compile: quick loads)
in float32 and bfloat16 (a row-parallel layer sums in another order than one GEMM, which can flip a near-tie:
the equal prefix is reported); the timed runs (compiled, CUDA graph) compare their tokens too.
"""

import argparse
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import zinfer
from zinfer.bench.ceilings import get_ceilings
from zinfer.parallel import setup
from zinfer.parallel.launch import fail_fast


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 32000), (batch, length), generator=g).tolist()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def load(model: str, tp: int, dtype: str, compile: bool | None, device: str) -> tuple[zinfer.LLM, float]:
    sync(device)
    start = time.perf_counter()
    llm = zinfer.LLM(model, dummy=True, seed=0, dtype=dtype, device=device, tp=tp, compile=compile)
    sync(device)
    return llm, time.perf_counter() - start


def free(llm) -> None:
    llm.engine.release()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def weight_bytes_per_step(llm) -> int:
    # this rank's parameters, each read once per step, except the embedding table (only B rows are gathered)
    total = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    embed = max((m.weight for m in llm.model.modules() if type(m).__name__ == "Embedding"), key=torch.numel)
    return total - embed.numel() * embed.element_size()


def decode(llm, gen: int, prompt: int, repeats: int) -> dict:
    ids = prompts(1, prompt, llm.config.vocab_size)
    params = zinfer.SamplingParams(max_new_tokens=gen, ignore_eos=True)
    llm.generate(ids, params)  # warm-up: compile, graph capture, NCCL communicators
    steps = []
    for _ in range(repeats):
        tokens = llm.generate(ids, params)[0].token_ids
        t = llm.last_timings
        steps.append((t.total - t.prefill) / (gen - 1))
    step = statistics.median(steps)
    return dict(decode_step_ms=step * 1e3, decode_tok_s=1 / step, prefill_ms=llm.last_timings.prefill * 1e3,
                weight_gib_per_rank=weight_bytes_per_step(llm) / 2**30,
                peak_gib=peak_gib(str(llm.device.type)), tokens=tokens)


def speed_case(args, tp: int) -> dict:
    """Decode timing at `tp` (compiled + CUDA graph first; eager if that fails, with the reason)."""
    out = {}
    for compile in (None, False):
        try:
            llm, load_s = load(args.model, tp, args.dtype, compile, args.device)
            out.update(decode(llm, args.gen, args.prompt, args.repeats), load_s=load_s,
                       mode="auto (compiled + CUDA graph on a GPU)" if compile is None else "eager")
            free(llm)
            return out
        except Exception as e:  # record it, then try eager: one failure must not lose the whole run
            out[f"error_{'compiled' if compile is None else 'eager'}"] = f"{type(e).__name__}: {e}"
    return out


def parity_tokens(model: str, tp: int, dtype: str, gen: int, device: str) -> list[list[int]]:
    llm = zinfer.LLM(model, dummy=True, seed=0, dtype=dtype, device=device, tp=tp, compile=False)
    ids = prompts(4, 16, llm.config.vocab_size, seed=1)
    tokens = [c.token_ids for c in llm.generate(ids, zinfer.SamplingParams(max_new_tokens=gen, ignore_eos=True))]
    free(llm)
    return tokens


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    # tokens equal up to the first difference, per prompt (bf16 sums in a different order may flip a near-tie)
    prefix = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) for r, s in zip(a, b)]
    return dict(identical=a == b, equal_prefix=prefix, length=len(a[0]))


def on_rank0(fn, rank: int):
    """Run `fn` on rank 0 alone (tp=1) while the other ranks wait; the result on rank 0, None elsewhere."""
    result = fn() if rank == 0 else None
    dist.barrier()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b", help="built-in config for the timing (dummy bf16)")
    p.add_argument("--parity-models", default="opt-125m,bloom-560m,llama-3-8b",
                   help="built-in configs for token parity (heads must split over the ranks)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", help="of the timed runs")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test of this script")
    args = p.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    cuda = args.device == "cuda"
    tp = setup(world, torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu"))
    result = dict(model=args.model, tp=world, device=torch.cuda.get_device_name() if cuda else "cpu",
                  dtype=args.dtype, prompt=args.prompt, gen=args.gen)

    parity = {}
    for model in args.parity_models.split(","):
        for dtype in ("float32", "bfloat16"):
            many = parity_tokens(model, world, dtype, 32, args.device)
            one = on_rank0(lambda m=model, d=dtype: parity_tokens(m, 1, d, 32, args.device), tp.rank)
            if tp.is_main:
                parity[f"{model} {dtype}"] = agreement(many, one)
    result["parity"] = parity

    result[f"tp{world}"] = speed_case(args, world)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result["tp1"] = on_rank0(lambda: speed_case(args, 1), tp.rank)
    if not tp.is_main:
        return
    ceil = get_ceilings(args.device)
    for key in ("tp1", f"tp{world}"):
        r = result[key]
        if "decode_step_ms" in r:
            floor_ms = r["weight_gib_per_rank"] * 2**30 / ceil["device_copy_bytes_per_s"] * 1e3
            r.update(floor_step_ms=floor_ms, step_over_floor=r["decode_step_ms"] / floor_ms)
    one, many = result["tp1"], result[f"tp{world}"]
    if "decode_step_ms" in one and "decode_step_ms" in many:
        result["speedup"] = one["decode_step_ms"] / many["decode_step_ms"]
        result["timed_tokens"] = agreement([many.pop("tokens")], [one.pop("tokens")])
    result["ceilings"] = ceil
    path = os.path.join(os.environ.get("OUT", "."), "tp.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "ceilings"}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    with fail_fast():
        main()
        zinfer.parallel.shutdown()
