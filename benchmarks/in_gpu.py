"""In-GPU generation, named cases: zinfer vs transformers eager `generate` on the same model shape and inputs.

Run on the device:  python benchmarks/in_gpu.py [--model llama-3-8b] [--cases b1-p128-g128,...] [--no-peer]
                    [--quant-bits 16,4,4+head,8]
Writes $OUT/in_gpu.json (or ./in_gpu.json) and prints a table. Dummy bf16 weights (group-wise int4/int8 with
--quant-bits: one model per value, in that order, each with the same cases; `4+head` packs the LM head too);
ceilings measured once.
"""

import argparse
import gc
import json
import os
import statistics
import time

import torch

import zinfer
from zinfer.bench.ceilings import get_ceilings
from zinfer.layers import attention, gemv

CASES = {
    "b1-p128-g128": dict(batch=1, prompt=128, gen=128, peer=True),
    "b4-p128-g128": dict(batch=4, prompt=128, gen=128, peer=False),  # M = 4 per matmul: the quantized kernels' edge
    "b16-p512-g32": dict(batch=16, prompt=512, gen=32, peer=True),
    "b64-p512-g32": dict(batch=64, prompt=512, gen=32, peer=False),
    "prefill-8192": dict(batch=1, prompt=8192, gen=1, peer=False),
}


def weight_variants(text: str) -> list[tuple[int, bool]]:
    """--quant-bits: comma-separated 16 (bf16), 8, 4, 8+head, 4+head -> [(bits, LM head packed)], one model each."""
    out = []
    for value in text.split(","):
        bits, head = value.removesuffix("+head"), value.endswith("+head")
        if bits not in ("16", "8", "4") or (head and bits == "16"):
            raise argparse.ArgumentTypeError(f"{value!r}: use 16, 8, 4, 8+head or 4+head")
        out.append((int(bits), head))
    return out


def variant_tag(bits: int, head: bool, group_size: int) -> str:
    return "bf16" if bits == 16 else f"int{bits}-g{group_size}" + ("-head" if head else "")


def prompts_for(case, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 32000), (case["batch"], case["prompt"]), generator=g).tolist()


def weight_bytes_per_step(llm) -> int:
    # every parameter (packed codes, scales and zeros when quantized) is read once per step except the
    # embedding table (only B rows are gathered)
    total = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    embed = next(p for n, p in llm.model.named_parameters() if "embed_tokens" in n)
    return total - embed.numel() * embed.element_size()


def kv_bytes_per_step(llm, batch: int, length: int) -> int:
    m = llm.model
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2 * batch * length


