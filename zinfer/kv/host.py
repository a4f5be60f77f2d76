"""Page-locked host memory at its exact size: an offloaded KV cache, and every large pinned block (`pinned_empty`).

`torch.empty(..., pin_memory=True)` goes through CUDA's caching host allocator, which rounds every
block up to a power of two: a 40 GiB cache would take 64 GiB, and a streamed layer of 0.53 GiB takes 1 GiB.
A large block is therefore allocated pageable and then registered with `cudaHostRegister` (exact size, same
DMA speed), a cache in page-aligned pieces, one per layer (pinning 100 GiB in one call can stall for minutes),
a single block in one piece (a copy may not span two registrations: CUDA answers "invalid argument"), and
unregistered before it is freed. Allocations that large come from their own mmap, so no other
allocation shares their pages. Small ones just use the pinned allocator.
"""

import logging
import math
import weakref

import torch

log = logging.getLogger(__name__)

PAGE = 4096
REGISTER_MIN = 64 << 20  # bytes: above glibc's largest mmap threshold (32 MiB), so the pages are ours alone


def _unregister(ptrs: list[int], memory: torch.Tensor | None = None) -> None:
    """`memory`: the registered allocation, held until it is unregistered."""
    torch.cuda.synchronize()  # copies in flight on any stream may still read or write the memory
    for ptr in ptrs:
        torch.cuda.cudart().cudaHostUnregister(ptr)


def _register(ranges: list[tuple[int, int]]) -> list[int] | None:
    """Page-lock each (ptr, nbytes); on a failure undo the ones done and return None."""
    done = []
    for ptr, nbytes in ranges:
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
        if err:
            log.warning(f"cudaHostRegister of {nbytes / 2**20:.0f} MiB failed (CUDA error {err}); using the "
                        "caching pinned allocator instead (it rounds sizes up to a power of two)")
            _unregister(done)
            return None
        done.append(ptr)
    return done


def _lock(raw: torch.Tensor, stride: int, count: int, owner) -> bool:
    """Page-lock `count` pieces of `stride` bytes from the first page boundary of `raw` where they lie, until
    `owner` is collected; False (nothing locked) when the driver refuses."""
    start = raw.data_ptr()
    aligned = start + (-start % PAGE)
    # the first piece also covers the bytes before the first page, so the storage's own pointer is
    # registered and `is_pinned()` answers True
    ranges = [(start, aligned + stride - start)] + [(aligned + i * stride, stride) for i in range(1, count)]
    ptrs = _register(ranges)
    if ptrs is None:
        return False
    done = weakref.finalize(owner, _unregister, ptrs, raw)
    done.atexit = False  # at exit the process's memory goes back whole: no CUDA calls then
    return True


def pinned_empty(nbytes: int) -> torch.Tensor:
    """`nbytes` of uninitialised page-locked host memory starting on a page, at their exact size past
    REGISTER_MIN. The pages are unlocked when the returned tensor is collected: keep it, not only views of it
    (a view that outlives it stays valid, but pageable)."""
    if nbytes < REGISTER_MIN:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    stride = -(-nbytes // PAGE) * PAGE
    raw = torch.empty(stride + PAGE, dtype=torch.uint8)
    base = -raw.data_ptr() % PAGE
    out = raw[base: base + nbytes]
    if not _lock(raw, stride, 1, out):  # one registration: a copy of the whole block may not span two
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return out


class HostArrays:
    """`count` CPU tensors of `shape`, each starting on a page, in one allocation; page-locked when `pin` (and
    CUDA exists), unpinned when this object dies."""

    def __init__(self, count: int, shape: tuple[int, ...], dtype: torch.dtype, pin: bool):
        self.pinned = pin and torch.cuda.is_available()
        nbytes = math.prod(shape) * dtype.itemsize
        stride = -(-nbytes // PAGE) * PAGE
        total = count * stride + PAGE  # + a page to align the first tensor
        registering = self.pinned and total >= REGISTER_MIN
        raw = torch.empty(total, dtype=torch.uint8, pin_memory=self.pinned and not registering)
        if registering and not _lock(raw, stride, count, self):
            raw = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        base = -raw.data_ptr() % PAGE
        # uninitialised: readers only look at rows that were written
        self.tensors = [raw[base + i * stride: base + i * stride + nbytes].view(dtype).view(shape)
                        for i in range(count)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tensors[i]

    def __len__(self) -> int:
        return len(self.tensors)
