"""Group-wise packed weights: quantize, dequantize, move, save and load.

Layout of one Linear weight w [N, K] under QuantSpec(bits, group_size=G); K is padded up to
Kp = ceil(K / G) * G (the pad repeats each row's last value, so it cannot widen a group's
range; x is zero there, so it never reaches an output), and the true K is kept in `shape`:

  qweight  uint8 [N, Kp * bits / 8]   4-bit: byte j holds k = 2j in the low nibble, 2j+1 in the high
  scale    [N, Kp / G]                 dtype of the weight (fp16 / bf16 / fp32)
  zero     [N, Kp / G] or None         asymmetric only: the group minimum, stored as a float

  asymmetric: w ~ q * scale + zero,             q in [0, 2^b - 1]
  symmetric:  w ~ (q - 2^(b-1)) * scale,        q - 2^(b-1) in [-2^(b-1), 2^(b-1) - 1]

The zero point is the float group minimum rather than an integer: the whole [min, max] range
then fits the grid exactly, so |w - w_hat| <= scale / 2 holds without clamping error. zero is
rounded down and scale up when stored in a narrow dtype, so that bound survives the rounding.
The same tensors are used in GPU memory, pinned host memory, on NVMe and over PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from zinfer.quant.spec import QuantSpec

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CHUNK_ELEMS = 1 << 22  # rows per chunk = this // Kp: ~16 MiB of fp32 temporaries per step


@dataclass(eq=False)
class QuantizedWeight:
    qweight: Tensor  # uint8 [N, Kp * bits / 8]
    scale: Tensor  # [N, Kp / G]
    zero: Tensor | None  # [N, Kp / G], None when symmetric
    shape: tuple[int, int]  # true (N, K) of the dense weight
    spec: QuantSpec
    # Dense copy kept only when quant_matmul(..., cache_dequantized=True) asked for it.
    _dense: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        n, k = self.shape = (int(self.shape[0]), int(self.shape[1]))
        kp, s = self.spec.padded_k(k), self.spec
        want_q, want_s = (n, kp // s.per_byte), (n, kp // s.group_size)
        if self.qweight.dtype != torch.uint8 or tuple(self.qweight.shape) != want_q:
            raise ValueError(
                f"qweight must be uint8 {list(want_q)} for shape {self.shape} and {s}, "
                f"got {self.qweight.dtype} {list(self.qweight.shape)}"
            )
        if self.scale.dtype not in _FLOAT_DTYPES or tuple(self.scale.shape) != want_s:
            raise ValueError(
                f"scale must be fp16/bf16/fp32 {list(want_s)}, got {self.scale.dtype} {list(self.scale.shape)}"
            )
        if s.symmetric != (self.zero is None):
            raise ValueError(f"zero must be {'None' if s.symmetric else 'a tensor'} for {s}")
        if self.zero is not None and (self.zero.dtype != self.scale.dtype or self.zero.shape != self.scale.shape):
            raise ValueError(
                f"zero must match scale ({self.scale.dtype} {list(self.scale.shape)}), "
                f"got {self.zero.dtype} {list(self.zero.shape)}"
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def padded_k(self) -> int:
        return self.spec.padded_k(self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the packed format (the dense cache, if any, is not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        t = {"qweight": self.qweight, "scale": self.scale}
        if self.zero is not None:
            t["zero"] = self.zero
        return t

    def _map(self, fn) -> QuantizedWeight:
        t = {k: fn(v) for k, v in self.tensors().items()}
        return QuantizedWeight(t["qweight"], t["scale"], t.get("zero"), self.shape, self.spec)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedWeight:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> QuantizedWeight:
        return self._map(lambda t: t.pin_memory())

    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """Flat tensors for safetensors: `{prefix}.qweight`, `.scale`, `.zero` (asymmetric), and
        `.shape` (int64 [2], the true [N, K]; K is not recoverable from the padded tensors)."""
        p = f"{prefix}." if prefix else ""
        d = {p + k: v for k, v in self.tensors().items()}
        d[p + "shape"] = torch.tensor(self.shape, dtype=torch.int64)
        return d

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], prefix: str, spec: QuantSpec) -> QuantizedWeight:
        """Inverse of state_dict(); `spec` is saved beside the checkpoint (QuantSpec.to_dict)."""
        p = f"{prefix}." if prefix else ""
        missing = [p + k for k in ("qweight", "scale", "shape") if p + k not in tensors]
        if not spec.symmetric and p + "zero" not in tensors:
            missing.append(p + "zero")
        if missing:
            raise KeyError(f"quantized weight {prefix!r}: missing tensors {missing}")
        if spec.symmetric and p + "zero" in tensors:
            raise ValueError(f"quantized weight {prefix!r} has a zero tensor but {spec} is symmetric")
        shape = tuple(int(v) for v in tensors[p + "shape"].tolist())
        zero = None if spec.symmetric else tensors[p + "zero"]
        return cls(tensors[p + "qweight"], tensors[p + "scale"], zero, shape, spec)


def _round_down(x: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 x -> dtype, never above x (round toward -inf)."""
    y = x.to(dtype)
    return torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, -float("inf"))), y)


def _round_up(x: Tensor, dtype: torch.dtype) -> Tensor:
    y = x.to(dtype)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _div(t: Tensor, d: int) -> Tensor:
    """t / d, correctly rounded on every device: CUDA turns division by a Python scalar into a
    multiply by its reciprocal, which made GPU-quantized weights differ from CPU-quantized ones."""
    return t / torch.full_like(t, d)


