"""A KV cache in host memory (ZeRO-Inference / FlexGen style), with two ways to run decode attention, and both.

Host layout is token-major, keys[layer]: [T_max, B, H_kv, D], so one decode slot and any prefix
[0, n) are contiguous: each write and each prefetch is a single DMA copy.

Prefill attends on the device with the prompt's own k, v (as the device cache does) and copies them
to the host. Decode attention over the host cache runs either
- "gpu" (`PrefetchKVCache`): layer i's rows [0, n) are copied into one of two device buffers on a
  side stream while layer i-1 computes; the new token's k, v are written into the buffer and copied
  back to the host row. PCIe carries 2·B·n·H_kv·D elements per layer and step.
- "cpu" (`HostAttentionKVCache`): q, k, v of the new token go to the host, attention runs there
  against the host cache, the output [B, H, 1, D] comes back. PCIe carries ~B·(H + 2·H_kv)·D.
- "split" (`SplitKVCache`): the first rows of the batch the "gpu" way, the others the "cpu" way, at once.

Every copy is ordered by CUDA events (nothing is ordered by luck):

    store(i, rows):  copy stream waits "made" (compute) -> D2H rows -> record written[i]
    prefetch(i, n):  copy stream waits free[b] -> H2D host[i][:n] into buffer b -> record ready
    attend(i, s):    compute waits ready(i) -> prefetch(i+1, s) into the other buffer (or, after the last
                     layer, the next step's layer 0 with n = s+1) -> write row s of b -> store(i, s)
                     -> attention over rows [0, s] -> record free[b]
    host reader:     written[i].synchronize() before the CPU reads layer i (attention on the CPU)

D2H stores and H2D prefetches share the copy stream, so a prefetch of layer i always sees every
store into layer i queued before it. Without `async_writes` stores run on the compute stream and
block. On a CPU "device" the same functions run with plain copies and no events.
"""

from dataclasses import dataclass, replace

import torch

from zinfer.kv.host import HostArrays