def run_zinfer(llm, case, repeats: int):
    ids = prompts_for(case, llm.config.vocab_size)
    params = zinfer.SamplingParams(max_new_tokens=case["gen"], ignore_eos=True)
    llm.generate(ids, params)  # warm-up: graph capture for this bucket, cuBLAS heuristics
    capture = llm.last_timings.capture
    runs = []
    for _ in range(repeats):
        torch.cuda.reset_peak_memory_stats()
        llm.generate(ids, params)
        t = llm.last_timings
        runs.append((t.prefill, t.total))
    prefill = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    b, g = case["batch"], case["gen"]
    out = dict(prefill_s=prefill, total_s=total, capture_s=capture,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    if g > 1:
        decode = total - prefill
        out.update(decode_step_ms=decode / (g - 1) * 1e3, decode_tok_s=b * (g - 1) / decode)
    return out


def run_peer(config, case, dtype, repeats: int):
    import transformers

    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = torch.tensor(prompts_for(case, config.vocab_size), device="cuda")
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2)
    prefill = statistics.median(timed(1) for _ in range(repeats))
    total = statistics.median(timed(case["gen"]) for _ in range(max(1, repeats - 1)))
    b, g = case["batch"], case["gen"]
    decode = total - prefill
    model = None  # drop the peer before the next zinfer case
    gc.collect()
    torch.cuda.empty_cache()
    return dict(prefill_s=prefill, total_s=total, decode_step_ms=decode / (g - 1) * 1e3,
                decode_tok_s=b * (g - 1) / decode)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quant-bits", type=weight_variants, default="16", help="16 (bf16), 8, 4, 8+head or 4+head (the "
                    "LM head packed too), comma-separated: one model each")
    ap.add_argument("--quant-group-size", type=int, default=64)
    args = ap.parse_args()
    ceil = get_ceilings("cuda")
    print("ceilings:", json.dumps(ceil))
    # the kernel switches in effect (set or by default), so a figure says what it measured
    switches = dict(ZINFER_GEMV=gemv.MODE, ZINFER_PDL=gemv.PDL_MODE,
                    ZINFER_DECODE_ATTENTION="fused" if attention.FUSED_DECODE else "matmul")
    print("switches:", json.dumps(switches))
    results = dict(model=args.model, device=torch.cuda.get_device_name(), ceilings=ceil, torch=torch.__version__,
                   switches=switches, runs={})
    for bits, head in args.quant_bits:
        tag = variant_tag(bits, head, args.quant_group_size)
        results["runs"][tag] = run_model(args, bits, ceil, peer=not args.no_peer and bits == 16, head=head)
        gc.collect()
        torch.cuda.empty_cache()
    out = os.path.join(os.environ.get("OUT", "."), "in_gpu.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'weights':10} {'case':16} {'tok/s':>9} {'ms/step':>8} {'floor':>7} {'x floor':>7} {'HF tok/s':>9} "
          f"{'speedup':>7} {'prefill TF/s':>12}")
    base = results["runs"].get("bf16", {}).get("cases", {})
    for tag, run in results["runs"].items():
        for name, r in run["cases"].items():
            hf = r.get("hf_eager", {})
            vs = r.get("speedup_vs_hf", 0) or (r.get("decode_tok_s", 0) / base[name]["decode_tok_s"]
                                                if name in base and base[name].get("decode_tok_s") else 0)
            print(f"{tag:10} {name:16} {r.get('decode_tok_s', 0):9.1f} {r.get('decode_step_ms', 0):8.2f} "
                  f"{r.get('floor_step_ms', 0):7.2f} {r.get('step_over_floor', 0):7.2f} "
                  f"{hf.get('decode_tok_s', 0):9.1f} {vs:7.2f} {r['prefill_tflops']:12.1f}")
    print("speedup: vs HF eager for bf16; vs zinfer's own bf16 run for quantized weights")


def run_model(args, bits: int, ceil: dict, peer: bool, head: bool = False) -> dict:
    dtype = torch.bfloat16
    t = time.perf_counter()
    quant = {} if bits == 16 else dict(quant_bits=bits, quant_group_size=args.quant_group_size, quant_lm_head=head)
    llm = zinfer.LLM(args.model, dummy=True, dtype=dtype, device="cuda", **quant)
    load_s = time.perf_counter() - t
    wbytes = weight_bytes_per_step(llm)
    nonembed = sum(p.numel() for n, p in llm.model.named_parameters() if "embed_tokens" not in n
                   and "lm_head" not in n)
    if bits != 16:  # FLOPs count the dense weights the packed codes stand for
        nonembed = sum(m.in_features * m.out_features for m in llm.model.modules()
                       if getattr(m, "qspec", None) is not None and m is not llm.model.lm_head)
    results = dict(load_s=load_s, weight_bytes_per_step=wbytes, cases={})
    hbm, mm = ceil["device_copy_bytes_per_s"], ceil["matmul_flops_per_s"]
    for name in args.cases.split(","):
        case = CASES[name]
        r = run_zinfer(llm, case, args.repeats)
        b, p, g = case["batch"], case["prompt"], case["gen"]
        if g > 1:
            kv = kv_bytes_per_step(llm, b, p + g // 2)
            floor_ms = (wbytes + kv) / hbm * 1e3
            r.update(floor_step_ms=floor_ms, step_over_floor=r["decode_step_ms"] / floor_ms,
                     achieved_gb_s=(wbytes + kv) / (r["decode_step_ms"] / 1e3) / 1e9)
        cfg = llm.config
        hd = llm.model.head_dim * cfg.num_attention_heads
        flops = 2 * nonembed * b * p + 2 * llm.model.num_layers * b * p * p * hd  # causal attention: half of 4*S^2*d
        r.update(prefill_tflops=flops / r["prefill_s"] / 1e12, prefill_over_matmul_rate=flops / r["prefill_s"] / mm)
        if case["peer"] and peer:
            llm.engine.release()  # the peer gets the memory our KV cache held
            r["hf_eager"] = run_peer(llm.config, case, dtype, args.repeats)
            if g > 1:
                r["speedup_vs_hf"] = r["decode_tok_s"] / r["hf_eager"]["decode_tok_s"]
        results["cases"][name] = r
        print(bits, name, json.dumps(r), flush=True)
    llm.engine.release()
    del llm
    return results


if __name__ == "__main__":
    main()
