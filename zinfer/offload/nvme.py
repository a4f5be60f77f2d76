"""NVMe weight store: weights written once to `offload_dir`, read back with parallel O_DIRECT.

Layout of one store, `offload_dir/zinfer-<hash of key>/`:

    manifest.json      format version, the caller's key, and per unit: file, size, crc32,
                       and per tensor: name, dtype, shape, offset, nbytes
    unit-00000.bin     the tensors of one unit (e.g. `layers.3`), each starting at a
    unit-00001.bin     4096-byte-aligned offset, the file zero-padded to a 4096 multiple

Everything is 4096-aligned so a whole unit can be read with O_DIRECT (bypassing the page
cache, which would otherwise hold a second copy of the model) straight into one aligned,
pinned buffer, in 8 MiB pieces on a thread pool: plain `os.preadv` releases the GIL, so no
libaio or compiled extension is needed.

Validity: the store is written to `<name>.tmp-<pid>`, fsync'd, manifest last, then renamed,
so a directory named `<name>` is complete or absent. `open` still checks it: format version
and key must match (a stale store is removed), each file must have its manifest size, and
with `verify="full"` its CRC-32 (zlib, computed while writing, checked over the whole file
including padding; it catches truncation, torn writes and flipped bits, not tampering).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from zinfer.errors import ZinferError
from zinfer.offload.host import align_up, aligned_empty, resolve_pin, typed_view

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ALIGN = 4096
MiB = 1 << 20
READ_PIECE_BYTES = 8 * MiB
FREE_SPACE_MARGIN = 64 * MiB  # room for the manifest and filesystem metadata
MANIFEST = "manifest.json"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

TensorDict = dict[str, torch.Tensor]
Units = Iterable[tuple[str, Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]]]


class OffloadDirError(ZinferError, ValueError):
    """offload_dir cannot hold the store: not writable, or not enough free space."""


class CorruptStoreError(ValueError):
    """A store's manifest or files do not match; `open` turns this into a rebuild."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the unit file, a multiple of ALIGN
    nbytes: int


@dataclass(frozen=True)
class UnitEntry:
    name: str
    file: str
    nbytes: int  # file length, a multiple of ALIGN
    crc32: int
    tensors: tuple[TensorEntry, ...]


# -- key and manifest -----------------------------------------------------------------
def _canonical_key(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))


CONTENT = "content"  # a key field naming which bytes a store holds, not where it lives


def store_dir(offload_dir: str | os.PathLike, key: dict) -> Path:
    """Where the store for `key` lives: one directory per distinct key, except its CONTENT field (e.g. which
    checkpoint files): a store whose content changed is found stale in its directory and replaced there, not
    kept beside the new one (re-saving a checkpoint would otherwise add a whole store each time)."""
    slot = {k: v for k, v in key.items() if k != CONTENT}
    digest = hashlib.blake2b(_canonical_key(slot).encode(), digest_size=8).hexdigest()
    return Path(offload_dir) / f"zinfer-{digest}"


def _dtype_from_str(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptStoreError(f"unknown dtype {name!r} in manifest")
    return dtype


def _unit_to_json(u: UnitEntry) -> dict:
    tensors = [
        dict(name=t.name, dtype=str(t.dtype), shape=list(t.shape), offset=t.offset, nbytes=t.nbytes) for t in u.tensors
    ]
    return {"name": u.name, "file": u.file, "nbytes": u.nbytes, "crc32": u.crc32, "tensors": tensors}


def _unit_from_json(d: dict) -> UnitEntry:
    tensors = tuple(
        TensorEntry(t["name"], _dtype_from_str(t["dtype"]), tuple(t["shape"]), t["offset"], t["nbytes"])
        for t in d["tensors"]
    )
    return UnitEntry(d["name"], d["file"], d["nbytes"], d["crc32"], tensors)


def _load_manifest(path: Path, key: dict) -> dict[str, UnitEntry]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CorruptStoreError(f"unreadable manifest: {e}") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CorruptStoreError(f"stale format_version={version}, expected {FORMAT_VERSION}")
    if manifest.get("key") != json.loads(_canonical_key(key)):
        raise CorruptStoreError(f"stale key {manifest.get('key')}, expected {_canonical_key(key)}")
    try:
        return {u["name"]: _unit_from_json(u) for u in manifest["units"]}
    except (KeyError, TypeError) as e:
        raise CorruptStoreError(f"malformed manifest: {e!r}") from e


# -- sizes and directory checks -----------------------------------------------------------
def _items(tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]):
    return tensors.items() if isinstance(tensors, Mapping) else tensors


def store_nbytes(units: Units) -> int:
    """Bytes a store of `units` takes on disk (tensors may be on the meta device)."""
    return sum(align_up(t.nbytes, ALIGN) for _, tensors in units for _, t in _items(tensors))


