"""Random weights for benchmarking without a checkpoint: seeded per tensor, made on the device.

Each tensor's generator is seeded from (seed, name), so the same tensor gets the same values
whatever order, process or shard asks for it.
"""

import zlib
from collections.abc import Iterator

import torch
from torch import nn


def dummy_tensor(name: str, shape: torch.Size, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if len(shape) == 1 and "norm" in name and name.endswith("weight"):
        t = 1.0 + 0.02 * t  # norm scales near one keep activations in range
    else:
        t = 0.02 * t
    return t.to(dtype)


def iter_dummy(model: nn.Module, dtype: torch.dtype, device, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """A dense tensor for every parameter; quantized Linears get their dense `weight` (quantized on load).
    A tensor-parallel rank gets every tensor whole, as one process would, and the loader cuts its block: so
    tp=N dummy weights equal tp=1 ones with the same seed."""
    shards = getattr(model, "shard_plan", None)
    if shards is not None:
        for name, shape in shards.full_shapes.items():
            yield name, dummy_tensor(name, shape, dtype, device, seed)
        return
    packed = {}
    for path, m in model.named_modules():
        if getattr(m, "qspec", None) is not None and hasattr(m, "out_features"):
            packed[f"{path}.weight"] = (m.out_features, m.in_features)
    skip = {f"{p[:-len('.weight')]}.{n}" for p in packed for n in ("qweight", "scale", "zero")}
    for name, p in model.named_parameters():
        if name not in skip:
            yield name, dummy_tensor(name, p.shape, dtype, device, seed)
    for name, shape in packed.items():
        yield name, dummy_tensor(name, torch.Size(shape), dtype, device, seed)
