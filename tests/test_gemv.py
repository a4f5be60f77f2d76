"""Skinny dense matmul kernels (zinfer/layers/triton_gemv.py) and their dispatch (zinfer/layers/gemv.py) vs F.linear.

CPU: the switch, the routing, and the kernels under Triton's interpreter (where Triton is installed). GPU: every
candidate config on decode shapes, determinism, the tuner, and the custom op inside torch.compile + a CUDA graph.
"""

import importlib.util
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import run_interpreted
from zinfer.layers import gemv
from zinfer.layers.linear import Linear

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_compiled_matmul_as_reduction_equals_linear(rows, bias):
    # inside torch.compile, 1-2 rows of fp32 x on the CPU are a multiply-and-sum Inductor generates; 3 rows, eager
    # calls and half types stay F.linear. Each way, x @ W.T + b within fp32 summation-order error.
    torch.manual_seed(rows)
    x, w = torch.randn(1, rows, 96), torch.randn(40, 96)
    b = torch.randn(40) if bias else None
    seen = []

    def f(x, w, b):
        seen.append(gemv.traced_as_reduction(x, w))
        return gemv.linear(x, w, b)

    torch._dynamo.reset()
    got = torch.compile(f, dynamic=False)(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert seen == [rows <= gemv.CPU_REDUCTION_ROWS]
    assert not gemv.traced_as_reduction(x, w)  # eager
    assert torch.equal(gemv.linear(x, w, b), F.linear(x, w, b))
    seen.clear()
    torch._dynamo.reset()
    torch.compile(f, dynamic=False)(x.bfloat16(), w.bfloat16(), None)
    assert seen == [False]


def test_switch_values_and_error():
    assert [gemv.parse_mode(v) for v in (None, "", "auto", "1", "On", "heuristic", "off", "0")] == [
        "auto", "auto", "auto", "auto", "auto", "heuristic", "off", "off"]  # fmt: skip
    with pytest.raises(ValueError, match=r"ZINFER_GEMV must be one of auto, heuristic, off \(or 1 / 0\), got 'fast'"):
        gemv.parse_mode("fast")


def test_dependent_launch_switch():
    assert [gemv.parse_pdl(v) for v in (None, "", "1", "on", " ON ", "kernels", "0", "off")] == [
        "on", "on", "on", "on", "on", "kernels", "off", "off"]  # fmt: skip
    with pytest.raises(ValueError, match=r"ZINFER_PDL must be on / 1, kernels or off / 0, got 'yes'"):
        gemv.parse_pdl("yes")
    if not torch.cuda.is_available():  # no CUDA device: nothing to launch dependently, torch.compile unchanged
        assert gemv.inductor_options() == {}


def test_cpu_goes_to_f_linear():
    x, w, b = torch.randn(2, 1, 24), torch.randn(8, 24), torch.randn(8)
    assert not gemv.uses_kernel(x, w, b)
    torch.testing.assert_close(gemv.linear(x, w, b), F.linear(x, w, b), rtol=0, atol=0)


# ---- the kernels under Triton's interpreter ----------------------------------------------------

_INTERP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, triton, triton.language as tl
    import torch.nn.functional as F

    @triton.jit
    def _probe(o, n):
        for i in range(0, n, 1):
            tl.store(o + i, i)
    try:  # some Triton releases' interpreters break on newer numpy: report, do not fail
        _probe[(1,)](torch.zeros(2, dtype=torch.int32), 2)
    except Exception as e:
        print(f"triton {triton.__version__} interpreter broken: {e!r}")
        sys.exit(3)

    from zinfer.layers import gemv, triton_gemv as tg
    C = tg.Config
    torch.manual_seed(0)
    worst = {}

    def check(m, n, k, dtype, cfg, bias):
        x = torch.randn(m, k, dtype=dtype)
        w = torch.randn(n, k, dtype=dtype)
        b = torch.randn(n, dtype=dtype) if bias else None
        out = tg.launch(x, w, b, cfg)
        assert out.shape == (m, n) and out.dtype == dtype and out.is_contiguous(), (out.shape, out.dtype)
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        worst[dtype] = max(worst.get(dtype, 0.0), err)

    # M = 1 kernel, both dtypes: ragged K (tail step), split-K with a ragged last split, N not a multiple of BN
    for (n, k) in [(33, 130), (5, 70)]:
        for dtype in (torch.bfloat16, torch.float16):
            for cfg in [C("gemv", 4, 64, 4, 2), C("gemv", 16, 16, 2, 3, 48)]:
                check(1, n, k, dtype, cfg, bias=n == 5)
    # tensor-core kernel, M = 1..16 (fp16: the interpreter's tl.dot mishandles bf16; the GPU tests run bf16)
    for (m, n, k) in [(1, 20, 200), (3, 40, 130), (16, 17, 70)]:
        for cfg in [C("dot", 16, 32, 4, 2), C("dot", 32, 16, 4, 3, 32)]:
            check(m, n, k, torch.float16, cfg, bias=m % 2 == 1)
    # every candidate the heuristic lists, as chosen without timing
    for (m, n, k) in [(1, 40, 300), (5, 24, 100)]:
        cands = tg.candidates(m, n, k, 8)
        assert cands[0] == tg.choose(torch.zeros(m, k), torch.zeros(n, k), None), cands[0]
        for cfg in cands:
            assert cfg.k_per_split % cfg.block_k == 0, cfg
            check(m, n, k, torch.float16, cfg, bias=False)
    # split_k: a multiple of BLOCK_K; none once the tiles fill the GPU or K is short
    per = tg.split_k(4096, 64, 128, 132)
    assert per % 128 == 0 and 64 * -(-4096 // per) >= 2 * 132, per
    assert tg.split_k(4096, 132, 128, 132) == 0
    assert tg.split_k(256, 1, 64, 132) == 0
    # the custom op, real and fake (what torch.compile traces with)
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w = torch.randn(3, 32, dtype=torch.float16), torch.randn(16, 32, dtype=torch.float16)
    assert torch.equal(torch.ops.zinfer.skinny_linear(x, w, None, True), tg.launch(x, w, None, tg.choose(x, w, None)))
    with FakeTensorMode() as mode:
        fake = torch.ops.zinfer.skinny_linear(mode.from_tensor(x), mode.from_tensor(w), None, True)
    assert fake.shape == (3, 16) and fake.dtype == torch.float16, fake
    print("worst relative error", worst)
    sys.exit(0 if worst[torch.float16] < 2e-3 and worst[torch.bfloat16] < 1e-2 else 1)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run these kernels for real")
def test_kernels_under_interpreter():
    run_interpreted(_INTERP_SCRIPT)


# ---- on the GPU ----------------------------------------------------------------------------------

GPU_SHAPES = [(4096, 4096), (6144, 4096), (4096, 14336), (1000, 4000), (37, 300), (4099, 1030)]  # (N, K)


def _operands(m, n, k, dtype, bias, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) * 0.02
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g) if bias else None
    return x, w, b


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()  # NaN (unwritten output) fails too


GPU_CASES = [(n, k, torch.bfloat16) for n, k in GPU_SHAPES] + [(4096, 4096, torch.float16), (37, 300, torch.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,dtype", GPU_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_every_candidate_matches_f_linear(n, k, dtype):
    from zinfer.layers import triton_gemv as tg

    for m in (1, 2, 3, 5, 8, 16):
        x, w, b = _operands(m, n, k, dtype, bias=m % 2 == 1, seed=m)
        ref = F.linear(x.float(), w.float(), None if b is None else b.float())
        cublas = F.linear(x, w, b)
        for cfg in tg.candidates(m, n, k, tg.sm_count(x)):
            out = tg.launch(x, w, b, cfg)
            assert out.shape == (m, n) and out.dtype == dtype
            rel = _rel(out, ref)
            assert rel < 6e-3, f"{cfg}: relative error {rel:.2e} at M={m}, N={n}, K={k}"
            assert rel < 2 * _rel(cublas, ref) + 1e-4, f"{cfg}: {rel:.2e} vs cuBLAS {_rel(cublas, ref):.2e}"


@pytest.mark.gpu
def test_results_are_bitwise_repeatable():
    from zinfer.layers import triton_gemv as tg

    x, w, b = _operands(4, 1000, 4000, torch.bfloat16, bias=True)
    for cfg in tg.candidates(4, 1000, 4000, tg.sm_count(x)):
        first = tg.launch(x, w, b, cfg)
        for _ in range(3):
            assert torch.equal(tg.launch(x, w, b, cfg), first), cfg


@pytest.mark.gpu
def test_tuner_remembers_its_choice():
    from zinfer.layers import triton_gemv as tg

    x, w, _ = _operands(1, 4096, 4096, torch.bfloat16, bias=False)
    cfg = tg.choose(x, w, None)
    choice, timings = tg.tuned()[tg.tuning_key(x, w, None)]
    assert cfg == choice and cfg in [c for c, _ in timings] and len(timings) >= 2
    assert tg.choose(x, w, None) is cfg  # no second timing


@pytest.mark.gpu
def test_ranks_of_a_job_take_the_heuristic_choice(monkeypatch):
    # replicated layers (LM head) must run the same kernel on every tensor-parallel rank: no per-rank timing
    from zinfer.layers import triton_gemv as tg

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    x, w, _ = _operands(1, 3072, 2048, torch.bfloat16, bias=False)
    assert tg.choose(x, w, None) == tg.candidates(1, 3072, 2048, tg.sm_count(x))[0]
    assert tg.tuning_key(x, w, None) not in tg.tuned()


@pytest.mark.gpu
def test_dispatch_takes_decode_sizes_only(monkeypatch):
    x, w, b = _operands(16, 256, 512, torch.bfloat16, bias=True)
    assert gemv.uses_kernel(x.view(16, 1, 512), w, b) == gemv.HAVE_TRITON
    assert not gemv.uses_kernel(torch.cat([x, x[:1]]), w, b)  # M = 17
    assert not gemv.uses_kernel(x.float(), w.float())
    assert not gemv.uses_kernel(x, w.t().contiguous().t())  # column-major weight
    with torch.enable_grad():
        assert not gemv.uses_kernel(x.requires_grad_(), w)
    monkeypatch.setattr(gemv, "MODE", "off")
    assert not gemv.uses_kernel(x.detach(), w)


class _Block(torch.nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.up, self.down = Linear(d, f, bias=True), Linear(f, d)

    def forward(self, x):
        return self.down(F.silu(self.up(x))) + x


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["heuristic", "auto"])
def test_compiled_and_graph_captured(monkeypatch, mode):
    torch.manual_seed(0)
    model = _Block(512, 1536).cuda().to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    x = torch.randn(4, 1, 512, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(gemv, "MODE", "off")
    ref = model(x)
    monkeypatch.setattr(gemv, "MODE", mode)
    assert gemv.uses_kernel(x, model.up.weight)
    eager = model(x)
    assert _rel(eager, ref) < 4e-3
    step = torch.compile(model, dynamic=False)
    static = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: compile, tune
        for _ in range(2):
            step(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static)
    static.copy_(torch.randn_like(x))
    graph.replay()
    monkeypatch.setattr(gemv, "MODE", "off")
    assert _rel(out, model(static)) < 4e-3
