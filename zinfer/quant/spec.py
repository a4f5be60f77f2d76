"""QuantSpec: the one description of a group-wise weight quantization format.

The same spec describes a weight in GPU memory, in pinned host memory, in an NVMe file and on
the PCIe bus between them (see pack.py for the layout). It mirrors ZeRO-Inference's
`weight_quantization.quantized_initialization` block (4-bit, group 64, group_dim 1, asymmetric).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

_DS_KEYS = {"num_bits", "group_size", "group_dim", "symmetric"}


@dataclass(frozen=True)
class QuantSpec:
    """Group-wise integer quantization of a Linear weight [N, K].

    bits:       4 (two values per byte, low nibble first) or 8.
    group_size: consecutive elements along K sharing one scale (and zero point).
    group_dim:  1 only: groups run along the input dim K of an [N, K] weight, as in DeepSpeed.
    symmetric:  False: w ~ q * scale + zero, q in [0, 2^b - 1], zero a float;
                True:  w ~ (q - 2^(b-1)) * scale, no zero tensor.
                (How scale and zero are chosen is the quantizer's choice, not the format's: pack.py.)
    """

    bits: int = 4
    group_size: int = 64
    group_dim: int = 1
    symmetric: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ValueError(f"QuantSpec.bits must be 4 or 8, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"QuantSpec.group_size must be a positive int, got {self.group_size!r}")
        if self.bits == 4 and self.group_size % 2:
            raise ValueError(
                f"QuantSpec.group_size must be even for 4-bit (two values per byte), got {self.group_size}"
            )
        if self.group_dim != 1:
            raise ValueError(
                f"QuantSpec.group_dim must be 1 (groups along the input dim K of an [N, K] Linear weight), "
                f"got {self.group_dim!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec.symmetric must be a bool, got {self.symmetric!r}")

    @property
    def qmax(self) -> int:
        """Largest stored code: 15 for 4-bit, 255 for 8-bit."""
        return (1 << self.bits) - 1

    @property
    def per_byte(self) -> int:
        """Values packed in one uint8 byte."""
        return 8 // self.bits

    def padded_k(self, k: int) -> int:
        """K rounded up to a whole number of groups (the packed layout's K)."""
        return -(-k // self.group_size) * self.group_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        unknown = set(d) - {"bits", "group_size", "group_dim", "symmetric"}
        if unknown:
            raise ValueError(f"QuantSpec.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_deepspeed(cls, ds_config: dict[str, Any]) -> QuantSpec | None:
        """Read a DeepSpeed config's `weight_quantization.quantized_initialization`.

        Returns None when the config asks for no weight quantization.
        """
        wq = ds_config.get("weight_quantization")
        if not wq:
            return None
        if "post_init_quant" in wq:
            raise ValueError(
                "DeepSpeed weight_quantization.post_init_quant (per-module configs) is not supported; "
                "use quantized_initialization"
            )
        qi = wq.get("quantized_initialization")
        if qi is None:
            raise ValueError(f"DeepSpeed weight_quantization has no quantized_initialization block: keys {sorted(wq)}")
        unknown = set(qi) - _DS_KEYS
        if unknown:
            raise ValueError(f"DeepSpeed quantized_initialization: unknown keys {sorted(unknown)}")
        default = cls()
        return cls(
            bits=qi.get("num_bits", default.bits),
            group_size=qi.get("group_size", default.group_size),
            group_dim=qi.get("group_dim", default.group_dim),
            symmetric=qi.get("symmetric", default.symmetric),
        )
