"""The systems `zinfer compare` runs the same workload on: transformers, accelerate offload, DeepSpeed ZeRO-3.

Each peer is a small class: `name`, `available() -> (ok, reason)`, `load(config, source, dtype, device)`
and `generate(input_ids, attention_mask, gen_len) -> PeerTimings`. Timing is the same for all, and as the seed's:
one `generate` of `gen_len` tokens (`min_new_tokens` forcing the length), the device synchronised around it; its
prefill ends where the first forward pass's logits reach the logits processors (the device synchronised there).
Prefill and total come from the same call, so decode = total - prefill is never a difference of two runs' noise
(timing prefill as a separate one-token `generate` gave tiny models negative or near-zero decode times).
`load` raises `PeerSkipped` when the workload cannot run on that peer here (e.g. offload peers on a CPU-only
machine).
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zinfer.bench.metrics import GB, BenchConfig

DS_FAMILIES = ("bloom", "opt", "llama", "mixtral")  # get_ds_model's model-class dispatch


@dataclass
class PeerTimings:
    prefill: float  # seconds from the call to the first forward pass's logits
    total: float  # seconds of the whole generate of gen_len tokens


class _FirstLogits:
    """A logits processor that only records when the first forward pass's logits arrive (prefill's end)."""

    def __init__(self, device: torch.device | None, start: float):
        self.device, self.start, self.seconds = device, start, None

    def __call__(self, input_ids, scores):
        if self.seconds is None:
            sync(self.device)
            self.seconds = time.perf_counter() - self.start
        return scores


class PeerSkipped(Exception):
    """This peer cannot run this workload here; the message says why."""


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
    except Exception as e:  # not only ImportError: DeepSpeed's import can fail on a missing CUDA toolkit
        return False, f"cannot import {module}: {type(e).__name__}: {e}"
    return True, ""


def hf_model(config: BenchConfig, source, dtype: torch.dtype, device: torch.device | None):
    """The same model in transformers: the checkpoint's weights, or for --dummy a random init of the same
    config (values differ from zinfer's dummy weights; shapes and dtype are the same). `device` None leaves
    placement to the caller (DeepSpeed partitions while loading)."""
    from transformers import AutoModelForCausalLM

    if config.dummy or source.directory is None:
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(source.config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype)
        model = model.to(device) if device is not None else model
    return model.eval()


def pad_id(hf_config) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(hf_config, name, None)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            return value
    return 0


class HFGeneratePeer:
    """Timing shared by every peer: transformers' `generate` on whatever model `load` built."""

    name = "?"
    note = ""

    def __init__(self):
        self.model, self.device, self.pad = None, None, 0

    def available(self) -> tuple[bool, str]:
        return importable("transformers")

    def generate(self, input_ids, attention_mask, gen_len: int) -> PeerTimings:
        from transformers import LogitsProcessorList

        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        sync(self.device)
        start = time.perf_counter()
        first = _FirstLogits(self.device, start)
        with torch.no_grad():  # as the seed; inference_mode tensors break ZeRO-3's in-place parameter gathers
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=gen_len,
                                      min_new_tokens=gen_len, do_sample=False, pad_token_id=self.pad,
                                      logits_processor=LogitsProcessorList([first]))
        sync(self.device)
        total = time.perf_counter() - start
        new = out.shape[1] - input_ids.shape[1]
        if new != gen_len or first.seconds is None:
            raise RuntimeError(f"{self.name}: asked for {gen_len} new tokens, got {new}")
        return PeerTimings(first.seconds, total)

    def unload(self) -> None:
        self.model = None


