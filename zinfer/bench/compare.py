"""`zinfer compare`: the seed's workload on zinfer and on each peer importable here, in one run.

Every system gets the same prompt ids, lengths, dtype and device, and the same metric definitions
(`compute_metrics` over `loops` runs, the last one counting). A peer that cannot run is a row with
status "skipped" (or "failed") and the reason, never dropped. zinfer is the subject: a user error or running
out of memory is a failed row too (the peers still run, the command exits 2); any other exception is a bug and
propagates, its traceback naming the workload.
"""

from __future__ import annotations

import gc
from dataclasses import replace

import torch

from zinfer.api import resolve_device
from zinfer.bench.metrics import BenchConfig, compute_metrics
from zinfer.bench.peers import PeerSkipped, select_peers
from zinfer.bench.run import bench_dtype, model_name, prompt_ids, reset_peak_memory, run_generation
from zinfer.errors import ZinferError
from zinfer.weights.source import resolve

METRICS = ("prefill_latency", "prefill_throughput", "decode_latency", "decode_throughput", "total_latency",
           "total_throughput", "gpu_peak_mem")
COLUMNS = ["system", "status", "prefill_latency", "decode_throughput", "total_throughput", "zinfer_decode_ratio",
           "zinfer_total_ratio"]


def release(device: torch.device) -> None:
    """Hand the last system's memory back before the next one loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def zinfer_row(config: BenchConfig, device, dtype, **options) -> dict:
    try:
        result = run_generation(config, device, dtype, write_log=False, **options)
    except ZinferError as e:  # e.g. an engine option not implemented yet: the peers still run
        return {"system": "zinfer", "status": "failed", "note": str(e)}
    except torch.OutOfMemoryError as e:  # the workload does not fit: a result, and the peers may still fit
        return {"system": "zinfer", "status": "failed", "note": f"out of memory: {str(e).splitlines()[0]}"}
    return {"system": "zinfer", "status": "ok", "note": f"LLM.generate on {result['device']} ({result['dtype']})",
            **{k: result[k] for k in METRICS}}


def peer_row(peer, config: BenchConfig, source, dtype: torch.dtype, device: torch.device, ids) -> dict:
    """One peer's row; whatever it raises (out of memory, an API change, a bad install) is a failed row with
    the reason, never a crash that loses the other peers' rows."""
    input_ids = torch.tensor(ids)
    mask = torch.ones_like(input_ids)
    try:
        ok, reason = peer.available()
        if not ok:
            return {"system": peer.name, "status": "skipped", "note": reason}
        reset_peak_memory(device)
        try:
            peer.load(config, source, dtype, device)
            runs = [peer.generate(input_ids, mask, config.gen_len) for _ in range(config.loops)]
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        finally:
            peer.unload()
            release(device)
        metrics = compute_metrics([r.prefill for r in runs], [r.total for r in runs], config.batch_size,
                                  config.prompt_len, config.gen_len, peak)
    except PeerSkipped as e:
        return {"system": peer.name, "status": "skipped", "note": str(e)}
    except Exception as e:
        return {"system": peer.name, "status": "failed", "note": f"{type(e).__name__}: {e}"}
    return {"system": peer.name, "status": "ok", "note": peer.note, **metrics}


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def add_ratios(rows: list[dict]) -> None:
    """zinfer's throughput divided by each system's: > 1 means zinfer is faster."""
    ours = rows[0]
    for row in rows:
        for metric, key in (("decode_throughput", "zinfer_decode_ratio"), ("total_throughput", "zinfer_total_ratio")):
            row[key] = _ratio(ours.get(metric), row.get(metric))


def workload_notes(config: BenchConfig) -> list[str]:
    notes = []
    if config.dummy:
        notes.append("dummy weights: each system draws its own random values; shapes, dtype and workload are "
                     "the same, so the timings compare but the generated text does not")
    if config.kv_offload:
        notes.append("peers run without KV offload (the seed's set_kv_cache_offload patches DeepSpeedExamples' "
                     "own model copies)")
    if config.quant_bits != 16:
        notes.append(f"{config.quant_bits}-bit weights: only zinfer and deepspeed (4-bit init) quantize")
    if config.quant_lm_head:
        notes.append("the LM head is packed in zinfer only: the peers keep it dense")
    return notes


def describe(workload: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in workload.items())


def compare(config: BenchConfig, device="auto", dtype="auto", *, peers=None, compile: bool = True,
            seed: int | None = None, pin_memory: bool = True) -> dict:
    """Run the workload on zinfer, then on each peer (default: all of them, the unavailable ones as skipped
    rows); returns {"workload", "rows", "notes"}, rows[0] zinfer's, each row with zinfer's throughput ratios."""
    device = resolve_device(device)
    dtype = bench_dtype(dtype, device)
    source = resolve(model_name(config))  # a bad model name fails here, before anything runs
    config = replace(config, verbose=0)  # the comparison table is the output
    offload = "cpu" if config.cpu_offload else "nvme" if config.disk_offload else "none"
    workload = dict(model=config.model, batch_size=config.batch_size, prompt_len=config.prompt_len,
                    gen_len=config.gen_len, loops=config.loops, dtype=str(dtype).removeprefix("torch."),
                    device=str(device), offload=offload, kv_offload=config.kv_offload, quant_bits=config.quant_bits,
                    **({"quant_lm_head": True} if config.quant_lm_head else {}), dummy=config.dummy)
    try:
        rows = [zinfer_row(config, device, dtype, compile=compile, seed=seed, pin_memory=pin_memory)]
    except Exception as e:  # a bug in zinfer: keep the traceback, and say which workload hit it
        e.add_note(f"zinfer compare workload: {describe(workload)}")
        raise
    release(device)
    ids = prompt_ids(source.tokenizer(), config.prompt_len, config.batch_size, source.config.vocab_size)
    for peer in peers if peers is not None else select_peers(None, pin_memory):
        rows.append(peer_row(peer, config, source, dtype, device, ids))
    add_ratios(rows)
    notes = [f"{r['system']}: {r['status']}: {r['note']}" for r in rows if r.get("note")] + workload_notes(config)
    return {"workload": workload, "rows": rows, "notes": notes}
