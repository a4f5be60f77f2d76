"""The placement plan: for every unit of weights (each decoder layer, plus the rest), where it lives.

`make_plan` is the one place placement is decided. It runs before any weight is read, from the
model's shapes (a meta-device model) and the engine options; a budget that cannot be honoured
fails here with the numbers.
"""

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from zinfer.config import EngineConfig
from zinfer.errors import InputError
from zinfer.kv import cache_len

log = logging.getLogger(__name__)

GPU, CPU, NVME = "gpu", "cpu", "nvme"
REST = "rest"  # embeddings, final norm, LM head: used at both ends of every step, always resident
ACTIVATION_RESERVE = 2 << 30  # bytes kept free on the GPU for activations and workspaces
NOMINAL_PCIE = 25e9  # bytes/s used for the printed floor when no measured ceiling is cached


@dataclass(frozen=True)
class UnitPlan:
    name: str  # "rest" or "layers.<i>"
    nbytes: int
    place: str  # gpu | cpu | nvme


@dataclass(frozen=True)
class Plan:
    units: tuple[UnitPlan, ...]
    device: str  # compute device
    gpu_budget: int | None  # bytes the weights may take on the GPU (None: CPU compute)
    buffer_bytes: int  # the double buffer streamed layers pass through
    notes: tuple[str, ...] = ()

    @property
    def streamed(self) -> list[UnitPlan]:
        return [u for u in self.units if u.place != GPU]

    def bytes_at(self, place: str) -> int:
        return sum(u.nbytes for u in self.units if u.place == place)

    def step_floor_s(self, host_to_device: float) -> float:
        """Lower bound of a decode step: every streamed byte crosses PCIe once per step."""
        return sum(u.nbytes for u in self.streamed) / host_to_device

    def table(self, host_to_device: float | None = None) -> str:
        bw = host_to_device or NOMINAL_PCIE
        lines = [f"{'unit':12} {'bytes':>12} {'place':>6}"]
        lines += [f"{u.name:12} {u.nbytes / 2**20:10.1f}Mi {u.place:>6}" for u in self.units]
        lines.append("")
        for place in (GPU, CPU, NVME):
            lines.append(f"{place:5} {self.bytes_at(place) / 2**30:8.2f} GiB")
        lines.append(f"double buffer {self.buffer_bytes / 2**30:.2f} GiB on {self.device}")
        src = "measured" if host_to_device else "nominal"
        lines.append(f"PCIe floor per decode step: {self.step_floor_s(bw) * 1e3:.1f} ms "
                     f"({sum(u.nbytes for u in self.streamed) / 2**30:.2f} GiB at {bw / 1e9:.1f} GB/s, {src})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.decoder_layers()


def _nbytes(p: torch.Tensor, dtype: torch.dtype) -> int:
    # meta shells are float32 until loaded at `dtype`; packed quantized weights keep their integer type
    return p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size())


