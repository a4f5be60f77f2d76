"""Group-wise packed weights: quantize, dequantize, move, save and load.

Layout of one Linear weight w [N, K] under QuantSpec(bits, group_size=G); K is padded up to
Kp = ceil(K / G) * G (the pad repeats each row's last value, so it cannot widen a group's
range; x is zero there, so it never reaches an output), and the true K is kept in `shape`:

  qweight  uint8 [N, Kp * bits / 8]   4-bit: byte j holds k = 2j in the low nibble, 2j+1 in the high
  scale    [N, Kp / G]                 dtype of the weight (fp16 / bf16 / fp32)
  zero     [N, Kp / G] or None         asymmetric only: a float, the group minimum under "rtn"

  asymmetric: w ~ q * scale + zero,             q in [0, 2^b - 1]
  symmetric:  w ~ (q - 2^(b-1)) * scale,        q - 2^(b-1) in [-2^(b-1), 2^(b-1) - 1]

The zero point is a float rather than an integer. How scale and zero are chosen is the quantizer's
business, not the format's (`quantize(method=...)`): every method stores the same tensors, gives each
weight the code of its nearest grid point, and keeps each group's [min, max] inside its grid (padded by
half a step), so |w - w_hat| <= scale / 2 holds for every weight without clamping error:

  "rtn"    round to nearest on the min/max grid: zero = group minimum, scale = range / qmax. zero is
           rounded down and scale up when stored in a narrow dtype, so that the bound survives.
  "refit"  (default) starts from "rtn" and refits each group's grid by alternating least squares
           (`_refit`): lower squared error, never higher than "rtn"'s, same bound.

One method gives up the bound for the layer's output instead of its weights, and needs to know the inputs:
  "weighted"  `channel_weights` h [K] (E[x_k^2] of the layer's input over calibration text, see
           zinfer.calibrate) weigh each column's error: each group's grid minimises sum_k h_k (w_k - w_hat_k)^2,
           the expected squared output error of the group's columns for uncorrelated inputs, searched from
           the "refit" grid (so never worse than it on that error) and several clipped [min, max] starts
           (`_weighted_fit`). Clipping rarely-driven extremes pays there; it does not when every column counts
           the same (see `_refit`).

The same tensors are used in GPU memory, pinned host memory, on NVMe and over PCIe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from zinfer.quant.spec import QuantSpec

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CHUNK_ELEMS = 1 << 22  # rows per chunk = this // Kp: 16 MiB per fp32 temporary ("refit" peaks near 10 of them)
# quantize on CUDA: 4x larger chunks (~0.6 GiB peak, inside plan.ACTIVATION_RESERVE), because "refit" runs
# ~1,000 small kernels per chunk whatever its size, and launches, not bytes, would dominate at 16 MiB.
_CUDA_QUANTIZE_CHUNK_ELEMS = 1 << 24
METHODS = ("refit", "rtn")  # weights only: |w - w_hat| <= scale / 2 for every weight
WEIGHTED = "weighted"  # needs channel_weights; clips
# "weighted": a group's grid starts from [min + a * range, max - b * range] for every (a, b) in CLIP_STARTS^2
CLIP_STARTS = (0.0, 0.05, 0.1, 0.15)
REFIT_STEPS = 10  # most groups stop improving within 10 steps (see _refit)


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


def _quantize_rows(w: Tensor, spec: QuantSpec, kp: int, dtype: torch.dtype, method: str, h: Tensor | None = None):
    """w: [R, K] fp32 -> (codes uint8 [R, Kp], scale [R, Kp/G], zero [R, Kp/G] | None); h: [Kp] column weights
    ("weighted": 0 on pad columns)."""
    r, k = w.shape
    if kp > k:  # repeat the last value: the pad cannot change a group's min / max
        w = torch.cat([w, w[:, -1:].expand(r, kp - k)], dim=1)
    g = w.view(r, kp // spec.group_size, spec.group_size)  # [R, groups, G]
    finfo = torch.finfo(dtype)
    floor = finfo.tiny  # a constant group has range 0: keep scale > 0, so no 0/0
    if spec.symmetric:
        half = 1 << (spec.bits - 1)  # codes are q + half, q in [-half, half - 1]
        scale = _store_scale(_div(g.abs().amax(-1), half - 1), 0.0, half - 1, floor, finfo.max, dtype)
        zero = None
    else:
        zero = _round_down(g.amin(-1), dtype)
        rng = g.amax(-1) - zero.float()
        scale = _store_scale(_div(rng, spec.qmax), zero.float(), spec.qmax, floor, finfo.max, dtype)
    if method != "rtn":
        # pad columns are copies, not weights: they must not count in a group's fit or error
        valid = None if kp == k else (torch.arange(kp, device=w.device) < k).to(g.dtype).view(-1, spec.group_size)
        scale, zero = _refit(g, scale, zero, spec, valid)
    if method == WEIGHTED:  # from the refit grid too: never worse than it on the weighted error
        scale, zero = _weighted_fit(g, h.view(-1, spec.group_size), spec, dtype, (scale, zero))
    codes = _codes(g, scale.float(), None if zero is None else zero.float(), spec)
    return codes.view(r, kp).to(torch.uint8), scale, zero


def _codes(g: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec) -> Tensor:
    """The stored code of each weight's nearest grid point: g [..., G], scale / zero [...] fp32."""
    if zero is None:
        half = 1 << (spec.bits - 1)
        return (g / scale[..., None]).round_().clamp_(-half, half - 1).add_(half)
    return ((g - zero[..., None]) / scale[..., None]).round_().clamp_(0, spec.qmax)


