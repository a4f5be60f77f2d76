"""The seed's `run_generation` benchmark on zinfer: one workload, timed loops, metrics, log and roofline.

Workload (ZeRO-Inference `run_model.py`): a batch of identical prompts "Paris is the capital city of",
each exactly `prompt_len` token ids, generating exactly `gen_len` tokens, `loops` times; the metrics are
the seed's, from the last loop (`compute_metrics`). On top of the seed we report achieved GB/s and TFLOP/s
and their ratio to the ceiling the run is bound by, measured once per machine (`get_ceilings`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import torch

from zinfer.api import LLM, resolve_device, resolve_dtype
from zinfer.bench.ceilings import get_ceilings
from zinfer.bench.metrics import (
    BenchConfig,
    cache_bytes,
    compute_metrics,
    hidden_bytes,
    model_bytes,
    output_path,
    write_benchmark_log,
)
from zinfer.errors import InputError
from zinfer.layers.linear import Embedding
from zinfer.runtime.sampling import SamplingParams
from zinfer.weights.source import builtin_names

PROMPT = "Paris is the capital city of"
GATED_MLP_FAMILIES = {"llama", "mistral", "qwen2", "mixtral"}  # SwiGLU: gate, up and down projections


# --- configuration -> engine -------------------------------------------------------------------------

def world_size(config: BenchConfig) -> int:
    return config.num_nodes * config.num_gpus_per_node


def engine_options(config: BenchConfig, pin_memory: bool = True) -> dict:
    """The LLM engine options this configuration asks for (unimplemented ones make LLM refuse clearly)."""
    options = dict(pin_memory=pin_memory, quant_bits=config.quant_bits, quant_group_size=config.quant_group_size,
                   quant_lm_head=config.quant_lm_head, kv_offload=config.kv_offload, pin_kv_cache=config.pin_kv_cache,
                   async_kv_offload=config.async_kv_offload, tp=world_size(config))
    if config.cpu_offload:
        options["offload"] = "cpu"
    elif config.disk_offload:
        options.update(offload="nvme", offload_dir=str(Path(config.offload_dir).expanduser()))
    return options


def model_name(config: BenchConfig) -> str:
    """The name to load: with --dummy a hub id of a built-in shape ("facebook/opt-66b") means that built-in,
    so DeepSpeed users' command lines run offline."""
    short = config.model.rstrip("/").split("/")[-1].lower()
    if config.dummy and not Path(config.model).expanduser().exists() and short in builtin_names():
        return short
    return config.model


def bench_dtype(dtype, device: torch.device) -> torch.dtype:
    """'auto' is the seed's float16 on a GPU, and float32 on a CPU (where half matmuls are slow)."""
    if dtype in ("auto", None):
        return torch.float16 if device.type == "cuda" else torch.float32
    return resolve_dtype(dtype, None, device)


def load_bench_llm(config: BenchConfig, device="auto", dtype="auto", *, compile: bool = True,
                   seed: int | None = None, pin_memory: bool = True) -> LLM:
    device = resolve_device(device)
    reset_peak_memory(device)  # the seed's peak counts the weights: measure from before they load
    return LLM(model_name(config), dtype=bench_dtype(dtype, device), device=device, dummy=config.dummy, seed=seed,
               compile=compile, **engine_options(config, pin_memory))


# --- workload -------------------------------------------------------------------------------------------

def synthetic_ids(prompt_len: int, vocab_size: int, seed: int = 0) -> list[int]:
    low = 3 if vocab_size > 3 else 0  # skip the usual pad/eos/bos ids of small vocabularies
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (prompt_len,), generator=gen).tolist()


def _prompt_from_tokenizer(tokenizer, prompt_len: int) -> list[int]:
    head = tokenizer(PROMPT)["input_ids"]  # with the tokenizer's BOS, if it adds one
    body = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    if not head or set(body) <= set(tokenizer.all_special_ids):  # no words it knows: all unknown or empty
        return []
    repeats = max(0, prompt_len - len(head)) // len(body) + 1
    return (head + body * repeats)[:prompt_len]


def prompt_ids(tokenizer, prompt_len: int, batch_size: int, vocab_size: int) -> list[list[int]]:
    """The seed's batch of identical prompts, each exactly `prompt_len` ids: the prompt's tokens repeated and
    truncated; synthetic ids when there is no tokenizer or it does not fit the model's vocabulary (a built-in
    config read with the default model's tokenizer)."""
    ids = _prompt_from_tokenizer(tokenizer, prompt_len) if tokenizer is not None else []
    if not ids or max(ids) >= vocab_size:
        ids = synthetic_ids(prompt_len, vocab_size)
    return [list(ids) for _ in range(batch_size)]


