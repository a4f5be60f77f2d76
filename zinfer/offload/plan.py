"""The placement plan: for every unit of weights (each decoder layer, plus the rest), where it lives.

`make_plan` is the one place placement is decided. It runs before any weight is read, from the
model's shapes (a meta-device model) and the engine options; a budget that cannot be honoured
fails here with the numbers.
"""

import logging
from dataclasses import dataclass

import torch
from torch import nn

from zinfer.config import EngineConfig
from zinfer.errors import InputError

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
