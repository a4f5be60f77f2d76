"""Host (CPU) weight store: a chunked, optionally pinned arena.

Weights read from an mmap'd checkpoint are copied once, straight into the arena, and
handed back as typed views, so the model never has a second full copy in host memory.
Pinning happens chunk by chunk: one huge `cudaHostAlloc` for a 100+ GiB model can stall
for minutes or fail outright, while 256 MiB pieces pin quickly and fail early.
"""

from __future__ import annotations

import torch

from zinfer.errors import ZinferError
from zinfer.kv.host import PAGE, REGISTER_MIN, pinned_empty

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 256 * MiB


class HostMemoryBudgetError(ZinferError, ValueError):
    """Raised when a put would exceed the store's `cpu_memory` budget."""


def resolve_pin(pin: bool) -> bool:
    """Pinning needs a CUDA driver; on CPU-only machines pinned memory means nothing."""
    return bool(pin) and torch.cuda.is_available()


def align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def aligned_empty(nbytes: int, align: int = 4096, pin: bool = False) -> torch.Tensor:
    """A uint8 tensor of `nbytes` whose first byte sits on an `align`-byte boundary.

    Large pinned blocks are page-locked where they lie at their exact size (`pinned_empty`): CUDA's caching
    host allocator would round a 0.53 GiB streamed layer up to 1 GiB. Small pinned blocks come page-aligned
    from cudaHostAlloc, so the exact size is tried first. The CPU allocator only promises 64 bytes, hence
    the over-allocate-and-slice fallback.
    """
    pin = resolve_pin(pin)
    if pin and nbytes >= REGISTER_MIN and PAGE % align == 0:
        return pinned_empty(nbytes)
    raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    if raw.data_ptr() % align == 0:
        return raw
    raw = torch.empty(nbytes + align, dtype=torch.uint8, pin_memory=pin)
    start = -raw.data_ptr() % align
    return raw[start : start + nbytes]


def typed_view(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """View bytes `buf[offset:]` of a uint8 buffer as a tensor of `dtype` and `shape`."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return buf[offset : offset + nbytes].view(dtype).reshape(shape)


class _Chunk:
    def __init__(self, nbytes: int, align: int, pin: bool):
        self.buf = aligned_empty(nbytes, align, pin)
        self.used = 0

    def free(self) -> int:
        return self.buf.numel() - self.used


class HostStore:
    """Named tensors living in a few large (optionally pinned) uint8 chunks.

    Each tensor starts on an `align`-byte boundary (512 by default: enough for vectorized
    copies and for O_DIRECT-sized transfers). A tensor larger than `chunk_bytes` gets a
    chunk of its own; smaller ones are placed first-fit into the chunks' free tails.
    `cpu_memory` caps the bytes of all chunks together (None: no cap).
    """

    def __init__(
        self,
        cpu_memory: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        pin: bool = True,
        align: int = 512,
    ):
        if chunk_bytes <= 0 or chunk_bytes % align:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be a positive multiple of align={align}")
        self.cpu_memory = cpu_memory
        self.chunk_bytes = chunk_bytes
        self.pinned = resolve_pin(pin)
        self.align = align
        self._chunks: list[_Chunk] = []
        self._tensors: dict[str, torch.Tensor] = {}

    # -- queries -------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the tensors stored (without alignment padding or free chunk tails)."""
        return sum(t.nbytes for t in self._tensors.values())

    @property
    def reserved_bytes(self) -> int:
        """Bytes held by all chunks: what counts against `cpu_memory`."""
        return sum(c.buf.numel() for c in self._chunks)

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise KeyError(f"{name!r} is not in the host store ({len(self._tensors)} tensors)")
        return self._tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    # -- placement -----------------------------------------------------------------
    def alloc(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Reserve an uninitialized tensor in the arena (e.g. to quantize straight into it)."""
        if name in self._tensors:
            raise ValueError(f"{name!r} is already in the host store")
        shape = tuple(shape)
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        chunk = self._chunk_for(name, nbytes)
        view = typed_view(chunk.buf, chunk.used, dtype, shape)
        chunk.used += align_up(nbytes, self.align)
        self._tensors[name] = view
        return view

    def put(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Copy `tensor` (any device, any strides) into the arena; return the arena view."""
        view = self.alloc(name, tensor.shape, tensor.dtype)
        view.copy_(tensor)
        return view

    def _chunk_for(self, name: str, nbytes: int) -> _Chunk:
        need = align_up(max(nbytes, 1), self.align)
        for chunk in self._chunks:
            if chunk.free() >= need:
                return chunk
        # Big tensors get an exact-size chunk; otherwise a standard chunk, trimmed to what
        # the budget still allows so the last few tensors can still fit.
        size = need if need > self.chunk_bytes else self.chunk_bytes
        left = None if self.cpu_memory is None else self.cpu_memory - self.reserved_bytes
        if left is not None:
            if need > left:
                self._raise_budget(name, nbytes, left)
            size = min(size, left // self.align * self.align)
        chunk = _Chunk(size, self.align, self.pinned)
        self._chunks.append(chunk)
        return chunk

    def _raise_budget(self, name: str, nbytes: int, left: int) -> None:
        tail = max((c.free() for c in self._chunks), default=0)
        raise HostMemoryBudgetError(
            f"host store cannot hold {name!r}: it needs {nbytes} bytes but only {max(left, tail)} of "
            f"cpu_memory={self.cpu_memory} bytes are available ({self.reserved_bytes} reserved for "
            f"{len(self._tensors)} tensors); raise cpu_memory or offload more weights to NVMe"
        )
