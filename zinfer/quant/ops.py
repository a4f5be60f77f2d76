"""quant_matmul: y = x @ dequantize(qw).T without materializing the dense weight (when it can).

Dispatch:
  CUDA x (fp16/bf16) and Triton importable -> Triton (triton_kernels.py), by M = rows of x:
      M <= TUNED_MAX_M: the fastest of the fused GEMVs (CUDA-core and tensor-core) and the small GEMM, timed once
                        per shape (decode);
      M < DEQUANT_MIN_M: fused tensor-core GEMM;
      larger M (compute-bound prefill): Triton dequantize kernel into a scratch weight + cuBLAS.
  otherwise -> torch fallback: dequantize a block of rows, matmul, next block; peak extra
      memory is one block, never the whole dense weight (unless cache_dequantized=True).

Not used, noted for later: torch.ops.aten._weight_int8pack_mm takes per-channel scales only
(no groups), and _weight_int4pack_mm(_for_cpu) needs a repacked tiled weight whose
scales_and_zeros encode w = (q - 8) * scale + zero' (our float zero maps onto it with
zero' = zero + 8 * scale); a CPU fast path could repack once and cache it.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from zinfer.quant.pack import QuantizedWeight, dequantize, dequantize_rows

_FALLBACK_BLOCK_ELEMS = 1 << 22  # weight elements dequantized per fallback step (16 MiB fp32)


# Triton is imported lazily (CPU machines without it must still import zinfer.quant); whether it is there
# is looked up once, at import: inside a compiled decode step the lookup would be a graph break per layer.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return TRITON_AVAILABLE


def quant_matmul(x: Tensor, qw: QuantizedWeight, *, impl: str = "auto", cache_dequantized: bool = False) -> Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype, W = dequantize(qw) of shape [N, K].

    impl: "auto" (Triton on CUDA when possible), "triton" (raise if it cannot run), "torch".
    cache_dequantized: torch path only; keep the dense weight on qw for later calls (memory!).
    """
    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"quant_matmul: x has K={x.shape[-1]}, weight is [N={n}, K={k}]")
    if x.device != qw.device:
        raise ValueError(f"quant_matmul: x on {x.device}, weight on {qw.device}")
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"quant_matmul: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    fused_ok = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available()
    if impl == "triton" and not fused_ok:
        raise ValueError(
            f"quant_matmul(impl='triton') needs a CUDA fp16/bf16 x and Triton installed: "
            f"x is {x.dtype} on {x.device}, triton {'found' if triton_available() else 'missing'}"
        )
    if impl != "torch" and fused_ok and not cache_dequantized:
        s = qw.spec
        return _fused_matmul(x, qw.qweight, qw.scale, qw.zero, n, k, s.bits, s.group_size, s.group_dim, s.symmetric)
    return _matmul_torch(x, qw, cache_dequantized)


# One opaque operator for torch.compile: dynamo does not trace the Triton launch code (grid and config
# arithmetic, split-K partials), so a quantized layer costs no graph break and the element-wise work
# around it still fuses. The operator allocates its output, which CUDA graph capture handles.
@torch.library.custom_op("zinfer::fused_quant_matmul", mutates_args=())
def _fused_matmul(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor | None, n: int, k: int, bits: int,
                  group_size: int, group_dim: int, symmetric: bool) -> Tensor:
    from zinfer.quant import triton_kernels
    from zinfer.quant.spec import QuantSpec

    spec = QuantSpec(bits=bits, group_size=group_size, group_dim=group_dim, symmetric=symmetric)
    return triton_kernels.fused_matmul(x, QuantizedWeight(qweight, scale, zero, (n, k), spec))


@_fused_matmul.register_fake
def _(x, qweight, scale, zero, n, k, bits, group_size, group_dim, symmetric):
    return x.new_empty(*x.shape[:-1], n)


def _matmul_torch(x: Tensor, qw: QuantizedWeight, cache: bool) -> Tensor:
    n, k = qw.shape
    if cache:
        if qw._dense is None or qw._dense.dtype != x.dtype:
            qw._dense = dequantize(qw, x.dtype)
        return torch.matmul(x, qw._dense.t())
    x2 = x.reshape(-1, k)  # [M, K]
    rows = max(1, _FALLBACK_BLOCK_ELEMS // qw.padded_k)
    if rows >= n:
        out = x2 @ dequantize_rows(qw, 0, n, x.dtype).t()
    else:
        out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
        for r0 in range(0, n, rows):
            out[:, r0 : r0 + rows] = x2 @ dequantize_rows(qw, r0, r0 + rows, x.dtype).t()
    return out.view(*x.shape[:-1], n)
