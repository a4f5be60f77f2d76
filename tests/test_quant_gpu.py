"""Fused Triton dequantize-matmul kernels on CUDA vs dequantize-then-matmul (fp32 reference)."""

import functools

import pytest
import torch

from zinfer.quant.ops import quant_matmul
from zinfer.quant.pack import dequantize, quantize
from zinfer.quant.spec import QuantSpec

pytestmark = pytest.mark.gpu

MS = (1, 4, 16, 128, 512)
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (4096, 4000)]  # (N, K); 4000 % 64 != 0
SPECS = [QuantSpec(b, 64, 1, s) for b in (4, 8) for s in (False, True)]


@functools.cache
def _weight(n, k, spec, dtype):
    g = torch.Generator(device="cuda").manual_seed(n * 7 + k)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) * 0.02
    qw = quantize(w, spec)
    return qw, dequantize(qw, torch.float32)


def _check(x, qw, w_ref, tol=1e-2):
    torch.cuda.synchronize()
    out = quant_matmul(x, qw)
    assert out.dtype == x.dtype and out.shape == (*x.shape[:-1], qw.shape[0])
    ref = x.float() @ w_ref.t()
    rel = ((out.float() - ref).norm() / ref.norm()).item()  # NaN (an unwritten output) fails too
    assert rel < tol, f"relative error {rel:.2e} for x {list(x.shape)}, weight {qw.shape}, {qw.spec}"


def _id(spec):
    return f"int{spec.bits}-{'sym' if spec.symmetric else 'asym'}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("n, k", SHAPES, ids=lambda v: str(v))
def test_fused_matches_dequantize_then_matmul(n, k, spec, dtype):
    qw, w_ref = _weight(n, k, spec, dtype)
    for m in MS:
        _check(torch.randn(m, k, device="cuda", dtype=dtype), qw, w_ref)


@pytest.mark.parametrize(
    "spec", [QuantSpec(4, 128), QuantSpec(4, 32, symmetric=True), QuantSpec(8, 48), QuantSpec(4, 100)], ids=str
)
@pytest.mark.parametrize("m", [1, 3, 5, 16, 33, 200])
def test_odd_groups_and_shapes(spec, m):
    qw, w_ref = _weight(300, 1000, spec, torch.bfloat16)  # 1000 % 128 and % 48 != 0
    _check(torch.randn(m, 1000, device="cuda", dtype=torch.bfloat16), qw, w_ref)


def test_batched_and_strided_inputs():
    qw, w_ref = _weight(512, 320, QuantSpec(), torch.bfloat16)
    _check(torch.randn(2, 3, 320, device="cuda", dtype=torch.bfloat16), qw, w_ref)  # [B, S, K]
    x = torch.randn(40, 640, device="cuda", dtype=torch.bfloat16)[:, ::2]  # column stride 2
    _check(x, qw, w_ref)
    _check(torch.randn(7, 1000, device="cuda", dtype=torch.bfloat16)[:, :320], qw, w_ref)  # row stride 1000
    assert quant_matmul(torch.empty(0, 320, device="cuda", dtype=torch.bfloat16), qw).shape == (0, 512)


def test_outliers_and_constant_groups_stay_finite():
    w = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    w[0, :64] = 65504.0  # constant group at fp16's largest value
    w[1, 0], w[1, 1] = 65504.0, -65504.0
    w[2] = 0.0
    for spec in SPECS:
        qw = quantize(w, spec)
        x = torch.randn(8, 512, device="cuda", dtype=torch.float16) * 1e-3
        out = quant_matmul(x, qw)
        assert torch.isfinite(out).all(), spec
        _check(x, qw, dequantize(qw, torch.float32))


def test_quantize_on_gpu_matches_cpu():
    w = torch.randn(300, 1000, dtype=torch.bfloat16)
    for spec in SPECS:
        a, b = quantize(w, spec), quantize(w.cuda(), spec).to("cpu")
        assert torch.equal(dequantize(a), dequantize(b)), spec


def test_torch_fallback_on_gpu():
    qw, w_ref = _weight(512, 320, QuantSpec(), torch.bfloat16)
    x = torch.randn(5, 320, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(quant_matmul(x, qw, impl="torch"), quant_matmul(x, qw), rtol=2e-2, atol=2e-2)
    out = quant_matmul(x.float(), qw)  # fp32 x: torch path
    assert out.dtype == torch.float32
