import errno
import fcntl
import json
import os
import threading
from collections import namedtuple

import pytest
import torch

from zinfer.offload import nvme
from zinfer.offload.nvme import ALIGN, MANIFEST, NvmeStore, OffloadDirError, store_dir, store_nbytes

KEY = {
    "model": "tiny/llama",
    "config_hash": "abc123",
    "dtype": "bfloat16",
    "quant": {"bits": 4, "group_size": 64},
}


def make_units(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            "layers.0",
            [
                ("w32", torch.randn(3, 5, generator=g)),
                ("wbf16", torch.randn(7, 3, generator=g).to(torch.bfloat16)),
                ("wf16", torch.randn(11, generator=g).to(torch.float16)),
                ("u8", torch.randint(0, 255, (1, 4097), generator=g, dtype=torch.uint8)),
                ("i8", torch.randint(-128, 127, (2, 3, 5), generator=g, dtype=torch.int8)),
                ("scalar", torch.tensor(1.5)),
                ("empty", torch.empty(0, 4)),
            ],
        ),
        ("layers.1", {"big": torch.randn(300, 101, generator=g), "tail": torch.randn(1, generator=g)}),
        ("empty_unit", []),
    ]


def as_dict(units):
    return {u: dict(ts.items() if isinstance(ts, dict) else ts) for u, ts in units}


@pytest.fixture
def built(tmp_path):
    units = make_units()
    store = NvmeStore.build(tmp_path, KEY, units, piece_bytes=2 * ALIGN)  # small pieces: many per read
    yield store, as_dict(units)
    store.close()


def unit_file(store, unit="layers.1"):
    return store.path / store.unit(unit).file


def test_round_trip_all_dtypes_and_odd_shapes(built):
    store, expected = built
    assert store.units == list(expected) and len(store) == 3
    for unit, tensors in expected.items():
        got = store.read_unit(unit)
        assert list(got) == list(tensors)
        for name, t in tensors.items():
            assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
            assert torch.equal(got[name], t), name


def test_layout_is_aligned_and_sizes_match(built):
    store, expected = built
    assert store.nbytes == store_nbytes(expected.items())
    for unit in store.units:
        u = store.unit(unit)
        assert u.nbytes % ALIGN == 0 and os.path.getsize(store.path / u.file) == u.nbytes
        assert all(t.offset % ALIGN == 0 for t in u.tensors)
        buffers = store.alloc_unit_buffers(unit)
        for t in u.tensors:
            if t.nbytes:
                assert buffers[t.name].data_ptr() % ALIGN == 0
    manifest = json.loads((store.path / MANIFEST).read_text())
    assert manifest["key"] == KEY and manifest["format_version"] == nvme.FORMAT_VERSION


def test_store_nbytes_works_on_meta_tensors():
    units = [
        (
            "u",
            [
                ("a", torch.empty(10, device="meta")),
                ("b", torch.empty(4096, dtype=torch.uint8, device="meta")),
            ],
        )
    ]
    assert store_nbytes(units) == 2 * ALIGN


def test_reopen_reuses_and_reads_into_given_buffers(built, tmp_path):
    store, expected = built
    reopened = NvmeStore.open(tmp_path, KEY)
    assert reopened is not None and reopened.path == store.path
    out = reopened.alloc_unit_buffers("layers.1")
    assert reopened.read_unit_async("layers.1", out).result() is out
    assert torch.equal(out["big"], expected["layers.1"]["big"])
    # Caller-owned buffers of arbitrary alignment take the buffered per-tensor path.
    own = {name: torch.zeros_like(t) for name, t in expected["layers.0"].items()}
    reopened.read_unit("layers.0", own)
    assert all(torch.equal(own[n], t) for n, t in expected["layers.0"].items())
    reopened.close()


