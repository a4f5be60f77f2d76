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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", SPECS + [QuantSpec(4, 128), QuantSpec(8, 32, symmetric=True)], ids=str)
def test_every_decode_candidate_matches(spec, dtype):
    # every kernel the decode-size tuner may pick, forced; K = 4100 is padded to whole groups (x is padded too),
    # and a forced split-K leaves a ragged tail of words in its last split
    from zinfer.quant import triton_kernels as tk

    for n, k in [(1000, 4160), (300, 4100)]:
        qw, w_ref = _weight(n, k, spec, dtype)
        words = qw.qweight.shape[1] // 4
        for m in (1, 2, 3, 4):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ w_ref.t()
            cands = tk.candidates(x, qw)
            assert cands[0][0] == "words" and {kind for kind, _ in cands} >= {"words", "gemm"}
            assert (m > 1) == any(cfg.get("BLOCK_M", 1) > 1 for _, cfg in cands), "rows of x per program"
            wide = next(t for t in tk.WORDS_TILES if t[4])
            narrow = next(t for t in tk.WORDS_TILES if not t[4])
            bm = 1 << (m - 1).bit_length()  # all rows of x in one program
            # forced splits: each runs its main loop more than once (BLOCK_W 64 with PREFETCH: three tiles carried
            # in registers) and some end in a ragged tail before the last split
            splits = [("words", {**tk._words_config(m, n, words, narrow, 8), "U_PER_SPLIT": 384}),
                      ("words", {**tk._words_config(m, n, words, (8, 64, 2, True, False), 8), "U_PER_SPLIT": None})]
            if tk.words_ok(qw, wide=True):
                assert any(cfg.get("WIDE") for _, cfg in cands), "64-bit word loads not offered"
                prefetch = (8, 64, 2, True, True)
                splits += [("words", {**tk._words_config(m, n, words, wide, 8), "U_PER_SPLIT": 256}),
                           ("words", {**tk._words_config(m, n, words, prefetch, 8), "U_PER_SPLIT": 200}),
                           ("words", {**tk._words_config(m, n, words, prefetch, 8, bm), "U_PER_SPLIT": 200})]
            for kind, cfg in cands + splits:
                out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                tk._LAUNCH[kind](x, qw, out, dict(cfg))
                rel = ((out.float() - ref).norm() / ref.norm()).item()
                assert rel < 1e-2, f"{kind} {cfg} M={m} [{n}, {k}]: relative error {rel:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(8, 64, symmetric=True), QuantSpec(4, 128, symmetric=True),
                                  QuantSpec(8, 32)], ids=str)  # fmt: skip
def test_tensor_core_gemv_matches(spec, dtype):
    # the MMA kernel at every M it takes (1-8: the MMA's columns), both tile counts (N = 1000: a ragged last tile
    # of 16 / 32 rows), forced splits whose last one is ragged or ends in groups past K (weighted 0), padded K
    from zinfer.quant import triton_kernels as tk

    for n, k in [(1000, 4160), (300, 4100)]:
        qw, w_ref = _weight(n, k, spec, dtype)
        assert tk.mma_ok(qw)
        ngroups = qw.padded_k // spec.group_size
        for m in range(1, tk.MMA_MAX_M + 1):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ w_ref.t()
            cfgs = [dict(zip(tk.MMA_TILE_KEYS, t)) for t in tk.MMA_TILES]
            cfgs += [dict(TILES=2, WARPS=4, GPI=2, G_PER_SPLIT=7), dict(TILES=1, WARPS=2, GPI=3, G_PER_SPLIT=5),
                     dict(TILES=1, WARPS=8, GPI=1, G_PER_SPLIT=ngroups - 1), dict(TILES=2, WARPS=1, GPI=1)]
            for cfg in cfgs:
                out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                tk.gemv_mma(x, qw, out, dict(cfg))
                rel = ((out.float() - ref).norm() / ref.norm()).item()
                assert rel < 1e-2, f"mma {cfg} M={m} [{n}, {k}] {spec}: relative error {rel:.2e}"