class TransformersPeer(HFGeneratePeer):
    name = "transformers"

    def load(self, config: BenchConfig, source, dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.device, self.pad = hf_model(config, source, dtype, device), device, pad_id(source.config)
        self.note = f"eager generate, all weights on {device} (offload flags do not apply)"


class AcceleratePeer(HFGeneratePeer):
    """Hugging Face accelerate's big-model offload: weights stream to the GPU through module hooks."""

    name = "accelerate"

    def available(self) -> tuple[bool, str]:
        return importable("accelerate")

    def load(self, config: BenchConfig, source, dtype: torch.dtype, device: torch.device) -> None:
        if device.type != "cuda":
            raise PeerSkipped(f"accelerate offload streams weights to a GPU; on {device} there is nothing "
                              "to offload to")
        import accelerate

        model = hf_model(config, source, dtype, torch.device("cpu"))
        if config.cpu_offload:
            accelerate.cpu_offload(model, execution_device=device)
            self.note = "accelerate.cpu_offload: every weight streamed from CPU memory each forward"
        elif config.disk_offload:
            accelerate.disk_offload(model, str(Path(config.offload_dir).expanduser()), execution_device=device)
            self.note = f"accelerate.disk_offload to {config.offload_dir}"
        else:
            self._dispatch(model, device)
        self.model, self.device, self.pad = model, device, pad_id(source.config)

    def _dispatch(self, model, device: torch.device) -> None:
        import accelerate
        import psutil  # an accelerate dependency

        index = device.index if device.index is not None else torch.cuda.current_device()
        # device_map="auto" under a cap: what fits in 90% of free GPU memory stays, the rest is offloaded
        cap = int(torch.cuda.mem_get_info(index)[0] * 0.9)
        device_map = accelerate.infer_auto_device_map(
            model, max_memory={index: cap, "cpu": psutil.virtual_memory().available},
            no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
        accelerate.dispatch_model(model, device_map, main_device=device)
        self.note = f"device_map=auto with max_memory {cap / GB:.1f} GiB on GPU {index}"


def ds_zero3_config(config: BenchConfig, hidden_size: int, dtype: torch.dtype, pin_memory: bool = True) -> dict:
    """The DeepSpeed config `get_ds_model` builds: ZeRO-3 with prefetch sized from the hidden size, parameter
    offload to CPU or NVMe, 4-bit quantized initialization when asked."""
    h = hidden_size
    zero = {"stage": 3, "stage3_prefetch_bucket_size": 2 * h * h, "stage3_param_persistence_threshold": h,
            "stage3_max_live_parameters": 2 * h * h}
    ds = {"fp16": {"enabled": dtype == torch.float16}, "bf16": {"enabled": dtype == torch.bfloat16},
          "zero_optimization": zero, "steps_per_print": 2000, "train_batch_size": config.batch_size,
          "wall_clock_breakdown": False}
    if config.quant_bits == 4:  # the seed quantizes at initialization for 4 bits only
        ds["weight_quantization"] = {"quantized_initialization": {
            "num_bits": 4, "group_size": config.quant_group_size, "group_dim": 1, "symmetric": False}}
    if config.cpu_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    elif config.disk_offload:
        zero["offload_param"] = {"device": "nvme", "nvme_path": str(Path(config.offload_dir).expanduser()),
                                 "pin_memory": pin_memory, "buffer_count": 5, "buffer_size": 2 * GB}
        ds["aio"] = {"block_size": 16 * 1048576, "queue_depth": 64, "thread_count": 8, "use_gds": False,
                     "single_submit": False, "overlap_events": True}
    return ds


def _single_process_env() -> None:
    """deepspeed.init_distributed reads the launcher's variables; a plain `zinfer compare` is rank 0 of 1."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:  # a free port, not a hard-coded one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        os.environ.setdefault(key, value)


class DeepSpeedPeer(HFGeneratePeer):
    """ZeRO-Inference as the seed's `get_ds_model` builds it: ZeRO-3 parameter partitioning and offload."""

    name = "deepspeed"

    def __init__(self, pin_memory: bool = True):
        super().__init__()
        self.pin_memory = pin_memory
        self.hf_ds_config = None

    def available(self) -> tuple[bool, str]:
        return importable("deepspeed")

    def load(self, config: BenchConfig, source, dtype: torch.dtype, device: torch.device) -> None:
        if device.type != "cuda":
            raise PeerSkipped(f"DeepSpeed ZeRO-3 inference needs a CUDA device, not {device}")
        model_type = source.config.model_type
        if model_type not in DS_FAMILIES:
            raise PeerSkipped(f"get_ds_model supports {', '.join(DS_FAMILIES)}; not {model_type!r}")
        import deepspeed
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        _single_process_env()
        deepspeed.init_distributed("nccl")
        ds_config = ds_zero3_config(config, source.config.hidden_size, dtype, self.pin_memory)
        # kept on self: transformers holds it by weak reference and partitions while loading only while it lives
        self.hf_ds_config = HfDeepSpeedConfig(ds_config)
        torch.cuda.empty_cache()
        model = hf_model(config, source, dtype, None)
        engine = deepspeed.initialize(model=model, config_params=ds_config)[0]
        engine.module.eval()
        self.model, self.device, self.pad = engine.module, device, pad_id(source.config)
        offload = ds_config["zero_optimization"].get("offload_param", {}).get("device", "none")
        self.note = f"ZeRO-3, offload_param {offload}" + (", 4-bit init" if config.quant_bits == 4 else "")

    def unload(self) -> None:
        super().unload()
        self.hf_ds_config = None


def default_peers(pin_memory: bool = True) -> list[HFGeneratePeer]:
    return [TransformersPeer(), AcceleratePeer(), DeepSpeedPeer(pin_memory)]


PEER_NAMES = tuple(p.name for p in (TransformersPeer, AcceleratePeer, DeepSpeedPeer))


def select_peers(names: list[str] | None, pin_memory: bool = True) -> list[HFGeneratePeer]:
    """The peers named (None: all), in PEER_NAMES order."""
    unknown = sorted(set(names or ()) - set(PEER_NAMES))
    if unknown:
        raise ValueError(f"unknown peer {', '.join(unknown)}; choose from {', '.join(PEER_NAMES)}")
    return [p for p in default_peers(pin_memory) if names is None or p.name in names]
