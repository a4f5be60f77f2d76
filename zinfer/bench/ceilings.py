"""The physical ceilings of this machine, measured once and cached, and roofline ratios against them.

On a GPU: device-to-device copy (bytes read + written per second), pinned and pageable host-to-device
copies, and a bf16 8192^3 matmul. On a CPU-only machine: a host memory copy and an fp32 matmul, small
enough to take well under two seconds. Optionally the read bandwidth of a directory's disk. Rates are
in SI units (bytes/s, flop/s). The cache is `$ZINFER_CACHE` (or ~/.cache/zinfer)/ceilings-<slug>.json.
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

MiB = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("ZINFER_CACHE") or "~/.cache/zinfer").expanduser()


def _as_device(device) -> torch.device:
    if isinstance(device, int):
        return torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _cpu_name() -> str:
    # platform.processor() is often just "x86_64"; /proc/cpuinfo names the actual part on Linux.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError as err:
        warnings.warn(f"cannot read /proc/cpuinfo ({err}); naming the CPU by platform", stacklevel=2)
    return platform.processor() or platform.machine() or "unknown"


def device_name(device) -> str:
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu {_cpu_name()}"
    raise ValueError(f"ceilings are measured on 'cpu' or 'cuda' devices, got {device}")


def cache_path(device) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return cache_dir() / f"ceilings-{slug}.json"


# --- timing -------------------------------------------------------------------------------------------

def _cuda_median_s(fn, reps: int) -> float:
    fn()  # warm-up: the first call pays for kernel selection and lazy initialisation
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def _wall_median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- measurements -------------------------------------------------------------------------------------

def _cuda_copy_s(device: torch.device, nbytes: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _cuda_median_s(lambda: dst.copy_(src), reps=10)


def _cuda_h2d_s(device: torch.device, nbytes: int, pinned: bool) -> float:
    host = torch.ones(nbytes, dtype=torch.uint8)  # ones(): pages touched before timing
    host = host.pin_memory() if pinned else host
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return _cuda_median_s(lambda: dst.copy_(host, non_blocking=pinned), reps=5)


def _cuda_matmul_s(device: torch.device, n: int) -> float:
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))  # random, not zeros:
    c = torch.empty_like(a)  # zeros toggle fewer bits and run faster than real weights
    return _cuda_median_s(lambda: torch.mm(a, b, out=c), reps=10)


def _measure_cuda(device: torch.device, copy_bytes: int = 1024 * MiB, h2d_bytes: int = 256 * MiB,
                  n: int = 8192) -> dict:
    with torch.cuda.device(device):
        copy_s = _cuda_copy_s(device, copy_bytes)
        pinned_s = _cuda_h2d_s(device, h2d_bytes, pinned=True)
        pageable_s = _cuda_h2d_s(device, h2d_bytes, pinned=False)
        matmul_s = _cuda_matmul_s(device, n)
        torch.cuda.empty_cache()  # hand the probe buffers back before the model loads
    return {
        "device_copy_bytes_per_s": 2 * copy_bytes / copy_s,  # each byte is read once and written once
        "h2d_pinned_bytes_per_s": h2d_bytes / pinned_s,
        "h2d_pageable_bytes_per_s": h2d_bytes / pageable_s,
        "matmul_flops_per_s": 2 * n**3 / matmul_s,
        "matmul_dtype": "bfloat16",
        "method": f"CUDA events, median; copy {copy_bytes // MiB} MiB, "
                  f"h2d {h2d_bytes // MiB} MiB, matmul {n}^3",
    }


def _measure_cpu(copy_bytes: int = 64 * MiB, n: int = 1024, read_bytes: int = 256 * MiB) -> dict:
    # Small sizes: CI machines run this inside the test suite, so it must stay well under two seconds.
    src = torch.ones(copy_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_s = _wall_median_s(lambda: dst.copy_(src), reps=5)
    # DRAM read rate on every core: a half-precision sum over more than a last-level cache holds, the access
    # pattern of attention over an offloaded KV cache (a 64 MiB copy can run partly in cache: 32-151 GB/s was
    # seen on two 16-core GPU hosts)
    half = torch.ones(read_bytes // 2, dtype=torch.float16)
    read_s = _wall_median_s(lambda: half.sum(), reps=5)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    matmul_s = _wall_median_s(lambda: torch.mm(a, b, out=c), reps=3)
    return {
        "device_copy_bytes_per_s": 2 * copy_bytes / copy_s,
        "host_read_bytes_per_s": read_bytes / read_s,
        "matmul_flops_per_s": 2 * n**3 / matmul_s,
        "matmul_dtype": "float32",
        "method": f"wall clock, median; copy {copy_bytes // MiB} MiB, fp16 sum {read_bytes // MiB} MiB, "
                  f"matmul {n}^3 on "
                  f"{torch.get_num_threads()} threads",
    }


def _write_probe(directory: str, nbytes: int, chunk: int) -> str:
    block = os.urandom(chunk)  # random: a compressing file system must not shrink the probe
    fd, path = tempfile.mkstemp(prefix=".zinfer-disk-probe-", dir=directory)
    try:
        for _ in range(nbytes // chunk):
            os.write(fd, block)
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # drop the pages just written so a buffered read hits the disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return path


def _timed_read(path: str, flags: int, chunk: int, nbytes: int) -> float:
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT requires
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        done, t0 = 0, time.perf_counter()
        while (got := os.readv(fd, [buf])) > 0:
            done += got
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    if done != nbytes:
        raise RuntimeError(f"disk probe {path}: read {done} bytes, wrote {nbytes}")
    return seconds


def measure_disk_read(directory: str, nbytes: int = 256 * MiB, chunk: int = 8 * MiB) -> dict:
    """Sequential read bandwidth of a fresh file in `directory`, O_DIRECT where the file system allows."""
    nbytes = max(chunk, nbytes // chunk * chunk)
    path = _write_probe(directory, nbytes, chunk)
    try:
        o_direct = getattr(os, "O_DIRECT", None)
        try:
            if o_direct is None:
                raise OSError(f"O_DIRECT does not exist on {platform.system()}")
            seconds, method = _timed_read(path, o_direct, chunk, nbytes), "O_DIRECT"
        except OSError as err:
            # tmpfs and some network file systems refuse O_DIRECT (EINVAL); a buffered read after
            # posix_fadvise(DONTNEED) is the next best thing, but may still be served from RAM.
            seconds = _timed_read(path, 0, chunk, nbytes)
            method = f"buffered after fadvise(DONTNEED), O_DIRECT refused ({err}); may include page cache"
    finally:
        os.unlink(path)
    return {"bytes_per_s": nbytes / seconds, "bytes": nbytes, "method": method}


# --- cache --------------------------------------------------------------------------------------------

def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        warnings.warn(f"ignoring corrupt ceilings cache {path} ({err}); measuring again", stacklevel=3)
        return None


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file


def measure(device) -> dict:
    device = _as_device(device)
    figures = _measure_cuda(device) if device.type == "cuda" else _measure_cpu()
    return {"device_name": device_name(device), "device_type": device.type,
            "torch_version": torch.__version__, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **figures}


def get_ceilings(device, refresh: bool = False, *, disk_dir: str | None = None) -> dict:
    """This device's ceilings from the cache, measuring them first if absent (or `refresh`).

    With `disk_dir`, also the disk read bandwidth there, cached per directory under "disk".
    """
    device = _as_device(device)
    path = cache_path(device)
    data = None if refresh else _load(path)
    dirty = data is None
    if data is None:
        data = measure(device)
    elif device.type == "cpu" and "host_read_bytes_per_s" not in data:
        data.update(measure(device))  # cached before the host read rate was measured (disk rates kept)
        dirty = True
    if disk_dir is not None:
        key = str(Path(disk_dir).resolve())
        disks = data.setdefault("disk", {})
        if refresh or key not in disks:
            disks[key] = measure_disk_read(key)
            dirty = True
    if dirty:
        _save(path, data)
    return data


# --- roofline -----------------------------------------------------------------------------------------

def roofline_ratio(achieved: float, ceiling: float) -> float:
    """Achieved rate over the ceiling rate (same units): 1.0 means at the roofline."""
    if ceiling <= 0:
        raise ValueError(f"a ceiling must be positive, got {ceiling}")
    return achieved / ceiling


def floor_ratio(measured_s: float, floor_s: float) -> float:
    """Floor time over measured time: the fraction of the roofline a timed step reaches."""
    if measured_s <= 0:
        raise ValueError(f"a measured time must be positive, got {measured_s}")
    return floor_s / measured_s


def bytes_floor_s(nbytes: int, bytes_per_s: float) -> float:
    """Least time to move `nbytes` (decode: weight bytes per step over HBM or pinned PCIe bandwidth)."""
    return nbytes / bytes_per_s


def prefill_floor_s(num_params: int, tokens: int, flops_per_s: float) -> float:
    """Least prefill time: 2 flops per parameter per token at the matmul rate."""
    return 2 * num_params * tokens / flops_per_s
