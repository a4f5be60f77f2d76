"""The `run_generation` benchmark's configuration, metrics, byte counts and log (ZeRO-Inference contract).

Users compare our numbers with DeepSpeed's ZeRO-Inference `run_model.py`, so the definitions here are
the seed's, including its quirks: the metrics come from the *last* loop iteration (earlier ones are
warm-up), and the log reports binary gigabytes. The byte counts are the seed's tally where the seed's OPT-style
formula describes the model (MHA, a 4h MLP, 2 bytes) and the model's real shape where it does not (see
`model_bytes`). Everything is pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1 << 30  # the seed's log reports binary gigabytes


@dataclass(frozen=True)
class BenchConfig:
    """Every flag of the seed's `run_generation`, with the defaults of its command line."""

    model: str = "facebook/opt-1.3b"
    batch_size: int = 1
    prompt_len: int = 512
    gen_len: int = 32
    cpu_offload: bool = False
    disk_offload: bool = False
    offload_dir: str = "~/offload_dir"
    num_nodes: int = 1
    num_gpus_per_node: int = 1
    dummy: bool = False
    output_file: str = "auto"  # the seed's --log-file; "auto" names it from the config
    verbose: int = 2  # 0 silent, 1 metrics, 2 metrics and generated text
    kv_offload: bool = False
    quant_bits: int = 16  # 16 means unquantized weights
    quant_group_size: int = 64
    quant_lm_head: bool = False  # pack the LM head too
    pin_kv_cache: bool = False
    async_kv_offload: bool = False
    loops: int = 3

    def __post_init__(self):
        for name in ("batch_size", "prompt_len", "gen_len", "num_nodes", "num_gpus_per_node", "loops",
                     "quant_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BenchConfig.{name} must be a positive int, got {value!r}")
        if self.quant_bits not in (4, 8, 16):
            raise ValueError(f"BenchConfig.quant_bits must be 4, 8 or 16, got {self.quant_bits!r}")
        if self.quant_lm_head and self.quant_bits == 16:
            raise ValueError("BenchConfig.quant_lm_head packs the LM head like the layers: it needs quant_bits 4 or 8")
        if self.verbose not in (0, 1, 2):
            raise ValueError(f"BenchConfig.verbose must be 0, 1 or 2, got {self.verbose!r}")
        # The seed silently prefers cpu when both are set; a plan must not guess which one was meant.
        if self.cpu_offload and self.disk_offload:
            raise ValueError("BenchConfig: cpu_offload and disk_offload are exclusive; choose one")


def compute_metrics(prefill_latencies: list[float], total_latencies: list[float], batch_size: int,
                    prompt_len: int, gen_len: int, gpu_peak_mem: int) -> dict:
    """The seed's metrics from per-loop timings (seconds): only the last loop counts, as in the seed."""
    if not prefill_latencies or len(prefill_latencies) != len(total_latencies):
        raise ValueError(f"compute_metrics needs one prefill and one total latency per loop, got "
                         f"{len(prefill_latencies)} prefill and {len(total_latencies)} total")
    prefill_latency = float(prefill_latencies[-1])
    total_latency = float(total_latencies[-1])
    if prefill_latency <= 0 or total_latency <= 0:
        raise ValueError(f"latencies must be positive, got prefill={prefill_latency} total={total_latency}")
    decode_latency = total_latency - prefill_latency
    return {
        "prefill_latency": prefill_latency,
        "prefill_throughput": batch_size * prompt_len / prefill_latency,
        "decode_latency": decode_latency,
        # The first generated token comes out of prefill, hence G - 1; the clamp is the seed's.
        "decode_throughput": batch_size * (gen_len - 1) / max(decode_latency, 1e-10),
        "total_latency": total_latency,
        "total_throughput": batch_size * gen_len / total_latency,
        "gpu_peak_mem": int(gpu_peak_mem),
    }


def auto_output_file(config: BenchConfig) -> str:
    """The seed's `get_filename(...) + ".log"`.

    e.g. ds-opt-175b-bs8-prompt512-gen32-n1x1-cpu-kv_offload-w_quant.log; "-w_quant" for any bits != 16.
    """
    short_name = config.model.rstrip("/").split("/")[-1]
    placement = "cpu" if config.cpu_offload else "disk" if config.disk_offload else "gpu"
    name = (f"ds-{short_name}-bs{config.batch_size}-prompt{config.prompt_len}-gen{config.gen_len}-"
            f"n{config.num_nodes}x{config.num_gpus_per_node}-{placement}")
    if config.kv_offload:
        name += "-kv_offload"
    if config.quant_bits != 16:
        name += "-w_quant"
    return name + ".log"


