"""Group-wise quantization on CPU: spec, pack/unpack, both quantizers' error bounds, serialization, quant_matmul.
The Triton kernels run here too, under Triton's interpreter, when Triton is importable."""

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import run_interpreted
from zinfer.quant import ops
from zinfer.quant.ops import quant_matmul
from zinfer.quant.pack import METHODS, QuantizedWeight, _group_sum, _pack, dequantize, quantize, unpack
from zinfer.quant.spec import QuantSpec

SPECS = [QuantSpec(b, g, 1, s) for b in (4, 8) for g in (64, 32) for s in (False, True)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _id(spec):
    return f"int{spec.bits}-g{spec.group_size}-{'sym' if spec.symmetric else 'asym'}"


def _groups(t, spec, k):
    """[N, K] -> [N, Kp / G, G] with the pad columns as NaN (so they never count)."""
    kp = spec.padded_k(k)
    t = torch.nn.functional.pad(t.float(), (0, kp - k), value=float("nan"))
    return t.view(t.shape[0], -1, spec.group_size)


# ---- spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(bits=3), "bits must be 4 or 8, got 3"),
        (dict(bits=4, group_size=63), "must be even for 4-bit"),
        (dict(group_size=0), "group_size must be a positive int, got 0"),
        (dict(group_dim=0), "group_dim must be 1"),
        (dict(symmetric="no"), "symmetric must be a bool"),
    ],
)
def test_spec_rejects(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        QuantSpec(**kwargs)


def test_spec_dict_and_deepspeed():
    spec = QuantSpec(8, 128, 1, True)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        QuantSpec.from_dict({**spec.to_dict(), "bogus": 1})
    ds = {"weight_quantization": {"quantized_initialization": {
        "num_bits": 4, "group_size": 64, "group_dim": 1, "symmetric": False}}}  # fmt: skip
    assert QuantSpec.from_deepspeed(ds) == QuantSpec(4, 64, 1, False)
    assert QuantSpec.from_deepspeed({"zero_optimization": {"stage": 3}}) is None
    with pytest.raises(ValueError, match="post_init_quant"):
        QuantSpec.from_deepspeed({"weight_quantization": {"post_init_quant": {}}})
    with pytest.raises(ValueError, match=r"unknown keys \['num_groups'\]"):
        QuantSpec.from_deepspeed({"weight_quantization": {"quantized_initialization": {"num_groups": 2}}})
    with pytest.raises(ValueError, match="group_dim must be 1"):
        QuantSpec.from_deepspeed({"weight_quantization": {"quantized_initialization": {"group_dim": 0}}})


# ---- pack / quantize --------------------------------------------------------------------------


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = _pack(codes, 4)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack(packed, 4), codes)
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack(_pack(codes, 4), 4), codes)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid_values_round_trip_exactly(spec, dtype, method):
    """Weights already on a group's grid (power-of-two scales) come back bit-exact."""
    n, k, g = 6, 4 * spec.group_size, spec.group_size
    scale = 2.0 ** torch.randint(-6, 0, (n, k // g, 1)).float()
    if spec.symmetric:
        top = (1 << (spec.bits - 1)) - 1
        q = torch.randint(-top, top + 1, (n, k // g, g)).float()
        q[..., 0] = top  # pin the absmax so the recomputed scale is the same
        w = q * scale
    else:
        q = torch.randint(0, spec.qmax + 1, (n, k // g, g)).float()
        q[..., 0], q[..., 1] = 0, spec.qmax  # pin min and max
        w = q * scale + torch.randint(-8, 1, (n, k // g, 1)) * scale  # |q + zero| <= 255: exact in bf16
    w = w.view(n, k).to(dtype)
    assert torch.equal(dequantize(quantize(w, spec, method=method)), w)  # "refit" cannot beat an exact grid


def _outlier_weight(k, dtype):
    w = torch.randn(33, k) * 0.05
    w[3, 5] = 40.0  # outliers
    w[7, -1] = -1e4
    w[10] = 0.0  # an all-zero row
    w[11] = 0.3  # a constant row
    return w.to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [128, 200, 37])
def test_error_within_half_step(spec, dtype, k, method):
    """Both methods keep every group's [min, max] inside its grid: no weight is clipped, each error is at
    most half a step (plus fp32 rounding), outliers included."""
    w = _outlier_weight(k, dtype)
    qw = quantize(w, spec, method=method)
    assert qw.qweight.shape == (33, spec.padded_k(k) // spec.per_byte) and qw.shape == (33, k)
    assert qw.scale.dtype == dtype and (qw.zero is None) == spec.symmetric
    w_hat = dequantize(qw, torch.float32)
    assert torch.isfinite(w_hat).all() and w_hat.shape == (33, k)
    err = _groups(w_hat - w.float(), spec, k).abs()
    s = qw.scale.float()[..., None]
    size = _groups(w, spec, k).abs() + s * spec.qmax
    bound = s / 2 + 4 * torch.finfo(torch.float32).eps * size
    real = ~err.isnan()  # pad columns
    assert (err[real] <= bound[real]).all(), (err - bound)[real].max()
    assert torch.equal(w_hat[10], torch.zeros(k))  # zero stays exactly zero
    if not spec.symmetric:
        assert torch.equal(w_hat[11], w[11].float())  # a constant row is exact


@pytest.mark.parametrize("spec", [s for s in SPECS if s.bits == 4], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [200, 37])
def test_refit_never_worse_than_rtn(spec, dtype, k):
    """Per group, "refit"'s squared error (over the real columns, not the pad) is at most "rtn"'s."""
    w = _outlier_weight(k, dtype)
    errs = {}
    for method in METHODS:
        w_hat = dequantize(quantize(w, spec, method=method), torch.float32)
        errs[method] = _groups(w_hat - w.float(), spec, k).nan_to_num().pow(2).sum(-1)  # [N, groups]
    assert (errs["refit"] <= errs["rtn"] * (1 + 1e-5)).all()
    assert (errs["refit"] < errs["rtn"]).float().mean() > 0.5  # and lower for most groups


@pytest.mark.parametrize("spec", SPECS + [QuantSpec(8, 37), QuantSpec(4, 48, symmetric=True)], ids=_id)
def test_refit_lowers_gaussian_error(spec):
    w = torch.randn(64, 37 * 16, generator=torch.Generator().manual_seed(0))
    rtn, refit = (dequantize(quantize(w, spec, method=m), torch.float32) - w for m in ("rtn", "refit"))
    assert refit.pow(2).sum() < (0.93 if spec.bits == 4 and not spec.symmetric else 0.97) * rtn.pow(2).sum()


def test_group_sum_fixed_order():
    t = torch.randn(3, 5, 100)
    for g in (1, 2, 37, 48, 64, 100):
        torch.testing.assert_close(_group_sum(t[..., :g]), t[..., :g].sum(-1), rtol=1e-5, atol=1e-5)
    # the order is pairwise, fixed: ((a + b) + (c + d)) + e
    a, b, c, d, e = 1.0, 2.0**-24, 2.0**-24, 2.0**-24, 2.0**-24
    assert _group_sum(torch.tensor([a, b, c, d, e])).item() == (a + b) + (c + d) + e


@pytest.mark.parametrize("method", METHODS)
def test_fp16_extremes_stay_finite(method):
    spec = QuantSpec(4, 64)
    w = torch.zeros(2, 64, dtype=torch.float16)
    w[0, 0], w[0, 1] = 65504.0, -65504.0  # scale ~ 8734, q * scale overflows fp16
    w[1] = 1e-7  # subnormal constant group
    qw = quantize(w, spec, method=method)
    w_hat = dequantize(qw)
    assert torch.isfinite(w_hat).all() and torch.isfinite(qw.scale).all() and torch.isfinite(qw.zero).all()
    s = qw.scale[0, 0].float()
    assert (w_hat[0, 1] + 65504.0).abs() <= 0.5 * s and (w_hat[0, 0] - 65504.0).abs() <= 0.6 * s
    assert torch.equal(w_hat[1], w[1])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_quantize_refuses_non_finite(bad):
    w = torch.randn(4, 64)
    w[1, 3] = bad
    with pytest.raises(ValueError, match=r"weight \[4, 64\] holds inf/nan"):
        quantize(w, QuantSpec())


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"method must be one of \('refit', 'rtn', 'weighted'\), got 'gptq'"):
        quantize(torch.randn(4, 64), QuantSpec(), method="gptq")
    with pytest.raises(ValueError, match=r"2-D \[N, K\] weight, got shape \[64\]"):
        quantize(torch.randn(64), QuantSpec())
    with pytest.raises(ValueError, match="fp16/bf16/fp32 weight, got torch.int32"):
        quantize(torch.ones(2, 64, dtype=torch.int32), QuantSpec())
    qw = quantize(torch.randn(4, 64), QuantSpec())
    with pytest.raises(ValueError, match=r"qweight must be uint8 \[4, 32\]"):
        QuantizedWeight(qw.qweight[:, :16], qw.scale, qw.zero, qw.shape, qw.spec)
    with pytest.raises(ValueError, match="zero must be None"):
        QuantizedWeight(qw.qweight, qw.scale, qw.zero, qw.shape, QuantSpec(symmetric=True))


@pytest.mark.parametrize("method", METHODS)
def test_chunked_quantize_matches_whole(method):
    w = torch.randn(37, 200, dtype=torch.bfloat16)
    a, b = quantize(w, QuantSpec(), method=method), quantize(w, QuantSpec(), chunk_rows=5, method=method)
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(8, 32, symmetric=True)], ids=_id)
def test_state_dict_round_trip(spec, tmp_path):
    from safetensors.torch import load_file, save_file

    qw = quantize(torch.randn(16, 100, dtype=torch.bfloat16), spec)
    sd = qw.state_dict("model.layers.0.mlp.down_proj")
    assert ("model.layers.0.mlp.down_proj.zero" in sd) != spec.symmetric
    save_file(sd, tmp_path / "q.safetensors")
    back = QuantizedWeight.from_state_dict(load_file(tmp_path / "q.safetensors"), "model.layers.0.mlp.down_proj", spec)
    assert back.shape == (16, 100) and back.spec == spec
    assert torch.equal(dequantize(back), dequantize(qw))
    # nbytes: packed codes + scale (+ zero), all at the padded K = 128
    assert qw.nbytes == 16 * 128 * spec.bits // 8 + (1 if spec.symmetric else 2) * 16 * (128 // spec.group_size) * 2
    moved = qw.to("cpu", non_blocking=True)
    assert torch.equal(moved.qweight, qw.qweight) and moved.shape == qw.shape
    with pytest.raises(KeyError, match=r"missing tensors \['w.shape'\]"):
        QuantizedWeight.from_state_dict({k: v for k, v in qw.state_dict("w").items() if k != "w.shape"}, "w", spec)


# ---- quant_matmul (torch fallback) ------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS[::2], ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_shape, n, k", [((3,), 40, 200), ((2, 5), 24, 64), ((1, 1, 7), 9, 37)])
def test_quant_matmul_matches_dequantize(spec, dtype, x_shape, n, k, monkeypatch):
    qw = quantize(torch.randn(n, k, dtype=dtype), spec)
    x = torch.randn(*x_shape, k, dtype=dtype)
    ref = x @ dequantize(qw, dtype).t()
    out = quant_matmul(x, qw)
    assert out.shape == (*x_shape, n) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    monkeypatch.setattr(ops, "_FALLBACK_BLOCK_ELEMS", 3 * k)  # 1 row per block
    torch.testing.assert_close(quant_matmul(x, qw), ref, rtol=tol, atol=tol)
    cached = quant_matmul(x, qw, cache_dequantized=True)
    assert qw._dense is not None and "_dense" not in str(qw.state_dict())
    torch.testing.assert_close(cached, ref, rtol=tol, atol=tol)


def test_quant_matmul_errors():
    qw = quantize(torch.randn(8, 64), QuantSpec())
    with pytest.raises(ValueError, match=r"x has K=32, weight is \[N=8, K=64\]"):
        quant_matmul(torch.randn(2, 32), qw)
    with pytest.raises(ValueError, match="impl must be 'auto', 'triton' or 'torch', got 'cuda'"):
        quant_matmul(torch.randn(2, 64), qw, impl="cuda")
    with pytest.raises(ValueError, match=r"impl='triton'\) needs a CUDA fp16/bf16 x"):
        quant_matmul(torch.randn(2, 64), qw, impl="triton")


# ---- Triton kernels under the interpreter -----------------------------------------------------

_INTERP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, triton, triton.language as tl
    from zinfer.quant import triton_kernels as tk
    from zinfer.quant.pack import dequantize, quantize
    from zinfer.quant.spec import QuantSpec

    @triton.jit
    def _probe(o, n):
        for i in range(0, n, 1):
            tl.store(o + i, i)
    try:  # some Triton releases' interpreters break on newer numpy: report, do not fail
        _probe[(1,)](torch.zeros(2, dtype=torch.int32), 2)
    except Exception as e:
        print(f"triton {triton.__version__} interpreter broken: {e!r}")
        sys.exit(3)

    torch.manual_seed(0)
    errors = []  # relative errors; a NaN fails the all() below
    for spec, (m, n, k) in [(QuantSpec(4, 64), (3, 20, 200)), (QuantSpec(8, 32, symmetric=True), (2, 9, 70)),
                            (QuantSpec(4, 48, symmetric=True), (1, 16, 100)), (QuantSpec(8, 64), (20, 33, 130))]:
        qw = quantize(torch.randn(n, k, dtype=torch.float16), spec)
        x = torch.randn(m, k, dtype=torch.float16)
        ref = x.float() @ dequantize(qw, torch.float32).t()
        bk = 16 if spec.group_size % 32 else 32
        for fn, cfg in [(tk.gemv, dict(GROUPS=2, GROUPS_PER_SPLIT=3)), (tk.gemv, {}),
                        (tk.gemm, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=bk, K_PER_SPLIT=2 * bk)),
                        (tk.gemm, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, K_PER_SPLIT=4096, SWAP_AB=True)),
                        (tk.gemv_words, dict(BLOCK_N=4, BLOCK_W=4, num_warps=1, U_PER_SPLIT=8, WIDE=False)),
                        (tk.gemv_words, dict(BLOCK_N=2, BLOCK_W=2, num_warps=1, U_PER_SPLIT=3, WIDE=True)),
                        (tk.gemv_words, dict(BLOCK_N=2, BLOCK_W=2, num_warps=1, U_PER_SPLIT=7,
                                             PREFETCH=True, WIDE=True)),
                        (tk.gemv_words, dict(BLOCK_N=4, BLOCK_W=2, num_warps=1, PREFETCH=True, WIDE=False)),
                        (tk.gemv_words, dict(BLOCK_M=4, BLOCK_N=4, BLOCK_W=4, num_warps=1, U_PER_SPLIT=8,
                                             WIDE=False)),
                        (tk.gemv_words, dict(BLOCK_M=2, BLOCK_N=2, BLOCK_W=2, num_warps=1, U_PER_SPLIT=7,
                                             PREFETCH=True, WIDE=True)),
                        (tk.gemv_words, {}),
                        (tk.gemv_mma, dict(TILES=2, WARPS=2, GPI=1, G_PER_SPLIT=2)),
                        (tk.gemv_mma, dict(TILES=1, WARPS=1, GPI=2))]:
            if fn is tk.gemv_words and (not tk.words_ok(qw, cfg.get("WIDE", False)) or m > tk.TUNED_MAX_M and cfg):
                continue  # the word kernel serves decode sizes; at M = 20 only its default runs (7 min interpreted)
            if fn is tk.gemv_mma and (not tk.mma_ok(qw) or m > tk.MMA_MAX_M):
                continue
            out = torch.full((m, n), float("nan"), dtype=torch.float16)
            fn(x, qw, out, cfg=cfg)
            errors.append(((out.float() - ref).norm() / ref.norm()).item())
        w = tk.dequantize(qw, torch.float16).float()
        errors.append(((w - dequantize(qw, torch.float32)).norm() / w.norm()).item())
    # bf16 x (its pairs decoded by the X_BF16 path): bf16 rounding of x and out bounds the error
    qw = quantize(torch.randn(20, 256, dtype=torch.bfloat16), QuantSpec(4, 64))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = x.float() @ dequantize(qw, torch.float32).t()
    bf16_errors = []
    for cfg in [dict(BLOCK_N=4, BLOCK_W=4, num_warps=1, U_PER_SPLIT=8, WIDE=False),
                dict(BLOCK_M=2, BLOCK_N=4, BLOCK_W=4, num_warps=1, U_PER_SPLIT=8, WIDE=True)]:
        out = torch.full((3, 20), float("nan"), dtype=torch.bfloat16)
        tk.gemv_words(x, qw, out, cfg=cfg)
        bf16_errors.append(((out.float() - ref).norm() / ref.norm()).item())
    for spec in [QuantSpec(4, 64), QuantSpec(8, 64, symmetric=True)]:  # the MMA kernel's bf16 paths (int8: two planes)
        qw = quantize(torch.randn(20, 256, dtype=torch.bfloat16), spec)
        ref = x.float() @ dequantize(qw, torch.float32).t()
        out = torch.full((3, 20), float("nan"), dtype=torch.bfloat16)
        tk.gemv_mma(x, qw, out, cfg=dict(TILES=2, WARPS=2, GPI=1, G_PER_SPLIT=2))
        bf16_errors.append(((out.float() - ref).norm() / ref.norm()).item())
    print(f"relative errors: fp16 x {max(errors):.2e}, bf16 x {max(bf16_errors):.2e}")
    ok = all(e < 2e-3 for e in errors) and all(e < 1e-2 for e in bf16_errors)
    sys.exit(0 if ok and errors and bf16_errors else 1)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run these kernels for real")
def test_triton_kernels_under_interpreter():
    run_interpreted(_INTERP_SCRIPT)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("bits, tiles, warps, gpi, bf16", [(4, 1, 4, 2, True), (8, 2, 2, 1, False), (8, 1, 8, 1, True)])
def test_tensor_core_gemv_keeps_one_value_per_thread(bits, tiles, warps, gpi, bf16):
    # the MMA kernel's inline PTX assumes element i of each [32 * warps] tensor is held by thread i (its fragments);
    # a layout Triton chose otherwise would scramble them silently. Compiled offline for sm_90: no GPU needed.
    path = Path(__file__).parents[1] / "benchmarks" / "sass_count.py"
    spec = importlib.util.spec_from_file_location("sass_count", path)
    sass_count = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass_count)
    ttgir = sass_count.compile_offline(bits=bits, tiles=tiles, warps=warps, gpi=gpi, bf16=bf16).asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)$", ttgir, re.M))
    asm = [line for line in ttgir.splitlines() if "elementwise_inline_asm" in line]
    assert sum("mma.sync.aligned.m16n8k16" in line for line in asm) >= 2 * tiles
    used = {name for line in asm for name in re.findall(r"tensor<\d+x\w+, (#\w+)>", line)}
    one_per_thread = (f"#ttg.blocked<{{sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [{warps}], "
                      f"order = [0]}}>")
    assert used and all(layouts[name] == one_per_thread for name in used), {n: layouts[n] for n in used}


# --- the weighted fit (calibrated quantization) ---------------------------------------------------------------

@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(8, 32), QuantSpec(4, 32, symmetric=True)], ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weighted_fit_lowers_the_weighted_error(spec, dtype):
    """Columns driven unevenly (h = E[x^2] spread over orders of magnitude): the weighted fit's weighted error is
    below the weights-only fit's; codes are nearest points of the stored grid."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 150, generator=g).to(dtype)  # K = 150: a ragged last group
    h = torch.rand(150, generator=g) ** 6
    plain = dequantize(quantize(w, spec), torch.float32)
    qw = quantize(w, spec, method="weighted", channel_weights=h)
    fitted = dequantize(qw, torch.float32)
    err = lambda a: ((a - w.float()) ** 2 * h).sum().item()  # noqa: E731
    assert err(fitted) < 0.75 * err(plain)  # (the same fit with h ignored reaches 0.86 at best)
    assert qw.scale.dtype == dtype and torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    assert torch.equal(quantize(w, spec, method="weighted", channel_weights=h).qweight, qw.qweight)  # deterministic


def test_weighted_fit_edge_groups():
    spec = QuantSpec(4, 32)
    w = torch.randn(4, 64)
    w[0, :32] = 0.75  # a constant group is exact
    h = torch.ones(64)
    h[32:] = 0.0  # undriven columns: the refit grid it starts from, which covers the group
    qw = quantize(w, spec, method="weighted", channel_weights=h)
    out = dequantize(qw, torch.float32)
    assert torch.equal(out[0, :32], w[0, :32])
    assert torch.equal(qw.scale[:, 1], quantize(w, spec).scale[:, 1])
    assert ((out[:, 32:] - w[:, 32:]).abs() <= qw.scale[:, 1:].float() / 2 + 1e-6).all()


def test_weighted_fit_errors():
    w, spec = torch.randn(8, 64), QuantSpec(4, 64)
    with pytest.raises(ValueError, match="method='weighted' takes channel_weights"):
        quantize(w, spec, method="weighted")
    with pytest.raises(ValueError, match="method='weighted' takes channel_weights"):
        quantize(w, spec, channel_weights=torch.ones(64))
    with pytest.raises(ValueError, match=r"channel_weights must be \[64\], finite and >= 0, got shape \[32\]"):
        quantize(w, spec, method="weighted", channel_weights=torch.ones(32))
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match=r"channel_weights must be \[64\], finite and >= 0"):
            quantize(w, spec, method="weighted", channel_weights=torch.full((64,), bad))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_tensor_core_gemv_refuses_what_it_cannot_run():
    # checked before any launch: the operands the MMA kernel's fragments cannot hold
    from zinfer.quant import triton_kernels as tk

    qw = quantize(torch.randn(16, 128), QuantSpec(bits=4, group_size=64))
    out = torch.empty(1, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"gemv_mma: x must be fp16 or bf16 with at most 8 rows, got torch.float32"):
        tk.gemv_mma(torch.randn(1, 128), qw, out)
    with pytest.raises(ValueError, match=r"at most 8 rows, got torch.float16 \[9, 128\]"):
        tk.gemv_mma(torch.randn(9, 128, dtype=torch.float16), qw, torch.empty(9, 16, dtype=torch.float16))
    narrow = quantize(torch.randn(16, 128), QuantSpec(bits=4, group_size=32))  # 128 bits of codes a group
    with pytest.raises(ValueError, match=r"gemv_mma: needs group_size \* bits % 256 == 0"):
        tk.gemv_mma(torch.randn(1, 128, dtype=torch.float16), narrow, out)