def test_tensor_core_gemv_refusals():
    from zinfer.quant import triton_kernels as tk

    qw, _ = _weight(64, 256, QuantSpec(4, 32), torch.bfloat16)  # 128 bits of codes a group: not whole 256-bit runs
    assert not tk.mma_ok(qw)
    assert "mma" not in {kind for kind, _ in tk.candidates(torch.randn(1, 256, device="cuda").bfloat16(), qw)}
    out = torch.empty(1, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"needs group_size \* bits % 256 == 0"):
        tk.gemv_mma(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), qw, out)
    g64, _ = _weight(64, 256, QuantSpec(4, 64), torch.bfloat16)
    with pytest.raises(ValueError, match=r"at most 8 rows, got torch.bfloat16 \[9, 256\]"):
        tk.gemv_mma(torch.randn(9, 256, device="cuda", dtype=torch.bfloat16), g64, torch.empty(9, 64, device="cuda"))
    with pytest.raises(ValueError, match=r"x must be fp16 or bf16"):
        tk.gemv_mma(torch.randn(1, 256, device="cuda"), g64, out.float())
    with pytest.raises(ValueError, match=r"out must be contiguous"):
        tk.gemv_mma(torch.randn(2, 256, device="cuda", dtype=torch.bfloat16), g64, torch.empty(64, 2).bfloat16().t())
    tk.gemv_mma(torch.empty(0, 256, device="cuda", dtype=torch.bfloat16), g64, torch.empty(0, 64, device="cuda"))


def test_tuner_keeps_one_choice_per_shape():
    from zinfer.quant import triton_kernels as tk

    qw, w_ref = _weight(2048, 1024, QuantSpec(), torch.bfloat16)
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    _check(x, qw, w_ref)  # first call times the candidates
    key = next(k for k in tk.tuned() if k[5:8] == (1, 2048, 1024))
    choice, times = tk.tuned()[key]
    assert choice in [(kind, cfg) for kind, cfg, _ in times] and all(t > 0 for *_, t in times)
    _check(x, qw, w_ref)
    assert tk.tuned()[key][0] == choice


def test_word_kernel_refusals_name_the_cause():
    from zinfer.quant import triton_kernels as tk

    qw, _ = _weight(64, 256, QuantSpec(), torch.bfloat16)
    out = torch.empty(1, 64, device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x must be fp16 or bf16 \(read as 16-bit pairs\), got torch.float32"):
        tk.gemv_words(torch.randn(1, 256, device="cuda"), qw, out)
    tiny_groups, _ = _weight(64, 256, QuantSpec(4, 4), torch.bfloat16)  # 16 bits a group: not whole words
    with pytest.raises(ValueError, match=r"needs group_size \* bits % 32 == 0 and a qweight aligned to 32 bits"):
        tk.gemv_words(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), tiny_groups, out.bfloat16())
    g8, _ = _weight(64, 256, QuantSpec(4, 8), torch.bfloat16)  # one 32-bit word a group: no 64-bit loads
    assert not any(cfg.get("WIDE") for _, cfg in tk.candidates(torch.randn(1, 256, device="cuda").bfloat16(), g8))
    with pytest.raises(ValueError, match=r"needs group_size \* bits % 64 == 0 and a qweight aligned to 64 bits"):
        tk.gemv_words(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), g8, out.bfloat16(), dict(WIDE=True))
    assert [kind for kind, _ in tk.candidates(torch.randn(1, 256, device="cuda"), qw)] == ["groups", "gemm"]


def test_untimed_choice_is_remembered(monkeypatch):
    # heuristic mode (and several ranks) take the first candidate; later calls must not rebuild the list
    from zinfer.layers import gemv as dense
    from zinfer.quant import triton_kernels as tk

    monkeypatch.setattr(dense, "MODE", "heuristic")
    qw, w_ref = _weight(1024, 512, QuantSpec(), torch.bfloat16)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    first = tk.choose(x, qw)
    assert first == tk.candidates(x, qw)[0]
    monkeypatch.setattr(tk, "candidates", lambda *a: pytest.fail("candidates rebuilt for a known shape"))
    assert tk.choose(x, qw) == first
    _check(x, qw, w_ref)
