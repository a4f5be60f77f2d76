"""The decode step: static buffers for one (batch, length) bucket, replayed as a CUDA graph.

Every tensor the step reads or writes lives here, allocated once, so the graph captured on the
first step can be replayed for every later one (and for later requests of the same bucket).
Without a graph (CPU, or `compile=False`) the very same function runs eagerly: same tokens.
"""

import socket
import time

import torch

from zinfer.errors import InputError
from zinfer.kv import DEVICE_BUCKET, cache_len
from zinfer.kv.cache import KVCache
from zinfer.layers.gemv import inductor_options
from zinfer.models.base import CausalLM
from zinfer.offload import plan
from zinfer.parallel import SINGLE, TensorParallel
from zinfer.runtime.batch import PaddedBatch

LENGTH_BUCKET = DEVICE_BUCKET  # cache lengths round up to this, so nearby requests reuse one graph


def bucket_len(n: int) -> int:
    return cache_len(n)


class DecodeState:
    """`cache`: a prebuilt cache (an offloaded one); None allocates a `KVCache` on `device`. An offloaded cache
    copies and reads host ints inside the step, so that step always runs eagerly: no graph, no compile."""

    def __init__(self, model: CausalLM, batch_size: int, max_len: int, dtype, device, use_graph: bool,
                 fuse: bool = False, cache=None):
        if cache is not None and cache.offloaded:
            use_graph = fuse = False
        self.model, self.use_graph = model, use_graph
        # torch.compile fuses the small element-wise kernels (norms, rotary, masks) between the matmuls;
        # the compiled step is then captured in our own graph, like the eager one
        # emulate_precision_casts: round where eager rounds (bf16 intermediates), so compiled == eager tokens;
        # its kernels take part in dependent launch where ours do (layers/triton_gemv.py)
        options = {"emulate_precision_casts": True, **inductor_options()}
        self.forward = torch.compile(self._forward, dynamic=False, options=options) if fuse else self._forward
        self.key = (batch_size, max_len)
        self.cache = cache if cache is not None else KVCache(model.num_layers, batch_size, model.num_kv_heads,
                                                             model.head_dim, max_len, dtype, device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.capture_seconds = 0.0

    def load(self, batch: PaddedBatch) -> PaddedBatch:
        """Adopt a request's masks and positions; returns the batch viewing the static buffers."""
        self.key_valid.copy_(batch.key_valid)
        self.positions.copy_(batch.positions)
        return PaddedBatch(batch.tokens, self.key_valid, self.positions, batch.prompt_len, batch.padded)

    def _forward(self) -> torch.Tensor:
        batch = PaddedBatch(self.tokens, self.key_valid, self.positions, 0, True)
        inputs = batch.decode_inputs(self.slot, self.model.sliding_window)
        return self.model(self.tokens, self.cache, inputs)[:, -1]

    def step(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits [B, V] for `tokens` [B] written at cache slot `slot`."""
        self.tokens.copy_(tokens[:, None])
        self.slot.fill_(slot)
        self.cache.begin_step(slot)
        if not self.use_graph:
            return self.forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        start = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy inits and cuBLAS workspaces happen outside the graph
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.forward()
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start


def check_fits(model: CausalLM, batch_size: int, max_len: int, dtype, device, releasable: int = 0,
               layers: int | None = None) -> None:
    """Refuse a KV cache that cannot fit in free GPU memory, with the numbers, before allocating it.
    `layers`: how many layers' keys/values the GPU holds (None: all; 2 for an offloaded cache's double buffer)."""
    if torch.device(device).type != "cuda":
        return
    per_token = 2 * (layers or model.num_layers) * model.num_kv_heads * model.head_dim * torch.finfo(dtype).bits // 8
    need = per_token * batch_size * max_len
    free = torch.cuda.mem_get_info(device)[0] + releasable
    what = "the KV prefetch buffers" if layers else "the KV cache"
    if need > 0.95 * free:
        raise InputError(f"{what} for batch {batch_size} x {max_len} tokens needs {need / 2**30:.2f} GiB "
                         f"but {free / 2**30:.2f} GiB of GPU memory is free; lower the batch size or "
                         "max_new_tokens")


def refuse_together(tp: TensorParallel, problem: str | None) -> None:
    """Raise `problem` (this rank's refusal, or None) on every rank of the group if any rank has one, the
    refusing rank named, so no rank goes on into a collective that a refusing rank never reaches."""
    problems = [problem] if tp.size == 1 else tp.all_gather_object(problem)
    for rank, p in enumerate(problems):
        if p is not None:
            raise InputError(p if tp.size == 1 or rank == tp.rank else f"tensor-parallel rank {rank}: {p}")


def check_host_fits(nbytes: int, releasable: int = 0, tp: TensorParallel = SINGLE) -> None:
    """Refuse an offloaded KV cache larger than the host memory available, with the numbers.

    Tensor-parallel ranks on one machine share its memory, each caching its own heads: every rank reports
    (machine, its cache, free memory, its releasable cache) before any of them allocates (the gather waits for
    all), the caches of a machine's ranks are summed, and every rank refuses together if any machine lacks
    room (no rank is left waiting in a collective)."""
    free = plan.free_host_bytes()
    if tp.size == 1:
        reports = [("", nbytes, free, releasable)]
    else:
        reports = tp.all_gather_object((socket.gethostname(), nbytes, free, releasable))
    for host in dict.fromkeys(r[0] for r in reports):
        mine = [r for r in reports if r[0] == host]
        need, available = sum(r[1] for r in mine), min(r[2] for r in mine) + sum(r[3] for r in mine)
        if need > plan.HOST_FILL * available:
            ranks = f" ({len(mine)} tensor-parallel ranks on {host}, each caching its heads)" if tp.size > 1 else ""
            raise InputError(f"the offloaded KV cache needs {need / 2**30:.2f} GiB of host memory{ranks} but "
                             f"{available / 2**30:.2f} GiB is available; lower the batch size or max_new_tokens")
