import pytest
import torch

from zinfer.errors import ZinferError
from zinfer.offload.host import HostMemoryBudgetError, HostStore, aligned_empty

KiB = 1024


def test_put_returns_equal_views_aligned_in_the_arena():
    store = HostStore(chunk_bytes=64 * KiB, align=512)
    src = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randint(-128, 127, (13,), dtype=torch.int8),
        "d": torch.randn(4, 6).t(),  # non-contiguous source
        "e": torch.tensor(2.5),
        "f": torch.empty(0, 3),
    }
    views = {name: store.put(name, t) for name, t in src.items()}
    for name, t in src.items():
        v = store.get(name)
        assert v is views[name] and v.dtype == t.dtype and v.shape == t.shape
        assert torch.equal(v, t)
        if v.numel():
            assert v.data_ptr() % 512 == 0, name
    assert store.names() == list(src) and len(store) == len(src) and "a" in store
    assert store.nbytes == sum(t.nbytes for t in src.values())
    assert store.num_chunks == 1 and store.reserved_bytes == 64 * KiB


def test_views_share_chunk_storage_and_are_copies_of_the_source():
    store = HostStore(chunk_bytes=64 * KiB)
    src = torch.randn(16)
    a = store.put("a", src)
    b = store.put("b", torch.randn(16))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    src.zero_()  # the arena holds its own copy, not a view of the (mmap'd) source
    assert a.abs().sum() > 0


def test_big_tensor_gets_its_own_chunk_and_small_ones_fill_earlier_tails():
    store = HostStore(chunk_bytes=4 * KiB, align=512)
    store.put("small", torch.zeros(100, dtype=torch.uint8))
    big = store.put("big", torch.ones(10 * KiB, dtype=torch.uint8))
    assert store.num_chunks == 2
    assert big.untyped_storage().nbytes() >= 10 * KiB
    later = store.put("later", torch.zeros(100, dtype=torch.uint8))
    assert later.untyped_storage().data_ptr() == store.get("small").untyped_storage().data_ptr()
    assert store.num_chunks == 2


def test_budget_error_names_requested_and_available_bytes():
    store = HostStore(cpu_memory=8 * KiB, chunk_bytes=4 * KiB, align=512)
    store.put("a", torch.zeros(3 * KiB, dtype=torch.uint8))
    store.put("b", torch.zeros(3 * KiB, dtype=torch.uint8))  # second chunk: budget now used up
    with pytest.raises(HostMemoryBudgetError, match=r"'c': it needs 2048 bytes but only 1024 of cpu_memory=8192"):
        store.put("c", torch.zeros(2 * KiB, dtype=torch.uint8))
    assert "c" not in store
    assert isinstance(HostMemoryBudgetError("x"), ValueError | ZinferError)


def test_last_chunk_is_trimmed_to_the_budget():
    store = HostStore(cpu_memory=6 * KiB, chunk_bytes=4 * KiB, align=512)
    store.put("a", torch.zeros(4 * KiB, dtype=torch.uint8))
    store.put("b", torch.zeros(2 * KiB, dtype=torch.uint8))
    assert store.reserved_bytes == 6 * KiB


def test_duplicate_and_missing_names_and_bad_chunk_size():
    store = HostStore(chunk_bytes=4 * KiB)
    store.put("a", torch.zeros(2))
    with pytest.raises(ValueError, match="'a' is already in the host store"):
        store.put("a", torch.zeros(2))
    with pytest.raises(KeyError, match="'zz' is not in the host store"):
        store.get("zz")
    with pytest.raises(ValueError, match="chunk_bytes=1000 must be a positive multiple of align=512"):
        HostStore(chunk_bytes=1000)


def test_pin_is_dropped_without_cuda():
    store = HostStore(pin=True)
    assert store.pinned == torch.cuda.is_available()
    t = store.put("x", torch.ones(4))
    assert t.is_pinned() == store.pinned


@pytest.mark.parametrize("align", [512, 4096])
def test_aligned_empty(align):
    for n in (1, 1000, 100_000):
        buf = aligned_empty(n, align)
        assert buf.numel() == n and buf.data_ptr() % align == 0


@pytest.mark.gpu
def test_gpu_large_pinned_block_takes_its_exact_size():
    """Past REGISTER_MIN a pinned block is page-locked where it lies: CUDA's caching host allocator, which
    would round 1.25 GiB + 1 byte up to 2 GiB, is not asked, and DMA of the whole block both ways works (one
    registration: a copy spanning two fails)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)

    def cached() -> int:
        return sum(v for k, v in stats().items() if k.startswith("reserved_bytes") and k.endswith("current")) \
            if stats else 0

    before = cached()
    n = (1280 << 20) + 1
    buf = aligned_empty(n, pin=True)
    assert buf.numel() == n and buf.data_ptr() % 4096 == 0 and buf.is_pinned()
    assert cached() == before
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    buf.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(buf.cuda(non_blocking=True), src)
    del buf  # unregisters
    torch.cuda.synchronize()
