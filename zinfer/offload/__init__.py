"""Weight placement and streaming: the planner, host and NVMe stores, the weight streamer."""

import hashlib
import json

import torch
from torch import nn

from zinfer.config import EngineConfig
from zinfer.offload.plan import GPU, NVME, Plan
from zinfer.offload.streamer import WeightStreamer, nvme_units


def store_key(model: nn.Module, source_name: str, dtype: torch.dtype, options: EngineConfig) -> dict:
    """What the bytes in an NVMe store depend on: a store made for anything else is never reused."""
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return {"model": source_name, "config": hashlib.sha256(config.encode()).hexdigest()[:16],
            "dtype": str(dtype), "quant_bits": options.quant_bits, "quant_group_size": options.quant_group_size}


def stream(model: nn.Module, plan: Plan, options: EngineConfig, device: torch.device, key: dict,
           sync: bool = False) -> WeightStreamer:
    """Move a CPU-loaded model to its planned homes and attach the streamer to it."""
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


__all__ = ["GPU", "Plan", "WeightStreamer", "stream", "store_key"]