def _cut(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The first n keys of a mask [B, 1, 1, T] or bias [B, H, 1, T]."""
    return None if x is None else x[..., :n]


def _keys_view(rows: torch.Tensor) -> torch.Tensor:
    # [n, B, H_kv, D] token-major -> [B, H_kv, n, D], the layout attention takes (a view, no copy)
    return rows.permute(1, 2, 0, 3)


class OffloadedKVCache:
    """Host storage, prefill writes and the step slot; subclasses decide where decode attention runs."""

    offloaded = True  # copies and host ints in the step: never captured in a CUDA graph
    method = ""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, pin: bool = False, async_writes: bool = False):
        self.device, self.dtype = torch.device(device), dtype
        self.cuda = self.device.type == "cuda"
        self.num_layers, self.batch_size, self.max_len = num_layers, batch_size, max_len
        self.shape = (max_len, batch_size, num_kv_heads, head_dim)
        self.keys = HostArrays(num_layers, self.shape, dtype, pin)
        self.values = HostArrays(num_layers, self.shape, dtype, pin)
        self.pin = self.keys.pinned
        self.async_writes = async_writes and self.cuda
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.written: list[torch.cuda.Event | None] = [None] * num_layers  # last async store into a layer
        self.slot: int | None = None  # the slot this decode step writes (host int: set by begin_step)

    @property
    def host_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    device_bytes = 0

    @property
    def nbytes(self) -> int:
        return self.host_bytes

    def begin_step(self, slot: int) -> None:
        self.slot = slot

    # --- prefill ----------------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kv_len: int):
        """Prefill: k, v [B, H_kv, S, D] fill slots [0, S); attention uses them where they are."""
        s = k.shape[2]
        if s != kv_len:
            raise ValueError(f"an offloaded KV cache takes a whole prompt at once (decode goes through attend): "
                             f"{s} new keys but kv_len={kv_len}")
        self.slot = None
        self.forget()
        self.store(layer, slice(0, s), k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3))
        return k.to(self.dtype), v.to(self.dtype)

    def forget(self) -> None:
        """A new prompt replaces the cache: drop anything fetched from the old one."""

    def attend(self, layer: int, q, k, v, inp, bias, fn):
        if inp.kv_len == k.shape[2]:  # a one-token prompt: a prefill, it reads only its own k, v
            keys, values = self.write(layer, k, v, inp.slots, inp.kv_len)
            return fn(q, keys, values, inp.mask, bias)
        return self.attend_decode(layer, q, k, v, inp, bias, fn)

    def attend_decode(self, layer: int, q, k, v, inp, bias, fn):
        raise NotImplementedError

    # --- device <-> host copies -------------------------------------------------------------------
    def record(self, stream=None) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(stream or torch.cuda.current_stream(self.device))
        return event

    def store(self, layer: int, rows, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy device k, v (token-major, shaped like host rows `rows`) into the host cache of `layer`."""
        # contiguous on the device, where it is cheap: the D2H is then one block
        k, v = k.to(self.dtype).contiguous(), v.to(self.dtype).contiguous()
        if not self.async_writes:
            self.keys[layer][rows].copy_(k)
            self.values[layer][rows].copy_(v)
            return
        made = self.record()
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(made)
            self.keys[layer][rows].copy_(k, non_blocking=True)
            self.values[layer][rows].copy_(v, non_blocking=True)
            self.written[layer] = self.record(self.copy_stream)
        for t in (k, v):  # allocated on the compute stream: keep the memory until the copy has read it
            t.record_stream(self.copy_stream)

    def wait_written(self, layer: int) -> None:
        """Before the CPU reads `layer`: its async stores must have landed."""
        if self.written[layer] is not None:
            self.written[layer].synchronize()
            self.written[layer] = None

    def decode_slot(self, k: torch.Tensor) -> int:
        if k.shape[2] != 1:
            raise ValueError(f"attend() takes one new token per row, got {k.shape[2]}")
        if self.slot is None:
            raise RuntimeError("decode over an offloaded KV cache needs begin_step(slot) first: the host must "
                               "know the slot without reading it back from the device")
        return self.slot


@dataclass
class _Fetched:
    n: int  # host rows [0, n) are (being) copied
    buf: int  # into device buffer 0 or 1
    ready: torch.cuda.Event | None  # recorded on the copy stream after the copy


class PrefetchKVCache(OffloadedKVCache):
    """Decode attention on the device: layer i's cache is prefetched into a double buffer while i-1 runs."""

    method = "gpu"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # bufs[b] = (keys, values), each [T_max, B, H_kv, D]; zeros: never-written rows must be finite
        self.bufs = [tuple(torch.zeros(self.shape, dtype=self.dtype, device=self.device) for _ in range(2))
                     for _ in range(2)]
        self.free: list[torch.cuda.Event | None] = [None, None]  # compute finished reading buffer b
        self.fetched: dict[int, _Fetched] = {}  # layer -> its copy in flight
        self.last_buf = 1  # the buffer the latest attention read; the next prefetch fills the other

    @property
    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.bufs for t in pair)

    def forget(self) -> None:
        self.fetched.clear()  # copies still in flight stay ordered on the copy stream

    def attend_decode(self, layer: int, q, k, v, inp, bias, fn):
        s = self.decode_slot(k)
        b = self.take(layer, s)
        nxt, n = (layer + 1, s) if layer + 1 < self.num_layers else (0, s + 1)  # wrap: next step's first layer
        self.fetched[nxt] = self.prefetch(nxt, n)
        keys, values = self.bufs[b]
        keys[s].copy_(k[:, :, 0])  # [B, H_kv, D]: the new token joins the fetched rows [0, s)
        values[s].copy_(v[:, :, 0])
        self.store(layer, s, keys[s], values[s])
        out = fn(q, _keys_view(keys[:s + 1]), _keys_view(values[:s + 1]), _cut(inp.mask, s + 1),
                 _cut(bias, s + 1))
        self.free[b] = self.record()
        return out

    def take(self, layer: int, n: int) -> int:
        """The buffer holding host rows [0, n) of `layer`, waited for on the compute stream."""
        got = self.fetched.pop(layer, None)
        if got is None or got.n != n:  # first step after a prefill (or a stale guess): fetch it now
            got = self.prefetch(layer, n)
        if got.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(got.ready)
        self.last_buf = got.buf
        return got.buf

    def prefetch(self, layer: int, n: int) -> _Fetched:
        """Start copying host rows [0, n) of `layer` into the buffer the latest attention did not read."""
        b = 1 - self.last_buf
        keys, values = self.bufs[b]
        if not self.cuda:
            keys[:n].copy_(self.keys[layer][:n])
            values[:n].copy_(self.values[layer][:n])
            return _Fetched(n, b, None)
        with torch.cuda.stream(self.copy_stream):
            if self.free[b] is not None:
                self.copy_stream.wait_event(self.free[b])
            keys[:n].copy_(self.keys[layer][:n], non_blocking=True)
            values[:n].copy_(self.values[layer][:n], non_blocking=True)
            return _Fetched(n, b, self.record(self.copy_stream))