def test_bad_destination_buffers_are_refused(built):
    store, _ = built
    out = store.alloc_unit_buffers("layers.1")
    out["big"] = out["big"].to(torch.float64)
    with pytest.raises(ValueError, match=r"buffer for 'big' has .*float64.*expected"):
        store.read_unit("layers.1", out)
    with pytest.raises(ValueError, match="no destination buffer for 'tail'"):
        store.read_unit("layers.1", {"big": torch.empty(300, 101)})
    with pytest.raises(KeyError, match="unit 'nope' is not in the NVMe store"):
        store.read_unit("nope")


def test_concurrent_readers(built):
    store, expected = built
    errors = []

    def reader(unit):
        try:
            for _ in range(5):
                got = store.read_unit(unit)
                assert all(torch.equal(got[n], t) for n, t in expected[unit].items())
        except Exception as e:  # surfaced below: an assert in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(u,)) for u in ["layers.0", "layers.1"] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    futures = [store.read_unit_async(u) for u in ["layers.1"] * 4]
    assert all(torch.equal(f.result()["big"], expected["layers.1"]["big"]) for f in futures)


def test_absent_store_and_other_key_are_independent(built, tmp_path):
    store, _ = built
    other = {**KEY, "dtype": "float16"}
    assert store_dir(tmp_path, other) != store.path
    assert NvmeStore.open(tmp_path, other) is None
    assert store.path.exists()  # a store for another key is left alone


def test_stale_key_in_manifest_is_removed(built, tmp_path, caplog):
    store, _ = built
    manifest = json.loads((store.path / MANIFEST).read_text())
    manifest["key"]["config_hash"] = "old"
    (store.path / MANIFEST).write_text(json.dumps(manifest))
    assert NvmeStore.open(tmp_path, KEY) is None
    assert not store.path.exists()
    assert "stale key" in caplog.text


def test_stale_format_version_is_rebuilt(built, tmp_path, monkeypatch):
    store, expected = built
    monkeypatch.setattr(nvme, "FORMAT_VERSION", nvme.FORMAT_VERSION + 1)
    calls = []

    def factory():
        calls.append(1)
        return make_units()

    rebuilt = NvmeStore.open_or_build(tmp_path, KEY, factory)
    assert calls == [1] and rebuilt.path == store.path
    assert json.loads((store.path / MANIFEST).read_text())["format_version"] == nvme.FORMAT_VERSION
    assert torch.equal(rebuilt.read_unit("layers.1")["big"], expected["layers.1"]["big"])
    again = NvmeStore.open_or_build(tmp_path, KEY, factory)
    assert calls == [1]  # valid now: reused, not rebuilt
    rebuilt.close()
    again.close()


@pytest.mark.parametrize("verify", ["size", "full"])
def test_truncated_file_is_detected(built, tmp_path, verify, caplog):
    store, _ = built
    path = unit_file(store)
    size = os.path.getsize(path)
    os.truncate(path, size - ALIGN)
    assert NvmeStore.open(tmp_path, KEY, verify=verify) is None
    assert not store.path.exists()
    assert f"is {size - ALIGN} bytes, manifest: {size}" in caplog.text


def test_missing_file_and_missing_manifest_are_detected(built, tmp_path, caplog):
    store, _ = built
    unit_file(store).unlink()
    assert NvmeStore.open(tmp_path, KEY) is None
    assert "missing file unit-00001.bin" in caplog.text
    NvmeStore.build(tmp_path, KEY, make_units()).close()
    (store.path / MANIFEST).unlink()
    assert NvmeStore.open(tmp_path, KEY) is None and not store.path.exists()


def test_flipped_byte_is_detected_only_by_full_verify(built, tmp_path, caplog):
    store, _ = built
    with open(unit_file(store), "r+b") as f:
        f.seek(1234)
        byte = f.read(1)
        f.seek(1234)
        f.write(bytes([byte[0] ^ 0x01]))
    cheap = NvmeStore.open(tmp_path, KEY, verify="size")
    assert cheap is not None  # sizes are fine: only the checksum can tell
    cheap.close()
    assert NvmeStore.open(tmp_path, KEY, verify="full") is None
    assert not store.path.exists()
    assert "has crc32" in caplog.text
    with pytest.raises(ValueError, match="verify='quick' must be 'size' or 'full'"):
        NvmeStore.open(tmp_path, KEY, verify="quick")


