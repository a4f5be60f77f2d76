"""The weight streamer: layer i+1's weights are copied to the compute device while layer i computes.

Each unit (a decoder layer) is packed as one flat byte buffer: pinned host memory, or an NVMe
store read into pinned staging buffers. Before a streamed layer runs, its parameters are pointed
at its slot of a double buffer on the device; the copy of the next streamed layer into the other
slot runs on a side CUDA stream, ordered by events:

    prefetch(j):  copy stream waits "slot free"(j % 2)  ->  copy unit j  ->  record "ready"(j)
    layer j:      compute stream waits "ready"(j)  ->  compute  ->  record "slot free"(j % 2)

prefetch(j + 1) is issued as layer j starts, except when unit j + 1 shares j's slot (the wrap from the last
unit to the next step's first, with an odd count): then as layer j ends, once its "slot free" is recorded.

With `sync=True` (debugging) each layer is copied just before it runs, on the compute stream.
On a CPU device the "copy" is the NVMe read itself: the layer computes from its staging buffer.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from zinfer.layers.linear import MergedLinears
from zinfer.offload.host import aligned_empty, resolve_pin
from zinfer.offload.plan import CPU, GPU, NVME, REST, Plan, decoder_layers

ALIGN = 256  # start of each tensor storage in a unit's flat buffer
PAGE = 4096


@dataclass
class Ref:
    """One tensor a module reads in forward: `owner.attr`, a view of region `region` of the unit."""

    owner: object
    attr: str
    region: int
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int  # storage offset, in elements


class UnitLayout:
    """How a unit's tensors are laid out in one flat byte buffer (storages packed once, views rebuilt)."""

    def __init__(self, modules: list[nn.Module], skip: set[int] | None = None):
        self.refs: list[Ref] = []
        self.regions: list[tuple[int, int]] = []  # (start, nbytes) in the flat buffer
        self.sources: list[torch.Tensor] = []  # the storage of each region, as a flat uint8 tensor (at build)
        storages: dict[int, int] = {}
        end = 0
        for owner, attr, t in _tensors(modules, skip or set()):
            key = t.untyped_storage().data_ptr()
            if key not in storages:
                storage = t.untyped_storage()
                storages[key] = len(self.regions)
                self.regions.append((_align(end), storage.nbytes()))
                end = _align(end) + storage.nbytes()
                self.sources.append(torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage))
            self.refs.append(Ref(owner, attr, storages[key], t.dtype, tuple(t.shape), tuple(t.stride()),
                                 t.storage_offset()))
        self.nbytes = _align(end, PAGE)  # whole pages: the NVMe store reads units with O_DIRECT

    def pack_into(self, flat: torch.Tensor) -> None:
        for (start, n), src in zip(self.regions, self.sources):
            flat[start:start + n].copy_(src)

    def release_sources(self) -> None:
        self.sources = []

    def point(self, flat: torch.Tensor) -> None:
        """Make every module tensor of the unit a view into `flat` (a device slot or a host buffer)."""
        for r in self.refs:
            start, n = self.regions[r.region]
            base = flat[start:start + n].view(r.dtype)
            view = base.as_strided(r.shape, r.stride, base.storage_offset() + r.offset)  # offsets are absolute
            current = getattr(r.owner, r.attr)
            if isinstance(current, nn.Parameter):
                current.data = view
            else:
                setattr(r.owner, r.attr, view)

    def detach(self, device) -> None:
        """Point at empty tensors, so the module holds no memory while its unit is not loaded."""
        for r in self.refs:
            current = getattr(r.owner, r.attr)
            empty = torch.empty(0, dtype=r.dtype, device=device)
            if isinstance(current, nn.Parameter):
                current.data = empty
            else:
                setattr(r.owner, r.attr, empty)


def _align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def _tensors(modules: list[nn.Module], skip: set[int]):
    """(owner, attr, tensor) for every parameter and fused weight the modules own, minus `skip` (by id)."""
    seen = set()
    for root in modules:
        for module in root.modules():
            if id(module) in skip or id(module) in seen:
                continue
            seen.add(id(module))
            for name, p in module.named_parameters(recurse=False):
                yield module, name, p
            for value in vars(module).values():
                if isinstance(value, MergedLinears):
                    for name, t in value.fused_tensors().items():
                        yield value, name, t