def _sized_upfront(units) -> bool:
    # Only lists can be walked twice; a generator walked here would be empty when writing.
    return isinstance(units, Sequence) and all(isinstance(ts, Sequence | Mapping) for _, ts in units)


def _check_writable(offload_dir: Path) -> None:
    try:
        offload_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OffloadDirError(f"offload_dir {offload_dir} cannot be created: {e.strerror or e}") from e
    if not offload_dir.is_dir() or not os.access(offload_dir, os.W_OK | os.X_OK):
        raise OffloadDirError(f"offload_dir {offload_dir} is not a writable directory")
    # os.access says yes to root even on read-only mounts; a real file is the proof.
    try:
        fd, probe = tempfile.mkstemp(prefix=".zinfer-probe-", dir=offload_dir)
    except OSError as e:
        raise OffloadDirError(f"offload_dir {offload_dir} is not writable: {e.strerror or e}") from e
    os.close(fd)
    os.unlink(probe)


def _check_free_space(offload_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(offload_dir).free
    if free < needed + FREE_SPACE_MARGIN:
        raise OffloadDirError(
            f"offload_dir {offload_dir} has {free} bytes free but the NVMe store needs {needed} bytes "
            f"(+{FREE_SPACE_MARGIN} margin); free space there or pick another offload_dir"
        )


def _remove_dead_temp_dirs(final: Path) -> None:
    """Temp dirs of builds whose process died (killed mid-write) only waste disk space."""
    for tmp in final.parent.glob(f"{final.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- writing ----------------------------------------------------------------------------
def _write_bytes(f, data) -> None:
    """One write call; a separate function so tests can make the disk fill up mid-way."""
    f.write(data)


def _tensor_bytes(name: str, t: torch.Tensor) -> memoryview:
    if t.is_meta:
        raise ValueError(f"cannot write {name!r} to the NVMe store: it is a meta tensor (no data)")
    return _byte_view(t.detach().to("cpu").contiguous())


def _write_unit(path: Path, tensors) -> tuple[tuple[TensorEntry, ...], int, int]:
    """Write tensors back to back at ALIGN-ed offsets; return (entries, file length, crc32)."""
    entries, offset, crc, seen = [], 0, 0, set()
    with open(path, "wb") as f:
        for name, t in _items(tensors):
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice in unit file {path.name}")
            seen.add(name)
            data = _tensor_bytes(name, t)
            pad = bytes(align_up(len(data), ALIGN) - len(data))
            for part in (data, pad):
                _write_bytes(f, part)
                crc = zlib.crc32(part, crc)
            entries.append(TensorEntry(name, t.dtype, tuple(t.shape), offset, len(data)))
            offset += len(data) + len(pad)
        f.flush()
        os.fsync(f.fileno())
    return tuple(entries), offset, crc


def _write_store(tmp: Path, key: dict, units: Units) -> dict[str, UnitEntry]:
    tmp.mkdir()
    entries: dict[str, UnitEntry] = {}
    for i, (unit_name, tensors) in enumerate(units):
        if unit_name in entries:
            raise ValueError(f"unit {unit_name!r} appears twice in the NVMe store")
        file = f"unit-{i:05d}.bin"
        tensor_entries, nbytes, crc = _write_unit(tmp / file, tensors)
        entries[unit_name] = UnitEntry(unit_name, file, nbytes, crc, tensor_entries)
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": json.loads(_canonical_key(key)),
        "align": ALIGN,
        "checksum": "crc32",
        "units": [_unit_to_json(u) for u in entries.values()],
    }
    # The manifest goes last: a directory without one is never taken for a store.
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    return entries


def _write_atomically(final: Path, key: dict, units: Units, total_bytes: int | None) -> dict[str, UnitEntry]:
    _remove_dead_temp_dirs(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        entries = _write_store(tmp, key, units)
        # `build` means replace: a leftover at `final` was already judged invalid or unwanted.
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            raise OffloadDirError(
                f"disk full while writing the NVMe store in {final.parent} "
                f"({shutil.disk_usage(final.parent).free} bytes free, needed {total_bytes} in all); "
                f"the partial store was removed"
            ) from e
        raise
    _fsync_dir(final.parent)
    return entries


# -- reading ----------------------------------------------------------------------------
def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file at byte {offset + done} (store truncated?)")
        done += n


def _gather(futures: list[Future], value, cleanup: Callable[[], None]) -> Future:
    """A future that resolves to `value` once all `futures` are done (first error wins)."""
    result: Future = Future()
    remaining = len(futures)
    lock = threading.Lock()

    def finish() -> None:
        cleanup()
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            result.set_exception(errors[0])
        else:
            result.set_result(value)

    def one_done(_: Future) -> None:
        nonlocal remaining
        with lock:
            remaining -= 1
            last = remaining == 0
        if last:
            finish()

    if not futures:
        finish()
    for f in futures:
        f.add_done_callback(one_done)
    return result


class NvmeStore:
    """A validated on-disk store; use `build`, `open` or `open_or_build`, not the constructor."""

    def __init__(
        self,
        path: Path,
        units: dict[str, UnitEntry],
        *,
        num_threads: int = 8,
        pin: bool = True,
        direct: bool = True,
        piece_bytes: int = READ_PIECE_BYTES,
    ):
        if piece_bytes <= 0 or piece_bytes % ALIGN:
            raise ValueError(f"piece_bytes={piece_bytes} must be a positive multiple of {ALIGN}")
        self.path = Path(path)
        self._units = units
        self.pin = resolve_pin(pin)
        self.piece_bytes = piece_bytes
        # Cleared (with a one-time note) if the filesystem refuses O_DIRECT, e.g. tmpfs.
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="zinfer-nvme")

    # -- lifecycle ----------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        offload_dir: str | os.PathLike,
        key: dict,
        units: Units,
        *,
        total_bytes: int | None = None,
        **options,
    ) -> NvmeStore:
        """Write `units` ((unit name, [(tensor name, tensor)])) as the store for `key`.

        Checks that offload_dir is writable and has room for `total_bytes` before writing
        anything. `total_bytes` is computed when `units` is a list of lists; for a generator
        pass it (see `store_nbytes`), else only the fixed margin is checked upfront and a
        full disk is caught while writing. `options` (num_threads, pin, direct,
        piece_bytes) configure reads.
        """
        final = store_dir(offload_dir, key)
        store = cls(final, {}, **options)  # bad options fail here, not after a long write
        try:
            _check_writable(final.parent)
            if total_bytes is None and _sized_upfront(units):
                total_bytes = store_nbytes(units)
            _check_free_space(final.parent, total_bytes or 0)
            store._units = _write_atomically(final, key, units, total_bytes)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(
        cls,
        offload_dir: str | os.PathLike,
        key: dict,
        *,
        verify: Literal["size", "full"] = "full",
        **options,
    ) -> NvmeStore | None:
        """The store for `key`, or None if absent; a stale or corrupt one is removed (and None)."""
        if verify not in ("size", "full"):
            raise ValueError(f"verify={verify!r} must be 'size' or 'full'")
        path = store_dir(offload_dir, key)
        if not path.exists():
            return None
        try:
            units = _load_manifest(path, key)
            store = cls(path, units, **options)
        except CorruptStoreError as e:
            return _discard(path, str(e))
        try:
            store._verify(full=verify == "full")
        except CorruptStoreError as e:
            store.close()
            return _discard(path, str(e))
        return store

    @classmethod
    def open_or_build(
        cls,
        offload_dir: str | os.PathLike,
        key: dict,
        units_factory: Callable[[], Units],
        *,
        total_bytes: int | None = None,
        verify: Literal["size", "full"] = "full",
        **options,
    ) -> NvmeStore:
        """Reuse a valid store for `key`, else build one from `units_factory()`."""
        store = cls.open(offload_dir, key, verify=verify, **options)
        if store is not None:
            return store
        return cls.build(offload_dir, key, units_factory(), total_bytes=total_bytes, **options)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> NvmeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queries ------------------------------------------------------------------------
    @property
    def units(self) -> list[str]:
        return list(self._units)

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self._units.values())

    @property
    def direct(self) -> bool:
        """Whether reads use O_DIRECT (False after the filesystem refused it)."""
        return self._direct

    def unit(self, unit_name: str) -> UnitEntry:
        if unit_name not in self._units:
            raise KeyError(f"unit {unit_name!r} is not in the NVMe store at {self.path} ({len(self)} units)")
        return self._units[unit_name]

    def __contains__(self, unit_name: str) -> bool:
        return unit_name in self._units

    def __len__(self) -> int:
        return len(self._units)

    # -- validation ---------------------------------------------------------------------
    def _verify(self, full: bool) -> None:
        for u in self._units.values():
            size = _file_size(self.path / u.file)
            if size != u.nbytes:
                raise CorruptStoreError(f"{u.file} (unit {u.name!r}) is {size} bytes, manifest: {u.nbytes}")
        if full:
            # zlib.crc32 releases the GIL, so files are checked in parallel.
            crcs = self._pool.map(lambda u: (u, self._file_crc(u)), self._units.values())
            for u, crc in crcs:
                if crc != u.crc32:
                    raise CorruptStoreError(
                        f"{u.file} (unit {u.name!r}) has crc32 {crc:#010x}, manifest says {u.crc32:#010x}"
                    )

    def _file_crc(self, u: UnitEntry) -> int:
        crc = 0
        with open(self.path / u.file, "rb", buffering=0) as f:
            while chunk := f.read(self.piece_bytes):
                crc = zlib.crc32(chunk, crc)
        return crc

    # -- reading ------------------------------------------------------------------------
    def alloc_unit_buffers(self, unit_name: str) -> TensorDict:
        """Typed views over one ALIGN-ed (pinned when possible) buffer laid out like the file.

        Reading into these is the fast path: the whole file lands in one O_DIRECT sweep.
        The streamer allocates two sets per unit shape for double buffering.
        """
        u = self.unit(unit_name)
        buf = aligned_empty(u.nbytes, ALIGN, self.pin)
        return {t.name: typed_view(buf, t.offset, t.dtype, t.shape) for t in u.tensors}

    def read_unit(self, unit_name: str, out: TensorDict | None = None) -> TensorDict:
        """All tensors of a unit, read into `out` (or fresh buffers) and returned."""
        return self.read_unit_async(unit_name, out).result()

    def read_unit_async(self, unit_name: str, out: TensorDict | None = None) -> Future:
        """Start reading a unit in parallel pieces; the future resolves to the `out` dict."""
        u = self.unit(unit_name)
        out = self.alloc_unit_buffers(unit_name) if out is None else out
        _check_out(u, out)
        region = _file_region(u, out)
        if region is not None:
            jobs = self._pieces(memoryview(region.numpy()), 0)
        else:  # caller-owned buffers of arbitrary alignment: buffered reads, tensor by tensor
            jobs = [job for t in u.tensors if t.nbytes for job in self._pieces(_byte_view(out[t.name]), t.offset)]
        fd, direct = self._open_file(u, direct=self._direct and region is not None)
        futures = [self._pool.submit(self._read_piece, u, fd, direct, buf, off) for buf, off in jobs]
        return _gather(futures, out, lambda: os.close(fd))

    def _pieces(self, buf: memoryview, file_offset: int) -> list[tuple[memoryview, int]]:
        step = self.piece_bytes
        return [(buf[i : i + step], file_offset + i) for i in range(0, len(buf), step)]

    def _open_file(self, u: UnitEntry, direct: bool) -> tuple[int, bool]:
        """(fd, whether it is O_DIRECT)."""
        path = self.path / u.file
        if direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._note_no_direct(e)
        return os.open(path, os.O_RDONLY), False

    def _read_piece(self, u: UnitEntry, fd: int, direct: bool, buf: memoryview, offset: int) -> None:
        try:
            _pread_into(fd, buf, offset)
        except OSError as e:
            # Some filesystems accept O_DIRECT at open and refuse it at read time.
            if not (direct and e.errno == errno.EINVAL):
                raise
            self._note_no_direct(e)
            buffered = os.open(self.path / u.file, os.O_RDONLY)
            try:
                _pread_into(buffered, buf, offset)
            finally:
                os.close(buffered)

    def _note_no_direct(self, e: OSError) -> None:
        if self._direct:
            self._direct = False
            log.info("O_DIRECT refused under %s (%s); NVMe reads go through the page cache", self.path, e)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError as e:
        raise CorruptStoreError(f"missing file {path.name}") from e