def output_path(config: BenchConfig) -> str:
    """Where the log goes: the given file, or the auto name when output_file is "auto"."""
    return auto_output_file(config) if config.output_file == "auto" else config.output_file


def write_benchmark_log(filename: str, model_size: int, cache_size: int, hidden_size: int, gpu_peak_mem: int,
                        prefill_latency: float, prefill_throughput: float, decode_latency: float,
                        decode_throughput: float, total_latency: float, total_throughput: float) -> str:
    """Append the seed's four-line record to `filename` and return it (without the final newline).

    Argument names match `compute_metrics`'s keys: `write_benchmark_log(f, m, c, h, **metrics)`.
    """
    lines = [
        f"model size: {model_size / GB:.3f} GB\tcache size: {cache_size / GB:.3f} GB\t"
        f"hidden size (p): {hidden_size / GB:.3f} GB",
        f"peak gpu mem: {gpu_peak_mem / GB:.3f} GB\tprefill latency: {prefill_latency:.3f} s\t"
        f"prefill throughput: {prefill_throughput:.3f} token/s",
        f"decode latency: {decode_latency:.3f} s\tdecode throughput: {decode_throughput:.3f} token/s",
        f"total latency: {total_latency:.3f} s\ttotal throughput: {total_throughput:.3f} token/s",
    ]
    record = "\n".join(lines)
    with open(filename, "a") as fout:
        fout.write(record + "\n")
    return record


def _kv_dim(hidden_size: int, num_heads: int | None, num_kv_heads: int | None) -> int:
    """Width of K (or V) per token: hidden_size, shrunk by grouped-query attention."""
    if num_heads is None or num_kv_heads is None or num_kv_heads == num_heads:
        return hidden_size
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads} "
                         f"do not split into whole heads and groups")
    return hidden_size // num_heads * num_kv_heads


def model_bytes(num_layers: int, hidden_size: int, vocab_size: int, ffn_size: int | None = None,
                num_heads: int | None = None, num_kv_heads: int | None = None, dtype_bytes: int = 2,
                gated_mlp: bool = False) -> int:
    """Weight bytes by the seed's tally (DeepSpeedExamples' zero_inference `utils.model_bytes`), generalised.

    Equal to the seed's for ffn_size None or 4h, num_kv_heads == num_heads, gated_mlp False and dtype_bytes 2:
    OPT and BLOOM, the families the seed was written for. Per layer it is then the seed's h(3h+1) + h(h+1)
    (attention; one bias of h on the fused QKV), h(4h+1) + 4h(h+1) (MLP), 4h (two layer norms), plus
    V(h+1) for the embedding. Different, on purpose, where the seed's formula does not describe the model:
    grouped-query attention (K and V are h*kv/heads wide, not h), a gated MLP (a third h x ffn projection),
    an intermediate size other than 4h (Llama-3-8B: 14336 for h 4096), and other dtypes (the seed always
    counts 2 bytes). So for Llama, Mistral, Qwen2 or Mixtral our "model size" is the model's and not the
    number DeepSpeed's log prints for it. Kept from the seed everywhere: its bias terms (a few h per layer;
    Llama has none) and one embedding table (an untied LM head, as Llama-3's, is not counted).
    """
    h = hidden_size
    ffn = 4 * h if ffn_size is None else ffn_size
    kv = _kv_dim(h, num_heads, num_kv_heads)
    attention = h * (h + 2 * kv + 1) + h * (h + 1)
    mlp = h * (ffn + 1) + ffn * (h + 1) + (h * (ffn + 1) if gated_mlp else 0)
    layer_norms = h * 4
    embedding = vocab_size * (h + 1)
    return dtype_bytes * (num_layers * (attention + mlp + layer_norms) + embedding)


def cache_bytes(num_layers: int, hidden_size: int, batch_size: int, seq_len: int,
                num_heads: int | None = None, num_kv_heads: int | None = None, dtype_bytes: int = 2) -> int:
    """KV-cache bytes: K and V for every layer, sequence position and batch row.

    The seed's 2*B*S*L*h*2 for MHA and 2 bytes; with grouped-query attention K and V are h*kv/heads wide (the
    seed, counting h, overstates a Llama-3 cache 4x).
    """
    kv = _kv_dim(hidden_size, num_heads, num_kv_heads)
    return 2 * batch_size * seq_len * num_layers * kv * dtype_bytes


def hidden_bytes(hidden_size: int, batch_size: int, seq_len: int, dtype_bytes: int = 2) -> int:
    """Bytes of one layer's hidden states for the whole batch and sequence (seed: B*S*h*2)."""
    return batch_size * seq_len * hidden_size * dtype_bytes