class WeightStreamer:
    def __init__(self, model: nn.Module, plan: Plan, device: torch.device, store=None, sync: bool = False,
                 pin: bool = True):
        self.model, self.plan, self.device, self.sync = model, plan, torch.device(device), sync
        self.cuda = self.device.type == "cuda"
        self.pin = resolve_pin(pin)
        layers = decoder_layers(model)
        places = {u.name: u.place for u in plan.units}
        self.layers = list(layers)
        self.layouts = {f"layers.{i}": UnitLayout([m]) for i, m in enumerate(self.layers)}
        rest_skip = {id(m) for m in layers.modules()}
        self.layouts[REST] = UnitLayout([model], skip=rest_skip)
        self.streamed = [n for n in self.layouts if n != REST and places[n] != GPU]
        self.index = {n: i for i, n in enumerate(self.streamed)}
        self.store, self.host = store, {}
        self._place(places)
        self.slots = self._alloc_slots()
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda and not sync else None
        self.ready: dict[int, object] = {}  # streamed index -> Future of the "unit is in its slot" event
        self.slot_free = [None, None]
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="zinfer-stream") if store is not None else None
        self.staging = [aligned_empty(self._slot_bytes(), pin=self.pin) for _ in range(2)] if store else []
        self.staging_done = [None, None]
        self._lock = threading.Lock()
        self.hooks = [model.register_forward_pre_hook(lambda module, args: self.start())]
        for name in self.streamed:
            layer = self.layers[int(name.split(".")[1])]
            self.hooks.append(layer.register_forward_pre_hook(self._pre_hook(name)))
            self.hooks.append(layer.register_forward_hook(self._post_hook(name)))

    # --- placement at build time ---------------------------------------------------------------
    def _place(self, places: dict[str, str]) -> None:
        """Move each unit to its home: device memory, pinned host memory or the NVMe store."""
        for name, layout in self.layouts.items():
            place = places[name]
            if place == GPU:
                # read straight to the device (see `load_devices`): stays as loaded, a packed copy would only
                # cost a second copy of the unit on the device while it is made
                if not all(self._on_device(src) for src in layout.sources):
                    flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
                    layout.pack_into(flat)
                    layout.point(flat)
            elif place == CPU:
                flat = aligned_empty(layout.nbytes, pin=self.pin)
                layout.pack_into(flat)
                self.host[name] = flat
                layout.detach(self.device)
            elif place == NVME:
                layout.detach(self.device)  # its bytes are already in the store (see build_store)
            layout.release_sources()

    def _on_device(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device.type and self.device.index in (None, t.device.index)

    def _slot_bytes(self) -> int:
        return max((self.layouts[n].nbytes for n in self.streamed), default=0)

    def _alloc_slots(self) -> list[torch.Tensor]:
        if not self.streamed:
            return []
        if not self.cuda:
            return []  # CPU compute reads straight from the staging buffers
        return [torch.empty(self._slot_bytes(), dtype=torch.uint8, device=self.device) for _ in range(2)]

    # --- the schedule -------------------------------------------------------------------------------
    def _prefetch(self, j: int) -> None:
        """Start bringing streamed unit j into slot j % 2 (no-op if it is already on its way)."""
        with self._lock:
            if j in self.ready:
                return
            name, s = self.streamed[j], j % 2
            if self.reader is not None:
                self.ready[j] = self.reader.submit(self._fetch, name, s)
            else:
                f = Future()
                f.set_result(self._copy(self.host[name], name, s))
                self.ready[j] = f

    def _fetch(self, name: str, s: int):
        done = self.staging_done[s]
        if done is not None:  # the previous copy out of this staging buffer must have finished
            done.synchronize()
        buf = self.staging[s]
        nbytes = self.layouts[name].nbytes
        self.store.read_unit(name, out={"flat": buf[:nbytes]})
        if not self.cuda:
            return buf
        return self._copy(buf[:nbytes], name, s)

    def _copy(self, host: torch.Tensor, name: str, s: int):
        if not self.cuda:
            return host
        stream = self.copy_stream or torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            if self.slot_free[s] is not None:
                stream.wait_event(self.slot_free[s])
            self.slots[s][:host.numel()].copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        if self.reader is not None:
            self.staging_done[s] = event
        return event

    def _pre_hook(self, name: str):
        j = self.index[name]

        def hook(module, args):
            if self.sync:
                self._prefetch(j)
            ready = self.ready.pop(j).result()
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(ready)
                self.layouts[name].point(self.slots[j % 2])
            else:
                self.layouts[name].point(ready)
            if not self.sync and not self._shares_slot(j):
                self._prefetch((j + 1) % len(self.streamed))  # the next unit (wrapping to the next step's first)
        return hook

    def _shares_slot(self, j: int) -> bool:
        """Whether the unit after j goes into j's own slot: the wrap from the last unit to the first when the
        count is odd (or 1). Its copy then starts after unit j has run, not while it runs."""
        return (j + 1) % len(self.streamed) % 2 == j % 2

    def _post_hook(self, name: str):
        j = self.index[name]

        def hook(module, args, output):
            if self.cuda:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self.slot_free[j % 2] = event
            self.layouts[name].detach(self.device)
            if not self.sync and self._shares_slot(j):
                self._prefetch((j + 1) % len(self.streamed))
        return hook

    def start(self) -> None:
        """Begin fetching the first streamed unit (called before each forward pass)."""
        if self.streamed and not self.sync:
            self._prefetch(0)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        if self.reader is not None:
            self.reader.shutdown(wait=True)


def nvme_units(model: nn.Module, plan: Plan):
    """(unit name, {"flat": packed bytes}) for each NVMe-placed unit, packed one at a time for the store."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        name = f"layers.{i}"
        if next(u for u in plan.units if u.name == name).place != NVME:
            continue
        layout = UnitLayout([layer])
        flat = torch.empty(layout.nbytes, dtype=torch.uint8)
        layout.pack_into(flat)
        yield name, {"flat": flat}