def unit_bytes(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each unit at `dtype` (counted on the meta model: no memory is touched)."""
    layers = decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    sizes = {f"layers.{i}": sum(_nbytes(p, dtype) for p in layer.parameters()) for i, layer in enumerate(layers)}
    sizes[REST] = sum(_nbytes(p, dtype) for p in model.parameters() if id(p) not in in_layers)
    return sizes


def load_devices(model: nn.Module, plan: Plan, device: torch.device) -> Callable[[str], torch.device]:
    """Where each parameter (by its name in `model`) is read to while loading: resident units straight to
    `device`, streamed ones to host memory (from where they are packed into pinned buffers or the NVMe store).
    So host memory holds only the streamed layers, however the weights are made (dummy, converted dtype)."""
    cpu = torch.device("cpu")
    homes = {u.name: u.place for u in plan.units}
    paths = {id(m): path for path, m in model.named_modules()}
    streamed = tuple(f"{paths[id(layer)]}." for i, layer in enumerate(decoder_layers(model))
                     if homes[f"layers.{i}"] != GPU)
    return lambda name: cpu if name.startswith(streamed) else device


def _free_gpu(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0


def make_plan(model: nn.Module, options: EngineConfig, device: torch.device, dtype: torch.dtype,
              free_gpu: int | None = None) -> Plan:
    sizes = unit_bytes(model, dtype)
    layer_names = [n for n in sizes if n != REST]
    total = sum(sizes.values())
    biggest = max(sizes[n] for n in layer_names)
    stream_to = NVME if options.offload == "nvme" else CPU
    notes = []
    if device.type != "cuda":
        # CPU compute: only the disk-offloaded layers stream (into host buffers); the rest stays in memory
        place = NVME if options.offload == "nvme" else GPU
        units = [UnitPlan(REST, sizes[REST], GPU)] + [UnitPlan(n, sizes[n], place) for n in layer_names]
        return Plan(tuple(units), str(device), None, 2 * biggest if place == NVME else 0, tuple(notes))

    free = _free_gpu(device) if free_gpu is None else free_gpu
    budget = options.gpu_memory
    if budget is None:
        budget = max(0, free - ACTIVATION_RESERVE)
        if options.offload in (CPU, NVME):
            budget = min(budget, sizes[REST] + 2 * biggest)  # offload asked: stream every layer
    if budget > free:
        raise InputError(f"gpu_memory={budget / 2**30:.2f} GiB is more than the {free / 2**30:.2f} GiB free on "
                         f"{device}")
    fits = total + ACTIVATION_RESERVE <= free
    if options.offload == "auto" and total <= budget:
        return Plan(tuple(UnitPlan(n, sizes[n], GPU) for n in sizes), str(device), budget, 0,
                    ("the model fits on the GPU: nothing is offloaded",))
    need = sizes[REST] + 2 * biggest
    if budget < need:
        raise InputError(f"gpu_memory={budget / 2**30:.2f} GiB cannot hold the resident embeddings/head "
                         f"({sizes[REST] / 2**30:.2f} GiB) plus the double buffer for streamed layers "
                         f"(2 x {biggest / 2**30:.2f} GiB); give at least {need / 2**30:.2f} GiB")
    # keep as many layers resident as the budget allows after the rest and the double buffer
    room = budget - sizes[REST] - 2 * biggest
    units = [UnitPlan(REST, sizes[REST], GPU)]
    for n in layer_names:
        if sizes[n] <= room:
            room -= sizes[n]
            units.append(UnitPlan(n, sizes[n], GPU))
        else:
            units.append(UnitPlan(n, sizes[n], stream_to))
    if all(u.place == GPU for u in units):
        return Plan(tuple(units), str(device), budget, 0, ("every layer fits in gpu_memory: none is streamed",))
    streamed = sum(u.nbytes for u in units if u.place != GPU)
    if fits and options.offload in (CPU, NVME):
        msg = (f"offload={options.offload!r} requested but the model ({total / 2**30:.2f} GiB) fits in the "
               f"{free / 2**30:.2f} GiB free on the GPU: streaming {streamed / 2**30:.2f} GiB per decode step costs "
               f"about {streamed / NOMINAL_PCIE * 1e3:.0f} ms at PCIe speed; use offload='auto' to keep it resident")
        log.warning(msg)
        notes.append(msg)
    if stream_to == CPU and options.cpu_memory is not None and streamed > options.cpu_memory:
        raise InputError(f"cpu_memory={options.cpu_memory / 2**30:.2f} GiB cannot hold the "
                         f"{streamed / 2**30:.2f} GiB of offloaded layers; raise it or use offload='nvme'")
    return Plan(tuple(units), str(device), budget, 2 * biggest, tuple(notes))


# --- the KV cache: where it lives, where decode attention over it runs, how large a batch fits -------------

NOMINAL_HOST_MEMORY = 50e9  # bytes/s a CPU streams from DRAM: attention on the CPU is bound by it
NOMINAL_CPU_FLOPS = 200e9  # fp32 FLOP/s of a server CPU's cores together
HOST_ROUND_TRIP = 30e-6  # s per layer for CPU attention: a device sync plus two small copies
# Measured fraction of the host copy bandwidth that CPU attention over a half-precision cache reaches: OPT-66B int4,
# batch 16, 544 tokens, H200 host (183 GB/s copy): 21.7 ms a layer against 8.7 ms modelled (BENCHMARKS.md). The
# gather of the token-major cache into [B, H, n, D] fp32 is the likely cost (not profiled).
HOST_ATTENTION_EFFICIENCY = 0.4
# Compiled attention reads the cache once as it lies, at a fraction of the DRAM read rate of all cores (a
# half-precision sum, `host_read`): alone on an H100 host, 43 of 78 GB/s (0.55); during generation the weight and KV
# DMA reads share the same DRAM (OPT-66B int4 streamed at 55 GB/s on an H200 host: ~31 GB/s of cache, 41 ms a
# layer at batch 62; BENCHMARKS.md).
HOST_COMPILED_EFFICIENCY = 0.4
NOMINAL_HOST_READ = 60e9  # bytes/s all cores of a GPU server read from DRAM
HOST_RESERVE = 4 << 30  # host bytes left for everything but the cache when sizing batches
GPU_FILL, HOST_FILL = 0.95, 0.9  # fractions of free memory a cache may take (the runtime checks the same)


@dataclass(frozen=True)
class Bandwidths:
    """The rates the KV cost model needs; `source` says whether they were measured."""

    pcie: float = NOMINAL_PCIE  # pinned host -> device bytes/s
    host_memory: float = NOMINAL_HOST_MEMORY  # host DRAM bytes/s (read + write counted, as ceilings measure)
    cpu_flops: float = NOMINAL_CPU_FLOPS
    source: str = "nominal"
    host_read: float = NOMINAL_HOST_READ  # host DRAM bytes/s read by all cores (compiled CPU attention's bound)


def cached_bandwidths(device: torch.device) -> Bandwidths:
    """Ceilings measured earlier on this machine (`zinfer bench` caches them); nominal where absent.
    Never measures: this runs when a model loads."""
    from zinfer.bench.ceilings import _load, cache_path

    cpu = _load(cache_path("cpu")) or {}
    gpu = (_load(cache_path(device)) or {}) if device.type == "cuda" else {}
    found = {"pcie": gpu.get("h2d_pinned_bytes_per_s"), "host_memory": cpu.get("device_copy_bytes_per_s"),
             "cpu_flops": cpu.get("matmul_flops_per_s"), "host_read": cpu.get("host_read_bytes_per_s")}
    known = {k: v for k, v in found.items() if v}
    source = "measured" if len(known) == len(found) else "partly measured" if known else "nominal"
    return Bandwidths(**known, source=source)


@dataclass(frozen=True)
class KVShape:
    """What the KV cost model and the batch sizing need to know about a model."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    ffn: int
    vocab: int
    itemsize: int  # bytes per cached element

    @property
    def token_bytes(self) -> int:
        """Keys and values of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.itemsize

    def prefill_bytes(self, prompt_len: int) -> int:
        """Rough peak activations of one sequence's prefill in one layer: residual, q/k/v, attention output,
        the MLP's (gate and) up projection, plus the last position's fp32 logits."""
        kv = 2 * self.kv_heads * self.head_dim
        return prompt_len * (4 * self.hidden + kv + 2 * self.ffn) * self.itemsize + 4 * self.vocab


def kv_shape(model: nn.Module, dtype: torch.dtype) -> KVShape:
    config = model.config
    # per rank: model.num_kv_heads is this rank's share under tensor parallelism; query heads follow the group
    group = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    heads = model.num_kv_heads * group
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * config.hidden_size
    return KVShape(model.num_layers, heads, model.num_kv_heads, model.head_dim, config.hidden_size, ffn,
                   config.vocab_size, dtype.itemsize)


@dataclass(frozen=True)
class KVChoice:
    """Where decode attention over an offloaded cache runs, the estimated step times, and why."""

    method: str  # gpu | cpu | split
    gpu_s: float  # estimated decode step with the cache prefetched to the GPU
    cpu_s: float  # ... with attention on the CPU
    reason: str
    split_s: float = math.inf  # ... with the first `gpu_rows` sequences on the GPU and the rest on the CPU
    gpu_rows: int = 0  # "split": sequences [0, gpu_rows) attend on the GPU (0 for the other methods)

    def __str__(self) -> str:
        return f"decode attention on {self.method}: {self.reason}"


def _gpu_attention_s(shape: KVShape, rows: int, length: int, bw: Bandwidths, streamed_bytes: int) -> float:
    """Every layer's keys and values of `rows` sequences cross PCIe, sharing the link with the streamed weights."""
    return (streamed_bytes + shape.layers * 2 * rows * length * shape.kv_heads * shape.head_dim * shape.itemsize
            ) / bw.pcie


def _cpu_attention_s(shape: KVShape, rows: int, length: int, bw: Bandwidths, host_compiled: bool) -> float:
    """The CPU's share of a step: 4·rows·H·n·D FLOPs a layer, and the layer's cache read from DRAM: compiled,
    once as it lies at HOST_COMPILED_EFFICIENCY of the host read rate; eagerly, upcasting half precision to fp32
    (read 2, write 4, read 4 bytes an element) at HOST_ATTENTION_EFFICIENCY of the host copy rate; plus a round
    trip a layer."""
    elements = 2 * rows * length * shape.kv_heads * shape.head_dim
    if host_compiled:
        memory_s = elements * shape.itemsize / (bw.host_read * HOST_COMPILED_EFFICIENCY)
    else:
        touched = shape.itemsize + (8 if shape.itemsize < 4 else 0)
        memory_s = elements * touched / (bw.host_memory * HOST_ATTENTION_EFFICIENCY)
    flops = 4 * rows * shape.heads * length * shape.head_dim
    per_layer = max(flops / bw.cpu_flops, memory_s)
    return shape.layers * (per_layer + HOST_ROUND_TRIP)


def kv_attention_costs(shape: KVShape, batch: int, length: int, bw: Bandwidths,
                       streamed_bytes: int = 0, host_compiled: bool = False) -> tuple[float, float]:
    """(gpu, cpu) seconds of one decode step over an offloaded cache holding `length` tokens a row.

    gpu: every layer's keys and values cross PCIe, 2·B·n·H_kv·D elements, sharing the link with the weights
    streamed per step. cpu: q, k, v and the output (~B·(2·H + 2·H_kv)·D) cross PCIe and the CPU reads the cache
    (`_cpu_attention_s`). The GPU waits on each layer, the weight stream overlaps.
    """
    gpu_s = _gpu_attention_s(shape, batch, length, bw, streamed_bytes)
    cpu_s = max(streamed_bytes / bw.pcie, _cpu_attention_s(shape, batch, length, bw, host_compiled))
    return gpu_s, cpu_s


def split_cost(shape: KVShape, batch: int, length: int, bw: Bandwidths, streamed_bytes: int = 0,
               host_compiled: bool = False) -> tuple[int, float]:
    """(rows on the GPU, seconds) of the best split of a batch between the two methods, which run at once: the
    GPU's rows load PCIe (with the weights), the CPU's rows load host memory, so the step takes the longer of the
    two. (0, inf) for a batch of one."""
    best = (0, math.inf)
    for rows in range(1, batch):
        step = max(_gpu_attention_s(shape, rows, length, bw, streamed_bytes),
                   _cpu_attention_s(shape, batch - rows, length, bw, host_compiled))
        if step < best[1]:
            best = (rows, step)
    return best


def pick_kv_attention(shape: KVShape, batch: int, length: int, bw: Bandwidths, forced: str = "auto",
                      streamed_bytes: int = 0, host_compiled: bool = False, concurrent: bool = True) -> KVChoice:
    """The cheapest of the three (ties go to the GPU, then the CPU), unless `forced` names one. A batch of one
    cannot be split: "split" then runs on the cheaper of the other two, and says so. `concurrent`: the two shares
    of a split can run at once, so auto may split. They cannot on a CPU compute device (both run on the same
    cores) nor over an unpinned cache (CUDA stages a pageable host-to-device copy through its own buffers and
    returns only when it is staged: the prefetch holds the host thread the CPU share needs)."""
    gpu_s, cpu_s = kv_attention_costs(shape, batch, length, bw, streamed_bytes, host_compiled)
    rows, split_s = split_cost(shape, batch, length, bw, streamed_bytes, host_compiled)
    kv_gib = 2 * shape.layers * batch * length * shape.kv_heads * shape.head_dim * shape.itemsize / 2**30
    costs = (f"{gpu_s * 1e3:.1f} ms/step on gpu (moves {kv_gib:.2f} GiB of KV over PCIe at {bw.pcie / 1e9:.0f} "
             f"GB/s) vs {cpu_s * 1e3:.1f} ms/step on cpu (at {bw.cpu_flops / 1e9:.0f} GFLOP/s, "
             f"{(bw.host_read if host_compiled else bw.host_memory) / 1e9:.0f} GB/s host memory)")
    if rows:
        costs += f" vs {split_s * 1e3:.1f} ms/step split ({rows} of {batch} sequences on gpu)"
    costs += f"; batch {batch}, {length} tokens, {bw.source} rates"
    choice = partial(KVChoice, gpu_s=gpu_s, cpu_s=cpu_s, split_s=split_s)
    if forced in ("gpu", "cpu"):
        return choice(forced, reason=f"kv_attention={forced!r} asked for; estimated {costs}")
    if forced == "split":
        if rows:
            return choice("split", reason=f"kv_attention='split' asked for; estimated {costs}", gpu_rows=rows)
        method = "gpu" if gpu_s <= cpu_s else "cpu"
        return choice(method, reason=f"kv_attention='split' asked for, but a batch of one cannot be split: "
                                     f"{method}, estimated {costs}")
    method = min((gpu_s, 0, "gpu"), (cpu_s, 1, "cpu"), (split_s if concurrent else math.inf, 2, "split"))[2]
    if not concurrent:
        costs += "; the shares of a split would run one after the other here (a CPU compute device or an unpinned " \
                 "cache)"
    return choice(method, reason=f"auto: {costs}", gpu_rows=rows if method == "split" else 0)


@dataclass(frozen=True)
class KVPolicy:
    """The KV options and the rates the runtime picks the attention method with, once per batch shape."""

    offload: bool = False
    pin: bool = False
    async_writes: bool = False
    attention: str = "auto"  # auto | gpu | cpu | split
    bandwidths: Bandwidths = Bandwidths()
    streamed_bytes: int = 0  # weight bytes crossing PCIe per decode step (the gpu method shares the link)
    host_compiled: bool = False  # attention on the CPU runs compiled (`decode_attention`), not eagerly
    concurrent: bool = True  # a split's shares run at once (a GPU, a pinned cache): auto may split the batch

    def pick(self, shape: KVShape, batch: int, length: int) -> KVChoice:
        return pick_kv_attention(shape, batch, length, self.bandwidths, self.attention, self.streamed_bytes,
                                 self.host_compiled, self.concurrent)

    def describe(self) -> str:
        if not self.offload:
            return "KV cache: on the compute device"
        pinned = "pinned " if self.pin else ""
        writes = "async device-to-host writes on a side stream" if self.async_writes else "synchronous writes"
        on_cpu = "" if self.attention == "gpu" else \
            f" (on the CPU: {'compiled' if self.host_compiled else 'eager'})"
        return f"KV cache: offloaded to {pinned}CPU memory, {writes}; decode attention: {self.attention}{on_cpu}"


def kv_policy(options: EngineConfig, device: torch.device, plan: Plan | None = None,
              bandwidths: Bandwidths | None = None, compile: bool | None = None) -> KVPolicy:
    """`compile`: the engine's wish (None = auto). Attention on the CPU is compiled when the compute device is a
    GPU (a model big enough to offload amortises the one-off compile) unless compile=False, and on a CPU
    compute device only with compile=True."""
    if not options.kv_offload:
        return KVPolicy()
    streamed = sum(u.nbytes for u in plan.streamed) if plan is not None and device.type == "cuda" else 0
    host_compiled = device.type == "cuda" if compile is None else compile
    return KVPolicy(True, options.pin_kv_cache, options.async_kv_offload, options.kv_attention,
                    bandwidths or cached_bandwidths(device), streamed, host_compiled,
                    device.type == "cuda" and options.pin_kv_cache)


def _fit(free: int, per_seq: int, fill: float) -> int:
    return max(0, int(free * fill) // per_seq) if per_seq > 0 else 0


def max_batch(model: nn.Module, dtype: torch.dtype, seq_len: int, free_gpu_bytes: int, free_host_bytes: int,
              kv_offload: bool, kv_attention: str = "gpu", prompt_len: int | None = None) -> int:
    """The largest batch whose KV cache (sequences of `seq_len` = prompt + new tokens) fits.

    free_gpu_bytes: GPU memory left after weights, streaming buffers and workspaces; free_host_bytes: host
    memory available. On the GPU each sequence takes its cache plus its prefill activations and decode
    state; offloaded, its cache takes host memory, and the GPU holds the activations plus, for
    kv_attention="gpu" ("auto" and "split" are sized like "gpu", the larger), the double buffer of one layer's
    keys/values.
    """
    shape = kv_shape(model, dtype)
    t = cache_len(seq_len, kv_offload)
    cache = shape.token_bytes * t
    gpu_per_seq = shape.prefill_bytes(prompt_len or seq_len) + 9 * t  # + key mask (1 B) and positions (8 B)
    if not kv_offload:
        return _fit(free_gpu_bytes, cache + gpu_per_seq, GPU_FILL)
    if kv_attention != "cpu":
        gpu_per_seq += 2 * cache // shape.layers
    host = _fit(max(0, free_host_bytes - HOST_RESERVE), cache, HOST_FILL)
    return min(host, _fit(free_gpu_bytes, gpu_per_seq, GPU_FILL))


def free_host_bytes() -> int:
    """Host memory available to allocate now (MemAvailable: free plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError as err:
        log.warning(f"cannot read /proc/meminfo ({err}); using free physical pages")
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_plan_text(model: nn.Module, dtype: torch.dtype, options: EngineConfig, prompt_len: int, gen_len: int,
                 free_gpu_bytes: int, free_host_bytes: int, batch: int | None = None,
                 bandwidths: Bandwidths | None = None, streamed_bytes: int = 0, host_compiled: bool = False) -> str:
    """What `zinfer plan` prints about the KV cache: placement, the attention method it would pick for
    `batch`, and the largest batch that fits each way."""
    seq = prompt_len + gen_len
    bw = bandwidths or Bandwidths()
    policy = KVPolicy(options.kv_offload, options.pin_kv_cache, options.async_kv_offload, options.kv_attention,
                      bw, streamed_bytes, host_compiled, concurrent=options.pin_kv_cache)  # planned for a GPU
    lines = [policy.describe()]
    shape = kv_shape(model, dtype)
    on_gpu = max_batch(model, dtype, seq, free_gpu_bytes, free_host_bytes, False, prompt_len=prompt_len)
    method = options.kv_attention
    if options.kv_offload and batch:
        choice = policy.pick(shape, batch, prompt_len + gen_len // 2)
        method = choice.method
        lines.append(f"  batch {batch} x {seq} tokens: {batch * shape.token_bytes * seq / 2**30:.2f} GiB; {choice}")
    offloaded = max_batch(model, dtype, seq, free_gpu_bytes, free_host_bytes, True, method, prompt_len)
    lines.append(f"largest batch for {prompt_len}+{gen_len} tokens: {on_gpu} with the KV cache on the GPU "
                 f"({free_gpu_bytes / 2**30:.1f} GiB free after weights), {offloaded} offloaded "
                 f"({free_host_bytes / 2**30:.1f} GiB host memory free, attention on "
                 f"{'gpu' if method == 'auto' else method})")
    return "\n".join(lines)