def _store_scale(s: Tensor, base, top_code: int, floor: float, fmax: float, dtype: torch.dtype) -> Tensor:
    """fp32 scale -> dtype, rounded up so the grid covers the group; rounded down instead where
    the top of the grid, base + top_code * scale, would pass dtype's largest finite value (fp16
    weights near 65504): the top code then lands a few ulps short, never on inf."""
    s = s.clamp_min(floor)
    up = _round_up(s, dtype)
    return torch.where(base + top_code * up.float() > fmax, _round_down(s, dtype), up)


def _quantize_rows(w: Tensor, spec: QuantSpec, kp: int, dtype: torch.dtype):
    """w: [R, K] fp32 -> (codes uint8 [R, Kp], scale [R, Kp/G], zero [R, Kp/G] | None)."""
    r, k = w.shape
    if kp > k:  # repeat the last value: the pad cannot change a group's min / max
        w = torch.cat([w, w[:, -1:].expand(r, kp - k)], dim=1)
    g = w.view(r, kp // spec.group_size, spec.group_size)  # [R, groups, G]
    finfo = torch.finfo(dtype)
    floor = finfo.tiny  # a constant group has range 0: keep scale > 0, so no 0/0
    if spec.symmetric:
        half = 1 << (spec.bits - 1)  # codes are q + half, q in [-half, half - 1]
        scale = _store_scale(_div(g.abs().amax(-1), half - 1), 0.0, half - 1, floor, finfo.max, dtype)
        q = (g / scale.float()[..., None]).round_().clamp_(-half, half - 1).add_(half)
        zero = None
    else:
        zero = _round_down(g.amin(-1), dtype)
        rng = g.amax(-1) - zero.float()
        scale = _store_scale(_div(rng, spec.qmax), zero.float(), spec.qmax, floor, finfo.max, dtype)
        q = ((g - zero.float()[..., None]) / scale.float()[..., None]).round_().clamp_(0, spec.qmax)
    return q.view(r, kp).to(torch.uint8), scale, zero


def _pack(codes: Tensor, bits: int) -> Tensor:
    """codes uint8 [R, Kp] (values < 2^bits) -> uint8 [R, Kp * bits / 8], low nibble first."""
    if bits == 8:
        return codes
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack(qweight: Tensor, bits: int) -> Tensor:
    """uint8 [R, Kp * bits / 8] -> codes uint8 [R, Kp]."""
    if bits == 8:
        return qweight
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).view(qweight.shape[0], -1)


def quantize(w: Tensor, spec: QuantSpec, chunk_rows: int | None = None) -> QuantizedWeight:
    """Quantize a Linear weight w [N, K] on its own device, `chunk_rows` rows at a time."""
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D [N, K] weight, got shape {list(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize expects an fp16/bf16/fp32 weight, got {w.dtype}")
    n, k = w.shape
    kp = spec.padded_k(k)
    rows = chunk_rows or max(1, _CHUNK_ELEMS // kp)
    qweight = torch.empty(n, kp // spec.per_byte, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, kp // spec.group_size, dtype=w.dtype, device=w.device)
    zero = None if spec.symmetric else torch.empty_like(scale)
    for r0 in range(0, n, rows):
        codes, s, z = _quantize_rows(w[r0 : r0 + rows].float(), spec, kp, w.dtype)
        qweight[r0 : r0 + rows] = _pack(codes, spec.bits)
        scale[r0 : r0 + rows] = s
        if zero is not None:
            zero[r0 : r0 + rows] = z
    # inf / nan weights (or a range beyond fp32) would poison every output that reads them.
    bad = ~torch.isfinite(scale).all()
    if zero is not None:
        bad |= ~torch.isfinite(zero).all()
    if bool(bad):
        raise ValueError(f"quantize: weight {list(w.shape)} holds inf/nan or a range beyond {w.dtype}")
    return QuantizedWeight(qweight, scale, zero, (n, k), spec)


def dequantize_rows(qw: QuantizedWeight, r0: int, r1: int, dtype: torch.dtype | None = None) -> Tensor:
    """Rows [r0, r1) of the dense weight: [r1 - r0, K] in `dtype` (default: the scale's dtype).
    Computed in fp32 so that q * scale cannot overflow fp16 before zero is added."""
    s = qw.spec
    codes = unpack(qw.qweight[r0:r1], s.bits).float()
    r = codes.shape[0]
    g = codes.view(r, -1, s.group_size)  # [R, groups, G]
    scale = qw.scale[r0:r1].float()[..., None]
    if s.symmetric:
        w = (g - (1 << (s.bits - 1))) * scale
    else:
        w = torch.addcmul(qw.zero[r0:r1].float()[..., None], g, scale)
    return w.view(r, -1)[:, : qw.shape[1]].to(dtype or qw.dtype)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> Tensor:
    """The dense weight [N, K] in `dtype` (default: the scale's dtype), in row chunks."""
    n, _ = qw.shape
    rows = max(1, _CHUNK_ELEMS // qw.padded_k)
    if rows >= n:
        return dequantize_rows(qw, 0, n, dtype)
    out = torch.empty(qw.shape, dtype=dtype or qw.dtype, device=qw.device)
    for r0 in range(0, n, rows):
        out[r0 : r0 + rows] = dequantize_rows(qw, r0, r0 + rows, dtype)
    return out