def check_fits(llm: LLM, config: BenchConfig) -> None:
    # the generator would silently stop early at the context end; the seed's formulas assume gen_len tokens
    needed = config.prompt_len + config.gen_len - 1
    if needed > llm.model.max_positions:
        raise InputError(f"prompt_len {config.prompt_len} + gen_len {config.gen_len} needs {needed} positions, "
                         f"more than the model's context of {llm.model.max_positions}")


# --- measurement ----------------------------------------------------------------------------------------

def loop_timings(llm: LLM) -> tuple[float, float]:
    """(prefill, total) seconds of the last request, device-synchronised (tests replace this)."""
    return llm.last_timings.prefill, llm.last_timings.total


def is_rank_zero() -> bool:
    """Under torchrun every rank runs the workload; only rank 0 writes the log and prints, as in the seed."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def timed_loops(llm: LLM, config: BenchConfig, ids: list[list[int]]):
    """Run the workload `loops` times; returns the completions of the last loop and per-loop timings."""
    params = SamplingParams(max_new_tokens=config.gen_len, ignore_eos=True)
    prefills, totals = [], []
    for _ in range(config.loops):
        completions = llm.generate(ids, params)
        prefill, total = loop_timings(llm)
        prefills.append(prefill)
        totals.append(total)
    produced = len(completions[0].token_ids)
    if produced != config.gen_len:
        raise RuntimeError(f"asked for {config.gen_len} new tokens with ignore_eos, got {produced}")
    return completions, prefills, totals


# --- sizes and roofline ---------------------------------------------------------------------------------

def _first(obj, *names, default=None):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return default


def log_sizes(hf_config, config: BenchConfig, dtype_bytes: int) -> tuple[int, int, int]:
    """The log's (model size, cache size, hidden size) in bytes, from the model config: the seed's numbers for
    OPT and BLOOM at 2 bytes, the model's real shape otherwise (see `model_bytes`)."""
    layers = _first(hf_config, "num_hidden_layers", "n_layer")
    hidden = _first(hf_config, "hidden_size", "n_embd")
    heads = _first(hf_config, "num_attention_heads", "n_head")
    kv_heads = _first(hf_config, "num_key_value_heads", default=heads)
    ffn = _first(hf_config, "intermediate_size", "ffn_dim")  # None: 4h (BLOOM)
    if ffn is not None:
        ffn *= _first(hf_config, "num_local_experts", default=1)  # MoE: every expert's MLP is stored
    seq = config.prompt_len + config.gen_len
    model = model_bytes(layers, hidden, hf_config.vocab_size, ffn, heads, kv_heads, dtype_bytes,
                        gated_mlp=hf_config.model_type in GATED_MLP_FAMILIES)
    cache = cache_bytes(layers, hidden, config.batch_size, seq, heads, kv_heads, dtype_bytes)
    return model, cache, hidden_bytes(hidden, config.batch_size, seq, dtype_bytes)


def _quantized(modules) -> list:
    """The quantized Linears among `modules`: their packed codes, scales and zeros are not one tensor a weight,
    so their matmul parameters are counted from their shape."""
    return [m for m in modules if getattr(m, "qspec", None) is not None and hasattr(m, "out_features")]


def _weights(model) -> tuple[int, int]:
    """(bytes read, matmul parameters) per decode step. Embedding tables are gathered (B rows), not read,
    unless the LM head shares one; every other parameter is read once per step. Streamed layers' modules hold
    empty tensors between steps: they count nothing here (see _streamed)."""
    head = _first(getattr(model, "lm_head", None), "weight")
    gathered = {id(m.weight) for m in model.modules() if isinstance(m, Embedding) and m.weight is not head}
    params = [p for i, p in {id(p): p for p in model.parameters()}.items() if i not in gathered]
    quantized = [m for m in _quantized(model.modules()) if m.qweight.numel() > 0]
    packed = {id(p) for m in quantized for p in m.parameters(recurse=False)}
    matmul = sum(p.numel() for p in params if p.ndim >= 2 and id(p) not in packed)
    return (sum(p.numel() * p.element_size() for p in params),
            matmul + sum(m.out_features * m.in_features for m in quantized))


def _links(config: BenchConfig, device: torch.device, ceilings: dict) -> dict[str, tuple[str, float]]:
    """Where resident weights ("memory"), streamed weights and KV are read from per step: (name, bytes/s)."""
    memory = ("cpu_memory" if device.type == "cpu" else "hbm", ceilings["device_copy_bytes_per_s"])
    if device.type == "cpu":
        return {"memory": memory, "weights": memory, "kv": memory}
    pcie = ("pcie", ceilings["h2d_pinned_bytes_per_s"])
    weights = memory
    if config.cpu_offload:
        weights = pcie
    elif config.disk_offload:  # NVMe -> pinned buffer -> GPU: the slower of the disk and the PCIe link
        disk = ceilings["disk"][str(Path(config.offload_dir).expanduser().resolve())]["bytes_per_s"]
        weights = ("nvme", min(disk, pcie[1]))
    return {"memory": memory, "weights": weights, "kv": pcie if config.kv_offload else memory}