def _discard(path: Path, reason: str) -> None:
    log.warning("NVMe store %s is stale or corrupt (%s); removing it so it is rebuilt", path, reason)
    shutil.rmtree(path, ignore_errors=True)
    return None


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _check_out(u: UnitEntry, out: TensorDict) -> None:
    for t in u.tensors:
        dst = out.get(t.name)
        if dst is None:
            raise ValueError(f"read of unit {u.name!r}: no destination buffer for {t.name!r}")
        got = (dst.dtype, tuple(dst.shape), dst.device.type, dst.is_contiguous())
        if got != (t.dtype, t.shape, "cpu", True):
            raise ValueError(
                f"read of unit {u.name!r}: buffer for {t.name!r} has (dtype, shape, device, contiguous)="
                f"{got}, expected {(t.dtype, t.shape, 'cpu', True)}"
            )


def _file_region(u: UnitEntry, out: TensorDict) -> torch.Tensor | None:
    """The uint8 buffer mirroring the whole unit file, if `out` came from alloc_unit_buffers."""
    placed = [t for t in u.tensors if t.nbytes]  # empty tensors have no meaningful address
    if not placed:
        return None
    first = out[placed[0].name]
    storage = first.untyped_storage()
    base = first.data_ptr() - placed[0].offset
    start = base - storage.data_ptr()
    if base % ALIGN or start < 0 or start + u.nbytes > storage.nbytes():
        return None
    for t in placed:
        dst = out[t.name]
        if dst.untyped_storage().data_ptr() != storage.data_ptr() or dst.data_ptr() - base != t.offset:
            return None
    return torch.empty(0, dtype=torch.uint8).set_(storage, start, (u.nbytes,))
