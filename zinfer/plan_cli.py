"""`zinfer plan`: where every unit of weights will live, and why, before anything is loaded."""

import argparse

import torch

from zinfer.api import resolve_dtype
from zinfer.config import EngineConfig, parse_bytes
from zinfer.errors import InputError
from zinfer.offload.plan import CPU, GPU, cached_bandwidths, free_host_bytes, kv_plan_text, make_plan
from zinfer.quant import QuantSpec
from zinfer.weights.loader import build_empty, quantize_shells
from zinfer.weights.source import resolve


def add_parser(subparsers) -> argparse.ArgumentParser:
    from zinfer.cli import positive_int

    p = subparsers.add_parser(
        "plan", help="print where every layer's weights will live (GPU, pinned CPU, NVMe) and the PCIe floor",
        description="Plan placement for a model on a GPU without loading any weight. On a machine without a "
                    "GPU, say how much the GPU would have free with --gpu-free.")
    p.add_argument("--model", "-m", default=None, help="directory, .gguf, built-in config name or hub id")
    p.add_argument("--dtype", default="float16", help="weight dtype (default float16)")
    p.add_argument("--offload", choices=("none", "cpu", "nvme", "auto"), default="auto")
    p.add_argument("--offload-dir", "--offload_dir", default=None)
    p.add_argument("--gpu-memory", "--gpu_memory", default=None, help="GPU budget for weights, e.g. 24GiB")
    p.add_argument("--cpu-memory", "--cpu_memory", default=None, help="host budget for offloaded weights")
    p.add_argument("--gpu-free", default=None,
                   help="free GPU memory to plan for (default: measured on this machine's GPU)")
    p.add_argument("--quant-bits", "--quant_bits", type=int, choices=(4, 8, 16), default=16)
    p.add_argument("--quant-group-size", "--quant_group_size", type=positive_int, default=64)
    p.add_argument("--quant-lm-head", "--quant_lm_head", action="store_true", help="pack the LM head too")
    kv = p.add_argument_group("KV cache", "where the cache of a request lives, and the largest batch that fits "
                                          "with it on the GPU and offloaded")
    kv.add_argument("--kv-offload", "--kv_offload", action="store_true", help="plan the cache in CPU memory")
    kv.add_argument("--pin-kv-cache", "--pin_kv_cache", action="store_true")
    kv.add_argument("--async-kv-offload", "--async_kv_offload", action="store_true")
    kv.add_argument("--kv-attention", "--kv_attention", choices=("auto", "gpu", "cpu", "split"),
                    default="auto")
    kv.add_argument("--batch-size", "--batch_size", type=positive_int, default=None,
                    help="also say which decode attention method this batch would get")
    kv.add_argument("--prompt-len", "--prompt_len", type=positive_int, default=512)
    kv.add_argument("--gen-len", "--gen_len", type=positive_int, default=32)
    kv.add_argument("--cpu-free", default=None, help="free host memory to plan for (default: this machine's)")
    return p


def run(args: argparse.Namespace) -> int:
    from zinfer.bench.ceilings import _load, cache_path

    if args.quant_lm_head and args.quant_bits == 16:
        raise InputError("--quant-lm-head packs the LM head like the layers: it needs --quant-bits 4 or 8")
    source = resolve(args.model)
    device = torch.device("cuda")
    dtype = resolve_dtype(args.dtype, source.config, device)
    options = EngineConfig(offload=args.offload if args.offload != "none" else "auto",
                           offload_dir=args.offload_dir or ("." if args.offload == "nvme" else None),
                           gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory, quant_bits=args.quant_bits,
                           quant_group_size=args.quant_group_size, quant_lm_head=args.quant_lm_head,
                           kv_offload=args.kv_offload, pin_kv_cache=args.pin_kv_cache,
                           async_kv_offload=args.async_kv_offload, kv_attention=args.kv_attention)
    free = parse_bytes(args.gpu_free)
    if free is None:
        if not torch.cuda.is_available():
            raise InputError("no GPU on this machine: say how much GPU memory to plan for with --gpu-free 24GiB")
        free = torch.cuda.mem_get_info()[0]
    model = build_empty(source.config)
    if args.quant_bits != 16:
        quantize_shells(model, QuantSpec(bits=args.quant_bits, group_size=args.quant_group_size), dtype,
                        lm_head=args.quant_lm_head)
    plan = make_plan(model, options, device, dtype, free_gpu=free)
    h2d = None
    if torch.cuda.is_available():
        cached = _load(cache_path(device)) or {}
        h2d = cached.get("h2d_pinned_bytes_per_s")
    q = f", int{args.quant_bits} g{args.quant_group_size}" if args.quant_bits != 16 else ""
    q += " (LM head too)" if q and args.quant_lm_head else ""
    print(f"{source.name}: {dtype}{q}, {free / 2**30:.1f} GiB GPU free, offload={options.offload}")
    print(plan.table(h2d))
    # the cache gets what the weights leave: GPU memory after the resident units and the streaming buffer, host
    # memory after the units streamed from pinned CPU memory
    cpu_free = parse_bytes(args.cpu_free)
    cpu_free = free_host_bytes() if cpu_free is None else cpu_free
    gpu_left = max(0, free - plan.bytes_at(GPU) - plan.buffer_bytes)
    host_left = max(0, cpu_free - plan.bytes_at(CPU))
    rates = cached_bandwidths(device if torch.cuda.is_available() else torch.device("cpu"))  # nominal PCIe then
    print(kv_plan_text(model, dtype, options, args.prompt_len, args.gen_len, gpu_left, host_left,
                       batch=args.batch_size, bandwidths=rates,
                       streamed_bytes=sum(u.nbytes for u in plan.streamed), host_compiled=True))
    return 0


def register(subparsers) -> None:
    add_parser(subparsers).set_defaults(run=run)