def _streamed(llm: LLM) -> tuple[int, int]:
    """(bytes copied, matmul parameters) per decode step of the streamed layers, whose modules hold empty
    tensors between uses. A unit is copied whole (its flat buffer); a region whose 2-D views overlap (a fused
    weight and its q/k/v views) counts its elements once."""
    streamer = getattr(llm, "streamer", None)
    if streamer is None:
        return 0, 0
    nbytes = params = 0
    for layout in (streamer.layouts[name] for name in streamer.streamed):
        nbytes += layout.nbytes
        for region, (_, size) in enumerate(layout.regions):
            refs = [r for r in layout.refs if r.region == region and len(r.shape) >= 2]
            # packed codes (of a quantized Linear, or of the fused weight its views share) hold per_byte weights
            # a byte; their scales and zeros are no weights
            codes = [r for r in refs if getattr(r.owner, "qspec", None) is not None and r.attr == "qweight"]
            dense = [r for r in refs if getattr(r.owner, "qspec", None) is None]
            # at most the elements the region holds: views into a fused weight count once
            if codes:
                per_byte = codes[0].owner.qspec.per_byte
                params += min(sum(math.prod(r.shape) * per_byte for r in codes), size * per_byte)
            elif dense:
                params += min(sum(math.prod(r.shape) for r in dense), size // dense[0].dtype.itemsize)
    return nbytes, params


@dataclass(frozen=True)
class Work:
    """What one run of the workload moves and computes."""

    weight_bytes: int  # read per decode step from where the model lives (HBM; host memory on a CPU)
    kv_bytes: int  # read per decode step, at the mean length P + G/2
    step_flops: float  # per decode step
    prefill_flops: float
    streamed_bytes: int = 0  # copied per decode step from the offload (pinned host memory or NVMe)


def workload_work(llm: LLM, config: BenchConfig) -> Work:
    """Matmuls: 2 flops per parameter per token; attention: QK^T and AV over the keys, causal in prefill."""
    m, b, p = llm.model, config.batch_size, config.prompt_len
    weight_bytes, matmul_params = _weights(m)
    streamed_bytes, streamed_params = _streamed(llm)
    matmul_params += streamed_params
    attn_width = m.head_dim * llm.config.num_attention_heads
    mean_len = p + config.gen_len / 2
    kv_bytes = int(2 * m.num_layers * m.num_kv_heads * m.head_dim * llm.dtype.itemsize * b * mean_len)
    return Work(weight_bytes, kv_bytes, 2 * matmul_params * b + 4 * m.num_layers * b * mean_len * attn_width,
                2 * matmul_params * b * p + 2 * m.num_layers * b * p * p * attn_width, streamed_bytes)


def roofline(llm: LLM, config: BenchConfig, metrics: dict, ceilings: dict) -> dict:
    """Achieved GB/s and TFLOP/s, the floors they are held against, and achieved/ceiling ratios.

    Decode step floor: resident weight bytes over the memory they live in (HBM; host memory on a CPU),
    streamed layers' bytes over the link they come from (pinned PCIe, or the slower of NVMe and PCIe), KV
    bytes over HBM or PCIe when offloaded; the slowest part names the bound. Prefill floor: its flops at the
    matmul rate, and no less than streaming the offloaded weights once. Throughput ceilings are the batch's
    tokens at those floors.
    """
    work, b, g = workload_work(llm, config), config.batch_size, config.gen_len
    links = _links(config, llm.device, ceilings)
    parts: dict[str, float] = {}  # seconds per decode step on each link
    for kind, nbytes in (("memory", work.weight_bytes), ("weights", work.streamed_bytes), ("kv", work.kv_bytes)):
        name, rate = links[kind]
        parts[name] = parts.get(name, 0.0) + nbytes / rate
    step_floor = sum(parts.values())
    step_bytes = work.weight_bytes + work.streamed_bytes + work.kv_bytes
    streamed = work.streamed_bytes / links["weights"][1]
    prefill_floor = max(work.prefill_flops / ceilings["matmul_flops_per_s"], streamed)
    out = {
        "decode_bytes_per_step": step_bytes,
        "decode_bound": max(parts, key=parts.get),
        "decode_ceiling_gb_s": step_bytes / step_floor / 1e9,
        "decode_throughput_ceiling": b / step_floor,
        "prefill_flops": work.prefill_flops,
        "prefill_tflops": work.prefill_flops / metrics["prefill_latency"] / 1e12,
        "prefill_ceiling_tflops": ceilings["matmul_flops_per_s"] / 1e12,
        "prefill_ceiling_ratio": prefill_floor / metrics["prefill_latency"],
        "total_throughput_ceiling": b * g / (prefill_floor + (g - 1) * step_floor),
        "ceilings_device": ceilings.get("device_name"),
    }
    steps, decode_s = g - 1, metrics["decode_latency"]
    if steps > 0 and decode_s > 0:  # gen_len 1 has no decode step
        out.update(decode_gb_s=step_bytes * steps / decode_s / 1e9,
                   decode_tflops=work.step_flops * steps / decode_s / 1e12,
                   decode_ceiling_ratio=step_floor * steps / decode_s)
    return out


def machine_ceilings(config: BenchConfig, device: torch.device) -> dict:
    disk = str(Path(config.offload_dir).expanduser()) if config.disk_offload and device.type == "cuda" else None
    return get_ceilings(device, disk_dir=disk)


# --- the benchmark --------------------------------------------------------------------------------------

def _show_outputs(llm: LLM, ids: list[list[int]], completions, out: TextIO) -> list[str]:
    """The seed's verbose=2 listing: rows 0, (n-1)//2 and n-1 of the batch, prompt and continuation, each
    followed by a rule. A list as in the seed, not a set: a batch of 1 or 2 shows a row more than once."""
    n = len(completions)
    rows = [0, (n - 1) // 2, n - 1]
    texts = [llm.decode(ids[i] + completions[i].token_ids) if llm.tokenizer is not None
             else str(completions[i].token_ids) for i in rows]
    rule = "-" * 70 + "\n"
    print("Outputs:\n" + rule + "".join(f"{i}: {t}\n" + rule for i, t in zip(rows, texts)), file=out)
    return texts


def _roofline_line(r: dict) -> str:
    decode = (f"decode {r['decode_gb_s']:.2f} GB/s, {r['decode_ceiling_ratio']:.1%} of the "
              f"{r['decode_bound']} floor ({r['decode_ceiling_gb_s']:.2f} GB/s)" if "decode_gb_s" in r
              else "no decode step (gen_len 1)")
    return (f"{decode}; prefill {r['prefill_tflops']:.3f} TFLOP/s, {r['prefill_ceiling_ratio']:.1%} of its floor "
            f"(matmul {r['prefill_ceiling_tflops']:.2f} TFLOP/s)")


def run_generation(config: BenchConfig, device="auto", dtype="auto", *, compile: bool = True,
                   seed: int | None = None, pin_memory: bool = True, llm: LLM | None = None,
                   write_log: bool = True, out: TextIO | None = None) -> dict:
    """Run the seed's benchmark and return one flat dict: the configuration, the seed's metrics (last loop),
    the log sizes and the roofline figures. `llm`: a model already loaded for this configuration (sweeps
    over batch, lengths or loops reuse one). Prints per `config.verbose` to `out` (default stdout)."""
    out = out if out is not None else sys.stdout
    if llm is None:
        llm = load_bench_llm(config, device, dtype, compile=compile, seed=seed, pin_memory=pin_memory)
    else:
        reset_peak_memory(llm.device)
    check_fits(llm, config)
    ids = prompt_ids(llm.tokenizer, config.prompt_len, config.batch_size, llm.config.vocab_size)
    completions, prefills, totals = timed_loops(llm, config, ids)
    metrics = compute_metrics(prefills, totals, config.batch_size, config.prompt_len, config.gen_len,
                              peak_memory(llm.device))
    sizes = dict(zip(("model_size", "cache_size", "hidden_size"),
                     log_sizes(llm.config, config, llm.dtype.itemsize)))
    result = {**asdict(config), "device": str(llm.device), "dtype": str(llm.dtype).removeprefix("torch."),
              "world_size": world_size(config), **metrics, **sizes,
              **roofline(llm, config, metrics, machine_ceilings(config, llm.device))}
    if not is_rank_zero():
        return result
    if config.verbose >= 2:  # as in the seed, the generated text comes before the log record
        result["outputs"] = _show_outputs(llm, ids, completions, out)
    record = None
    if write_log:
        result["output_file"] = output_path(config)
        record = write_benchmark_log(result["output_file"], sizes["model_size"], sizes["cache_size"],
                                     sizes["hidden_size"], **metrics)
    if config.verbose >= 1:
        print(record or f"prefill {metrics['prefill_latency']:.3f} s, total {metrics['total_latency']:.3f} s",
              file=out)
        print(_roofline_line(result), file=out)
    return result