def _group_sum(t: Tensor) -> Tensor:
    """[..., G] -> [...] by pairwise elementwise adds in a fixed order: the same bits on every device
    (torch.sum's order differs between CPU and CUDA, and GPU-quantized weights must equal CPU ones)."""
    while t.shape[-1] > 1:
        h = t.shape[-1] // 2
        head = t[..., :h] + t[..., h : 2 * h]
        t = torch.cat([head, t[..., 2 * h :]], -1) if t.shape[-1] % 2 else head
    return t[..., 0]


def _refit(g: Tensor, scale: Tensor, zero: Tensor | None, spec: QuantSpec,
           valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Lower each group's squared error sum((w - w_hat)^2) by alternating least squares, starting from
    the min/max grid (scale, zero) in the storage dtype. Data-free: it sees only this weight.

    Each step, per group: given the codes q, the (scale, zero) minimising the error solve the 2x2 normal
    equations of w ~ scale * q + zero (symmetric: scale = sum(c w) / sum(c^2), c = q - 2^(b-1));
    given the grid, the best codes are the nearest grid points (_codes). Neither half can raise the
    error: this is Lloyd's algorithm with the levels tied to a uniform grid, i.e. the least-squares
    scale / zero refit of HQQ-style and "optimal zero-point" quantizers, with p = 2.

    A group takes the new grid only where (a) its error, computed with the values rounded to the storage
    dtype, is strictly lower, (b) the grid is finite in that dtype, and (c) the grid still covers the
    group's [min - scale / 2, max + scale / 2]. (a) and (b): no group ends worse than round-to-nearest,
    a grid that is already exact (a constant group, weights already on a 4-bit grid) is kept, and no
    scale is 0, inf or NaN. (c) keeps |w - w_hat| <= scale / 2 for every weight: without it the fit
    clips a group's extremes (the largest weights) to lower the others' error; on SmolLM2 int4 that
    lowered the weight error a little more but, at group 128, raised perplexity above round-to-nearest's
    (declaration.txt: 43.7 vs 39.4; with (c): 39.5), as did clip search (shrinking [min, max]).

    A group that did not improve is at a fixed point and leaves the working set; on SmolLM2's weights
    about 45% of the groups still improve after the first step and 1% after the sixth.

    g: [R, groups, G] fp32; valid: [groups, G] 1/0 (0: a pad column) or None. Returns the new scale and
    zero in the storage dtype.
    """
    dtype, fmax = scale.dtype, torch.finfo(scale.dtype).max
    r, groups, size = g.shape
    half = 1 << (spec.bits - 1)
    sym = zero is None
    out_s = scale.to(torch.float32, copy=True).view(-1)  # [R * groups]: the grid each group ends with
    out_z = None if sym else zero.to(torch.float32, copy=True).view(-1)
    # The working set: flat indices of the groups still improving, and their rows [A, G].
    idx = torch.arange(r * groups, device=g.device)
    w = g.reshape(-1, size)
    lo, hi = w.amin(-1), w.amax(-1)  # (pad columns repeat a real value: no effect)
    mask = None if valid is None else valid.repeat(r, 1)
    # weights per group, a tensor: CUDA turns division by a Python scalar into a multiply (see _div)
    n = torch.full_like(lo, size) if mask is None else _group_sum(mask)
    s, z = out_s.clone(), None if sym else out_z.clone()
    # Fit w - base, base = the min/max zero (fixed): the values stay near [0, range], so the normal
    # equations do not cancel away the group's offset.
    base = z
    x = w if sym else w - base[:, None]
    sum_x = None if sym else _masked_sum(x, mask)
    q = _codes(w, s, z, spec)
    err = _masked_sum(_sq_err(w, q, s, z, half), mask)
    # Sums of codes are integers: exact in fp32, so in any order, while below 2^24 (fewer ops than _group_sum).
    exact = size * spec.qmax**2 < 1 << 24
    for _ in range(REFIT_STEPS):
        if sym:
            c = q - half
            den = _code_sum(c * c, mask, exact)
            s_new = _masked_sum(c * x, mask) / torch.where(den > 0, den, 1.0)
        else:
            sum_q, sum_qq = _code_sum(q, mask, exact), _code_sum(q * q, mask, exact)
            sum_qx = _masked_sum(q * x, mask)
            den = n * sum_qq - sum_q * sum_q
            s_new = (n * sum_qx - sum_q * sum_x) / torch.where(den > 0, den, 1.0)
        s_new = s_new.to(dtype).float()  # the values as they will be stored
        z_new = None if sym else (base + (sum_x - s_new * sum_q) / n).to(dtype).float()
        bottom = -half * s_new if sym else z_new
        top = bottom + spec.qmax * s_new
        fits = (den > 0) & (s_new > 0) & (bottom >= -fmax) & (top <= fmax)  # (NaN compares False)
        fits &= (bottom <= lo + s_new / 2) & (top >= hi - s_new / 2)
        s_new = torch.where(fits, s_new, s)  # a grid that does not fit: keep the old one (it cannot win)
        if not sym:
            z_new = torch.where(fits, z_new, z)
        q_new = _codes(w, s_new, z_new, spec)
        err_new = _masked_sum(_sq_err(w, q_new, s_new, z_new, half), mask)
        better = fits & (err_new < err)
        kept = int(better.sum())
        if kept == 0:
            break
        if kept < idx.numel():  # (the first step usually improves every group: no copy then)
            keep = better.nonzero().squeeze(1)
            idx, w, x, q_new, err_new, s_new = idx[keep], w[keep], x[keep], q_new[keep], err_new[keep], s_new[keep]
            lo, hi, n = lo[keep], hi[keep], n[keep]
            if not sym:
                z_new, base, sum_x = z_new[keep], base[keep], sum_x[keep]
            if mask is not None:
                mask = mask[keep]
        out_s[idx] = s = s_new
        q, err = q_new, err_new
        if not sym:
            out_z[idx] = z = z_new
    return out_s.view(r, groups).to(dtype), None if sym else out_z.view(r, groups).to(dtype)


def _weighted_fit(g: Tensor, h: Tensor, spec: QuantSpec, dtype: torch.dtype,
                  seed: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
    """Each group's grid minimising sum_k h_k (w_k - w_hat_k)^2: from `seed` (the stored refit grid) and every
    clipped start (CLIP_STARTS), alternate nearest codes and the weighted least-squares grid (REFIT_STEPS times),
    keep the best grid seen (the seed is seen first: never worse than it).

    g: [R, groups, G] fp32; h: [groups, G] >= 0. Returns scale and zero in `dtype`, finite, scale > 0 (codes are
    then taken against the stored values). Weights outside the grid are clamped to its ends: no scale / 2 bound.
    """
    half, sym = 1 << (spec.bits - 1), spec.symmetric
    hw = h.expand_as(g)
    lo, hi = g.amin(-1), g.amax(-1)
    span = hi - lo
    peak = torch.maximum(lo.abs(), hi.abs())
    tiny, fmax = torch.finfo(dtype).tiny, torch.finfo(dtype).max
    sum_h, sw = hw.sum(-1), (hw * g).sum(-1)
    best = None  # (error, scale, zero) per group

    def stored(s, z):  # the values as they will be stored: finite, scale > 0
        s = s.clamp(tiny, fmax / (2 * spec.qmax)).to(dtype).float()
        return s, None if sym else z.clamp(-fmax / 2, fmax / 2).to(dtype).float()

    def starts():
        yield seed[0].float(), None if sym else seed[1].float()
        for a in CLIP_STARTS:
            for b in CLIP_STARTS if not sym else (0.0,):
                if sym:  # one clip: the grid is symmetric about 0
                    yield stored(peak * (1 - a) / (half - 1), None)
                else:
                    yield stored((span * (1 - a - b)) / spec.qmax, lo + a * span)

    for s, z in starts():
        for _ in range(REFIT_STEPS):
            q = _codes(g, s, z, spec)
            d = (q - half) * s[..., None] if sym else q * s[..., None] + z[..., None]
            err = (hw * (d - g).square()).sum(-1)
            if best is None:
                best = (err, s, z)
            else:
                win = err < best[0]
                best = (torch.where(win, err, best[0]), torch.where(win, s, best[1]),
                        None if sym else torch.where(win, z, best[2]))
            if sym:  # scale = sum(h c w) / sum(h c^2), c = q - half
                c = q - half
                den = (hw * c * c).sum(-1)
                s_new = (hw * c * g).sum(-1) / torch.where(den > 0, den, 1.0)
                ok = (den > 0) & (s_new > 0)
                s, z = stored(torch.where(ok, s_new, s), None)
            else:  # the 2x2 normal equations of w ~ scale * q + zero, weighted by h
                sq, sqq, sqw = (hw * q).sum(-1), (hw * q * q).sum(-1), (hw * q * g).sum(-1)
                den = sum_h * sqq - sq * sq
                safe = torch.where(den > 0, den, 1.0)
                s_new, z_new = (sum_h * sqw - sq * sw) / safe, (sqq * sw - sq * sqw) / safe
                ok = (den > 0) & (s_new > 0)
                s, z = stored(torch.where(ok, s_new, s), torch.where(ok, z_new, z))
    _, s, z = best
    return s.to(dtype), None if sym else z.to(dtype)


def _sq_err(w: Tensor, q: Tensor, s: Tensor, z: Tensor | None, half: int) -> Tensor:
    """(w_hat - w)^2 elementwise, w_hat from codes q [A, G] and grid s, z [A] (z None: symmetric)."""
    d = (q - half).mul_(s[:, None]) if z is None else (q * s[:, None]).add_(z[:, None])
    return d.sub_(w).square_()


def _masked_sum(t: Tensor, mask: Tensor | None) -> Tensor:
    return _group_sum(t if mask is None else t * mask)


def _code_sum(t: Tensor, mask: Tensor | None, exact: bool) -> Tensor:
    return (t if mask is None else t * mask).sum(-1) if exact else _masked_sum(t, mask)


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


def quantize(w: Tensor, spec: QuantSpec, chunk_rows: int | None = None, method: str = "refit",
             channel_weights: Tensor | None = None) -> QuantizedWeight:
    """Quantize a Linear weight w [N, K] on its own device, `chunk_rows` rows at a time.

    method: "refit" (min/max grid, then a least-squares refit per group: lower error) or "rtn" (the min/max
    grid alone: ~5x faster, higher error): same format and error bound either way; "weighted" with
    `channel_weights` [K] (>= 0: how strongly each input column is driven): the grid that minimises the weighted
    error, clipping allowed (see the module docstring).
    """
    if method not in (*METHODS, WEIGHTED):
        raise ValueError(f"quantize: method must be one of {(*METHODS, WEIGHTED)}, got {method!r}")
    if (method == WEIGHTED) != (channel_weights is not None):
        raise ValueError("quantize: method='weighted' takes channel_weights (one per input column), and only it")
    if w.dim() != 2:
        raise ValueError(f"quantize expects a 2-D [N, K] weight, got shape {list(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize expects an fp16/bf16/fp32 weight, got {w.dtype}")
    n, k = w.shape
    kp = spec.padded_k(k)
    rows = chunk_rows or max(1, (_CUDA_QUANTIZE_CHUNK_ELEMS if w.is_cuda else _CHUNK_ELEMS) // kp)
    qweight = torch.empty(n, kp // spec.per_byte, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, kp // spec.group_size, dtype=w.dtype, device=w.device)
    zero = None if spec.symmetric else torch.empty_like(scale)
    h = None
    if channel_weights is not None:
        if channel_weights.shape != (k,) or not bool(((channel_weights >= 0) & channel_weights.isfinite()).all()):
            raise ValueError(f"quantize: channel_weights must be [{k}], finite and >= 0, got shape "
                             f"{list(channel_weights.shape)}")
        h = torch.zeros(kp, device=w.device)  # pad columns weigh nothing
        h[:k] = channel_weights.float()
    for r0 in range(0, n, rows):
        codes, s, z = _quantize_rows(w[r0 : r0 + rows].float(), spec, kp, w.dtype, method, h)
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
