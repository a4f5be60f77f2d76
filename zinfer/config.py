"""Engine options: everything that decides where tensors live and how they are stored.

One frozen dataclass (FlexGen's Policy, with names); `LLM(**engine_options)` builds it and the
planner turns it plus the model's shapes into a `Plan`.
"""

import re
from dataclasses import dataclass, field

from zinfer.errors import InputError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str | None) -> int | None:
    """'16GiB', '24 GB', '512MiB' or an int of bytes."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"cannot read {value!r} as a memory size: use e.g. '16GiB', '24GB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class EngineConfig:
    offload: str = "none"  # none | cpu | nvme | auto: where weights that do not stay on the GPU live
    offload_dir: str | None = None  # NVMe store directory
    gpu_memory: int | None = None  # bytes the weights may use on the GPU (None: free memory minus reserve); per rank
    cpu_memory: int | None = None  # bytes of host memory for offloaded weights; per rank (each holds its shard)
    pin_memory: bool = True
    quant_bits: int = 16  # 4 | 8 | 16 (= off)
    quant_group_size: int = 64
    quant_lm_head: bool = False  # also pack the LM head (a tied one gets its own packed copy; embeddings stay dense)
    kv_offload: bool = False
    pin_kv_cache: bool = False
    async_kv_offload: bool = False
    kv_attention: str = "auto"  # auto | gpu | cpu | split: where decode attention over an offloaded cache runs
    tp: int = 1
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        checks = [
            (self.offload in ("none", "cpu", "nvme", "auto"),
             f"offload must be one of none, cpu, nvme, auto; got {self.offload!r}"),
            (self.offload != "nvme" or self.offload_dir, "offload='nvme' needs offload_dir"),
            (self.quant_bits in (4, 8, 16), f"quant_bits must be 4, 8 or 16; got {self.quant_bits}"),
            (self.quant_group_size > 0, f"quant_group_size must be > 0; got {self.quant_group_size}"),
            (self.kv_attention in ("auto", "gpu", "cpu", "split"),
             f"kv_attention must be auto, gpu, cpu or split; got {self.kv_attention!r}"),
            (self.tp >= 1, f"tp must be >= 1; got {self.tp}"),
            (self.kv_offload or not self.pin_kv_cache,
             "pin_kv_cache=True pins the offloaded KV cache: it needs kv_offload=True"),
            (self.kv_offload or not self.async_kv_offload,
             "async_kv_offload=True copies keys/values to the offloaded cache: it needs kv_offload=True"),
            (self.kv_offload or self.kv_attention == "auto",
             f"kv_attention={self.kv_attention!r} chooses where attention over an offloaded KV cache runs: "
             "it needs kv_offload=True"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        for name in ("gpu_memory", "cpu_memory"):
            object.__setattr__(self, name, parse_bytes(getattr(self, name)))

    @classmethod
    def from_options(cls, options: dict) -> "EngineConfig":
        known = set(cls.__dataclass_fields__) - {"extra"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)

    @classmethod
    def from_deepspeed(cls, ds_config: dict) -> tuple[dict, list[str]]:
        """Engine options from a DeepSpeed config dict, and the keys that have no meaning here (ignored)."""
        options, ignored = {}, []
        zero = dict(ds_config.get("zero_optimization", {}))
        param = dict(zero.pop("offload_param", None) or {})
        device = param.pop("device", "none")
        if device in ("cpu", "nvme"):
            options["offload"] = device
        elif device != "none":
            raise InputError(f"deepspeed_config offload_param.device must be cpu, nvme or none; got {device!r}")
        if "pin_memory" in param:
            options["pin_memory"] = bool(param.pop("pin_memory"))
        if "nvme_path" in param:
            options["offload_dir"] = str(param.pop("nvme_path"))
        ignored += [f"zero_optimization.offload_param.{k}" for k in param]
        ignored += [f"zero_optimization.{k}" for k in zero]
        quant = dict((ds_config.get("weight_quantization") or {}).get("quantized_initialization") or {})
        if quant:
            options["quant_bits"] = int(quant.pop("num_bits", 8))
            options["quant_group_size"] = int(quant.pop("group_size", 64))
            if quant.pop("group_dim", 1) != 1:
                raise InputError("weight_quantization group_dim must be 1 (groups along the input dimension)")
            quant.pop("symmetric", None)
            ignored += [f"weight_quantization.quantized_initialization.{k}" for k in quant]
        ignored += [k for k in ds_config if k not in ("zero_optimization", "weight_quantization")]
        return options, sorted(ignored)

    def unsupported(self) -> list[str]:
        """Options this build cannot honour yet (each raises a clear error in `LLM`)."""
        wants = {"offload": self.offload != "none", "quant_bits": self.quant_bits != 16,
                 "kv_offload": self.kv_offload, "tp": self.tp != 1}
        return [k for k, v in wants.items() if v and k not in IMPLEMENTED]


IMPLEMENTED: set[str] = {"offload", "quant_bits", "kv_offload", "tp"}