def test_unwritable_dir_under_a_regular_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    bad = tmp_path / "afile" / "sub"
    with pytest.raises(OffloadDirError, match=f"offload_dir {bad} cannot be created"):
        NvmeStore.build(bad, KEY, make_units())


def test_unwritable_dir_read_only(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores modes: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    try:
        with pytest.raises(OffloadDirError, match=f"offload_dir {ro} is not a writable directory"):
            NvmeStore.build(ro, KEY, make_units())
    finally:
        ro.chmod(0o700)
    assert list(ro.iterdir()) == []


def test_write_probe_catches_what_os_access_misses(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(nvme.tempfile, "mkstemp", refuse)
    with pytest.raises(OffloadDirError, match=f"offload_dir {tmp_path} is not writable: Read-only file system"):
        NvmeStore.build(tmp_path, KEY, make_units())


def test_too_little_free_space_fails_before_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(nvme.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    needed = store_nbytes(make_units())
    with pytest.raises(OffloadDirError, match=f"has 4096 bytes free but the NVMe store needs {needed} bytes"):
        NvmeStore.build(tmp_path, KEY, make_units())
    assert list(tmp_path.iterdir()) == []
    # A generator cannot be sized upfront: the caller's total_bytes is used instead.
    with pytest.raises(OffloadDirError, match="needs 123456789 bytes"):
        NvmeStore.build(tmp_path, KEY, iter(make_units()), total_bytes=123456789)


def test_disk_full_mid_write_leaves_nothing_valid(tmp_path, monkeypatch):
    real_write = nvme._write_bytes
    writes = []

    def fill_up(f, data):
        writes.append(len(data))
        if len(writes) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data)

    monkeypatch.setattr(nvme, "_write_bytes", fill_up)
    with pytest.raises(
        OffloadDirError,
        match=f"disk full while writing the NVMe store in {tmp_path}.*removed",
    ):
        NvmeStore.build(tmp_path, KEY, (u for u in make_units()))
    assert list(tmp_path.iterdir()) == []  # temp dir removed, no final dir
    assert NvmeStore.open(tmp_path, KEY) is None


def test_other_write_errors_propagate_and_clean_up(tmp_path):
    with pytest.raises(ValueError, match="piece_bytes=1000 must be a positive multiple of 4096"):
        NvmeStore.build(tmp_path, KEY, make_units(), piece_bytes=1000)
    units = [("u", [("a", torch.ones(2)), ("a", torch.ones(2))])]
    with pytest.raises(ValueError, match="tensor 'a' appears twice"):
        NvmeStore.build(tmp_path, KEY, units)
    with pytest.raises(ValueError, match="'m' to the NVMe store: it is a meta tensor"):
        NvmeStore.build(tmp_path, KEY, [("u", [("m", torch.empty(2, device="meta"))])])
    assert list(tmp_path.iterdir()) == []


def test_dead_builders_temp_dir_is_cleaned(tmp_path):
    final = store_dir(tmp_path, KEY)
    dead = final.with_name(f"{final.name}.tmp-999999999")  # above any pid_max
    dead.mkdir()
    (dead / "unit-00000.bin").write_bytes(b"partial")
    NvmeStore.build(tmp_path, KEY, make_units()).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_o_direct_refused_falls_back_once(built, tmp_path, monkeypatch, caplog):
    store, expected = built
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    caplog.set_level("INFO", logger="zinfer.offload.nvme")
    for _ in range(2):
        got = store.read_unit("layers.1")
        assert torch.equal(got["big"], expected["layers.1"]["big"])
    assert not store.direct
    assert caplog.text.count("O_DIRECT refused") == 1


def test_o_direct_refused_at_read_time_falls_back(built, monkeypatch):
    store, expected = built
    if not store.direct:
        pytest.skip("filesystem already refuses O_DIRECT")
    real_preadv = os.preadv

    def picky(fd, bufs, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", picky)
    got = store.read_unit("layers.1")
    assert torch.equal(got["big"], expected["layers.1"]["big"]) and not store.direct
