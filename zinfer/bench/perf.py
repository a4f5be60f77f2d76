"""Per-token latency, bandwidth and TFLOP/s as DeepSpeed's DSPipeline `Performance` reports them."""

from __future__ import annotations

# Bytes per weight by dtype name; torch dtypes are accepted through their str() ("torch.bfloat16").
_DTYPE_BYTES = {
    "float16": 2, "fp16": 2, "half": 2,
    "bfloat16": 2, "bf16": 2,
    "int8": 1, "uint8": 1,
    "float32": 4, "fp32": 4, "float": 4,
}


def dtype_bytes(dtype) -> int:
    """Bytes per weight for a dtype given as a torch.dtype or a name ("bf16", "float16", "int8", ...)."""
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def _config_int(config, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"config {type(config).__name__} has none of the attributes {names}")


class Performance:
    @staticmethod
    def print_perf_stats(latency_set, config, dtype, batch_size: int, warmup: int = 3) -> dict:
        """Print and return the seed's figures for per-token latencies (seconds), warm-up stripped.

        As in the seed, parameters are approximated as 12*L*h^2 (attention 4h^2 + MLP 8h^2, no
        embeddings), bandwidth is those weight bytes read once per token, and "TFlops/s" is the seed's
        figure bytes*batch/latency. `model_tflops` adds the physical 2*params*batch/latency rate.
        """
        measured = [float(t) for t in latency_set]
        latencies = measured[warmup:]
        if not latencies:
            raise ValueError(f"print_perf_stats got {len(measured)} latencies, all consumed by "
                             f"warmup={warmup}; run more iterations")
        avg = sum(latencies) / len(latencies)
        num_layers = _config_int(config, ("num_layers", "num_hidden_layers", "n_layer"))
        hidden_size = _config_int(config, ("hidden_size", "n_embd"))
        num_parameters = num_layers * hidden_size * hidden_size * 12
        num_bytes = dtype_bytes(dtype)
        stats = {
            "count": len(latencies),
            "avg_latency_ms": avg * 1000,
            "bandwidth_gbps": num_parameters * num_bytes / avg / 1e9,
            "tflops": num_parameters * num_bytes * batch_size / avg / 1e12,
            "model_tflops": 2 * num_parameters * batch_size / avg / 1e12,
            "num_parameters": num_parameters,
            "num_bytes": num_bytes,
        }
        print(f"Avg Per Token Latency: {stats['avg_latency_ms']:8.2f} ms")
        print(f"Avg BW: {stats['bandwidth_gbps']:8.2f} GB/s")
        print(f"Avg flops: {stats['tflops']:8.2f} TFlops/s")
        return stats
