"""Weight placement and streaming: the planner, host and NVMe stores, the weight streamer."""

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from zinfer.config import EngineConfig
from zinfer.offload.nvme import CONTENT
from zinfer.offload.plan import GPU, NVME, Plan
from zinfer.offload.streamer import WeightStreamer, nvme_units
from zinfer.parallel import SINGLE, TensorParallel


def weights_identity(files: list[Path] | None, dummy_seed: int | None) -> str:
    """Which weights a model was loaded with, cheaply: the dummy seed, or each checkpoint file's name, size and
    modification time (a checkpoint saved again at the same path is other weights)."""
    if files is None:
        return f"dummy seed {dummy_seed}"
    stats = [(f.name, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()]]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def store_key(model: nn.Module, source_name: str, dtype: torch.dtype, options: EngineConfig,
              tp: TensorParallel = SINGLE, weights: str = "") -> dict:
    """What the bytes in an NVMe store depend on: a store made for anything else is never reused. `weights`:
    `weights_identity` of what was loaded, the store's content (other weights replace the store in its
    directory). Under tensor parallelism each rank stores only its shard, so the key names the rank and the
    group size: ranks sharing an offload_dir get one store each and never read or replace another's."""
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    key = {"model": source_name, "config": hashlib.sha256(config.encode()).hexdigest()[:16], CONTENT: weights,
           "dtype": str(dtype), "quant_bits": options.quant_bits, "quant_group_size": options.quant_group_size}
    if tp.size > 1:  # one process keeps the directory it always had
        key.update(tp_size=tp.size, tp_rank=tp.rank)
    return key


def stream(model: nn.Module, plan: Plan, options: EngineConfig, device: torch.device, key: dict,
           sync: bool = False) -> WeightStreamer:
    """Move a loaded model (resident units on the device, streamed ones in host memory: `load_devices`) to its
    planned homes and attach the streamer to it."""
    store = None
    if any(u.place == NVME for u in plan.units):
        from zinfer.offload.nvme import NvmeStore

        total = sum(u.nbytes for u in plan.units if u.place == NVME)
        store = NvmeStore.open_or_build(options.offload_dir, key, lambda: nvme_units(model, plan),
                                        total_bytes=total, pin=options.pin_memory)
    streamer = WeightStreamer(model, plan, device, store, sync=sync, pin=options.pin_memory)
    for module in model.modules():  # computed buffers (rotary frequencies, ALiBi slopes) follow the compute
        if hasattr(module, "init_buffers"):
            module.init_buffers(device)
    return streamer


__all__ = ["GPU", "Plan", "WeightStreamer", "stream", "store_key", "weights_identity"]