HOST_CHUNK_BYTES = 64 << 20  # fp32 keys + values of the sequences one host attention call takes: a reused buffer


def upcast_rows(batch: int, kv_heads: int, max_len: int, head_dim: int) -> int:
    """Sequences one host attention call upcasts together: HOST_CHUNK_BYTES of fp32 keys and values, at least 1."""
    return max(1, min(batch, HOST_CHUNK_BYTES // (2 * kv_heads * max_len * head_dim * 4)))


def host_attention_bytes(batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                         compiled: bool = False) -> int:
    """Host memory attention on the CPU takes beside the cache: the reused fp32 buffers a half-precision cache
    is upcast into when attention runs eagerly (compiled, or over an fp32 cache, it is read in place)."""
    if dtype == torch.float32 or compiled:
        return 0
    return 2 * upcast_rows(batch, kv_heads, max_len, head_dim) * kv_heads * max_len * head_dim * 4


def _rows(x: torch.Tensor | None, b0: int, b1: int, batch: int) -> torch.Tensor | None:
    """Sequences [b0, b1) of a mask [B, 1, 1, n] or bias [B, H, 1, n]; one broadcast over the batch stays whole."""
    return x if x is None or x.shape[0] != batch else x[b0:b1]


class HostAttentionKVCache(OffloadedKVCache):
    """Decode attention on the CPU: only the new token's q, k, v and the output cross PCIe. `compiled`: the
    attention math runs compiled as multiply-and-sum over the cache as it lies (see `decode_attention`);
    otherwise eagerly, through fp32 copies of a half-precision cache."""

    method = "cpu"

    def __init__(self, *args, compiled: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.compiled = compiled
        self.staging: dict[str, torch.Tensor] = {}  # small pinned buffers for q/k/v in and the output back
        self.step_inputs: tuple | None = None  # (mask, bias, n, host mask, host bias): shared by all layers

    @property
    def host_bytes(self) -> int:
        """The cache's arrays plus the fp32 upcast buffers once made (`host_attention_bytes` before)."""
        return super().host_bytes + sum(self.staging[n].nbytes for n in ("k32", "v32") if n in self.staging)

    def attend_decode(self, layer: int, q, k, v, inp, bias, fn):
        return self.attend_staged(layer, self.stage_inputs(q, k, v, inp, bias), fn)

    def stage_inputs(self, q, k, v, inp, bias) -> tuple:
        """The new token's q, k, v and the step's mask and bias on the host: waits for the device to have made
        q, k, v (and nothing queued after them)."""
        s = self.decode_slot(k)
        q, k, v = self.to_host(q, k, v)  # [B, H, 1, D], [B, H_kv, D], [B, H_kv, D]
        return (s, q, k, v, *self.host_inputs(inp.mask, bias, s + 1))

    def attend_staged(self, layer: int, staged: tuple, fn):
        """Attention over the host cache of `layer` for what `stage_inputs` brought; the output goes back to the
        device."""
        s, q, k, v, mask, bias = staged
        self.wait_written(layer)
        keys, values = self.keys[layer], self.values[layer]
        keys[s].copy_(k)
        values[s].copy_(v)
        k_all, v_all = _keys_view(keys[:s + 1]), _keys_view(values[:s + 1])  # [B, H_kv, n, D] views
        if self.compiled:
            return self.to_device(fn(q, k_all, v_all, mask, bias, compiled_reduction=True).to(self.dtype))
        if k_all.dtype == torch.float32:
            return self.to_device(fn(q, k_all, v_all, mask, bias))
        # Half-precision matmuls are slow on most CPUs, so attention runs in fp32, a few sequences at a time through
        # reused buffers: upcasting the layer's whole cache made (and page-faulted) fresh fp32 copies of it every
        # step, 7x slower than streaming the weights (OPT-66B, batch 16, BENCHMARKS.md).
        b, n = k_all.shape[0], k_all.shape[2]
        k32, v32 = self.upcast_buffers()
        per = k32.shape[0]
        out = torch.empty(q.shape, dtype=torch.float32)
        for b0 in range(0, b, per):
            b1 = min(b, b0 + per)
            kc, vc = k32[:b1 - b0, :, :n], v32[:b1 - b0, :, :n]
            kc.copy_(k_all[b0:b1])
            vc.copy_(v_all[b0:b1])
            out[b0:b1] = fn(q[b0:b1].float(), kc, vc, _rows(mask, b0, b1, b), _rows(bias, b0, b1, b))
        return self.to_device(out.to(self.dtype))

    def upcast_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 keys and values [S, H_kv, T_max, D] for S sequences, S sized to HOST_CHUNK_BYTES (at least 1)."""
        if "k32" not in self.staging:
            t_max, b, h, d = self.shape
            per = upcast_rows(b, h, t_max, d)
            for name in ("k32", "v32"):
                self.staging[name] = torch.empty(per, h, t_max, d, dtype=torch.float32)
        return self.staging["k32"], self.staging["v32"]

    def stage(self, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self.staging.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = self.staging[name] = torch.empty(like.shape, dtype=like.dtype, pin_memory=self.pin)
        return buf

    def to_host(self, q, k, v):
        """q [B, H, 1, D], k, v [B, H_kv, 1, D] on the host, in one D2H copy."""
        b, _, _, d = k.shape
        if not self.cuda:
            return q, k[:, :, 0], v[:, :, 0]
        packed = torch.cat([q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1)], 1)  # [B, (H + 2 H_kv) D]
        host = self.stage("in", packed)
        host.copy_(packed, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        hq, hk = q[0].numel(), k[0].numel()
        return (host[:, :hq].view(q.shape), host[:, hq:hq + hk].view(b, -1, d),
                host[:, hq + hk:].view(b, -1, d))

    def to_device(self, out: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return out
        # the next layer's to_host synchronizes the compute stream, so this H2D has finished before the
        # staging buffer is written again
        host = self.stage("out", out)
        host.copy_(out)
        return host.to(self.device, non_blocking=True)

    def host_inputs(self, mask, bias, n: int):
        """The step's key mask and ALiBi bias, first n keys, copied to the host once per step."""
        cached = self.step_inputs
        if cached is None or cached[0] is not mask or cached[1] is not bias or cached[2] != n:
            host_mask = None if mask is None else _cut(mask, n).to("cpu")
            host_bias = None if bias is None else _cut(bias, n).float().to("cpu")
            self.step_inputs = cached = (mask, bias, n, host_mask, host_bias)
        return cached[3], cached[4]


class SplitKVCache:
    """Decode attention for sequences [0, gpu_rows) on the device after a prefetch (`PrefetchKVCache`) and for the
    rest on the CPU (`HostAttentionKVCache`), both at once. Each method leaves idle what the other is bound by:
    the prefetch loads PCIe (beside the streamed weights), attention on the CPU loads host memory and cores. Per
    layer: the CPU's share of q, k, v goes to the host first (the sync waits only for this layer's projections),
    then the device's share is queued (wait for its prefetch, attend), then the CPU attends its share while the
    device works through the queue; the two outputs are joined on the device. The shares overlap only over a
    pinned cache: a prefetch from pageable memory is staged by CUDA before the call returns, holding the host
    thread (the planner's auto does not split then)."""

    offloaded = True
    method = "split"

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, gpu_rows: int, pin: bool = False,
                 async_writes: bool = False, compiled: bool = False):
        if not 0 < gpu_rows < batch_size:
            raise ValueError(f"a split KV cache needs 0 < gpu_rows < batch size ({batch_size}); got {gpu_rows}")
        common = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, max_len=max_len,
                      dtype=dtype, device=device, pin=pin, async_writes=async_writes)
        self.on_device = PrefetchKVCache(batch_size=gpu_rows, **common)
        self.on_host = HostAttentionKVCache(batch_size=batch_size - gpu_rows, compiled=compiled, **common)
        self.parts = ((self.on_device, slice(0, gpu_rows)), (self.on_host, slice(gpu_rows, batch_size)))
        self.batch_size, self.max_len, self.gpu_rows, self.dtype = batch_size, max_len, gpu_rows, dtype
        self.step_rows: tuple | None = None  # (mask, bias) -> each share's rows of them, once per step

    @property
    def host_bytes(self) -> int:
        return self.on_device.host_bytes + self.on_host.host_bytes

    @property
    def device_bytes(self) -> int:
        return self.on_device.device_bytes

    @property
    def nbytes(self) -> int:
        return self.host_bytes

    def begin_step(self, slot: int) -> None:
        for part, _ in self.parts:
            part.begin_step(slot)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kv_len: int):
        """Prefill: each share stores its rows; attention uses the whole k, v where they are."""
        for part, rows in self.parts:
            part.write(layer, k[rows], v[rows], slots, kv_len)
        return k.to(self.dtype), v.to(self.dtype)

    attend = OffloadedKVCache.attend  # a one-token prompt is a prefill (write); anything else attend_decode

    def attend_decode(self, layer: int, q, k, v, inp, bias, fn):
        (dev_mask, host_mask), (dev_bias, host_bias) = self.rows_of(inp.mask, bias)
        host, rows = self.on_host, self.parts[1][1]
        staged = host.stage_inputs(q[rows], k[rows], v[rows], replace(inp, mask=host_mask), host_bias)
        rows = self.parts[0][1]
        out = self.on_device.attend_decode(layer, q[rows], k[rows], v[rows], replace(inp, mask=dev_mask), dev_bias,
                                           fn)
        return torch.cat([out, host.attend_staged(layer, staged, fn)])

    def rows_of(self, mask, bias) -> tuple:
        """((device rows, host rows) of the mask, (...) of the bias), cut once per step: the host share's cached
        host copy of them is keyed by the tensors' identity."""
        cached = self.step_rows
        if cached is None or cached[0] is not mask or cached[1] is not bias:
            b = self.batch_size
            cut = tuple(tuple(_rows(x, r.start, r.stop, b) for _, r in self.parts) for x in (mask, bias))
            self.step_rows = cached = (mask, bias, cut)
        return cached[2]


CACHES = {"gpu": PrefetchKVCache, "cpu": HostAttentionKVCache, "split": SplitKVCache}


def offloaded_cache(method: str, *args, host_compiled: bool = False, gpu_rows: int = 0, **kwargs):
    """A host-memory KV cache whose decode attention runs on the compute device ("gpu"), the CPU ("cpu"; compiled
    when `host_compiled`) or both ("split": the first `gpu_rows` sequences on the device)."""
    if method not in CACHES:
        raise ValueError(f"decode attention over an offloaded cache runs on 'gpu', 'cpu' or 'split'; got {method!r}")
    if method != "gpu":
        kwargs["compiled"] = host_compiled
    if method == "split":
        kwargs["gpu_rows"] = gpu_rows
    return CACHES[method](*args, **kwargs)
