"""The fused decode-attention kernel (zinfer/layers/triton_attention.py) against the unfused decode math.

CPU: the switch, the routing, and the kernel under Triton's interpreter (where Triton is installed). GPU: one and
several splits on cache shapes of real models, bf16 and fp16, and the dispatch from decode_attention when switched on.
"""

import importlib.util
import textwrap

import pytest
import torch

from helpers import run_interpreted
from zinfer.layers import attention


def operands(b, h, kv, t, d, dtype, device="cpu", masked=True, seed=0):
    """q [B, H, 1, D]; keys, values strided views of a longer cache [B, H_kv, T + 7, D]; mask [B, 1, 1, T] with
    the first (padding) keys of each row hidden but never all of them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g).to(device, dtype)
    cache = torch.randn(2, b, kv, t + 7, d, generator=g).to(device, dtype)
    mask = None
    if masked:
        pads = torch.randint(0, max(1, t // 2), (b,), generator=g)
        mask = (torch.arange(t)[None, :] >= pads[:, None]).view(b, 1, 1, t).to(device)
    return q, cache[0, :, :, :t], cache[1, :, :, :t], mask


def reference(q, keys, values, mask, scale, kv):
    """The unfused decode math in fp32."""
    return attention.decode_attention(q.float(), keys.float(), values.float(), mask, None, scale, kv)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_split_plan():
    from zinfer.layers import triton_attention as ta

    # one split for short caches or many (row, head) programs; long caches over ~one program per SM; never an
    # empty split, each split whole tiles
    assert ta.split_plan(1, 8, 256, 132) == (1, 256)
    assert ta.split_plan(64, 8, 4096, 132) == (1, 4096)
    for b, kv, t, n_sm in [(1, 8, 4096, 132), (1, 1, 70000, 132), (2, 2, 600, 8), (1, 2, 65, 8), (1, 1, 1, 8)]:
        splits, per = ta.split_plan(b, kv, t, n_sm)
        assert per % ta.BLOCK_T == 0 and (splits - 1) * per < t <= splits * per, (b, kv, t, splits, per)
        assert splits <= max(1, n_sm // (b * kv)), (b, kv, t, splits)
    assert ta.split_plan(1, 8, 4096, 132)[0] == 16 and ta.split_plan(2, 2, 600, 8)[0] == 2


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_empty_cache_refused():
    from zinfer.layers import triton_attention as ta

    q, k, v, _ = operands(1, 4, 2, 0, 16, torch.float16, masked=False)
    with pytest.raises(ValueError, match="decode attention over an empty cache"):
        ta.decode_attention(q, k, v, None, 0.25, 2)


def test_switch():
    assert [attention.parse_decode(v) for v in (None, "", "fused", " Matmul ")] == ["matmul", "matmul", "fused",
                                                                                    "matmul"]  # fmt: skip
    with pytest.raises(ValueError, match="ZINFER_DECODE_ATTENTION must be fused or matmul, got 'flash'"):
        attention.parse_decode("flash")


def test_cpu_and_fp32_stay_unfused():
    q, k, v, mask = operands(1, 4, 2, 10, 32, torch.float32)
    assert not attention._fusable(q, k, v, 2)  # fp32
    assert attention._fusable(q.half(), k.half(), v.half(), 2)
    assert not attention._fusable(q.half(), k.half(), v.half()[..., :16], 2)  # value heads of another size
    assert not attention._fusable(q.half()[..., :16], k.half()[..., :16], v.half(), 2)
    assert not attention._fusable(q.half()[..., :12], k.half()[..., :12], v.half()[..., :12], 2)  # D not 2^n
    # on the CPU decode_attention never takes the kernel: same numbers as the explicit matmuls
    out = attention.decode_attention(q, k, v, mask, None, 0.25, 2)
    qg = q.view(1, 2, 2, 32)
    s = (qg @ k.transpose(-1, -2)).float() * 0.25
    want = s.masked_fill(~mask.view(1, 1, 1, -1), float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, want.view(1, 4, 1, 32))


_INTERP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch, triton
    sys.path.insert(0, "tests")
    from test_decode_attention import operands, reference
    from zinfer.layers import triton_attention as ta
    try:
        ta.decode_attention(*operands(1, 2, 1, 4, 16, torch.float16), 0.5, 1)
    except Exception as e:  # some Triton releases' interpreters break on newer numpy: report, do not fail
        print(f"triton {triton.__version__} interpreter broken: {e!r}")
        sys.exit(3)
    # (B, H, H_kv, T, D): GQA groups of 4 and 1 (padded to 16 query rows), T ragged against the 64-key tile, and
    # long enough for 2 splits (8 "SMs" under the interpreter / 4 programs): the merge kernel runs
    for b, h, kv, t, d in [(2, 8, 2, 100, 32), (1, 4, 4, 70, 16), (2, 8, 2, 600, 16), (1, 2, 1, 1, 16)]:
        splits, _ = ta.split_plan(b, kv, t, 8)  # as the launcher plans it (the interpreter counts 8 SMs)
        for masked in (True, False):
            q, k, v, mask = operands(b, h, kv, t, d, torch.float16, masked=masked)
            got = ta.decode_attention(q, k, v, mask, d ** -0.5, kv)
            want = reference(q, k, v, mask, d ** -0.5, kv)
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
            assert got.shape == q.shape and got.dtype == q.dtype and err < 4e-3, (b, h, kv, t, d, masked, err)
            print(b, h, kv, t, d, masked, "splits", splits, "err", f"{err:.1e}")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the kernel for real")
def test_kernel_under_interpreter():
    assert "splits 2" in run_interpreted(_INTERP_SCRIPT)  # the merge kernel ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 32, 8, 256, 128), (4, 32, 8, 384, 128), (1, 32, 8, 4096, 128),
                                   (2, 12, 12, 200, 64), (3, 14, 2, 1000, 64)])
def test_kernel_on_gpu(shape, dtype, monkeypatch):
    # Llama-3-8B's heads at a short and a long cache (one split, several), batch 4, MHA (G = 1), Qwen2-like G = 7
    from zinfer.layers import triton_attention as ta

    b, h, kv, t, d = shape
    q, k, v, mask = operands(b, h, kv, t, d, dtype, "cuda")
    got = ta.decode_attention(q, k, v, mask, d ** -0.5, kv)
    want = reference(q, k, v, mask, d ** -0.5, kv)
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 1e-2
    monkeypatch.setattr(attention, "FUSED_DECODE", True)  # ZINFER_DECODE_ATTENTION=fused: the dispatch takes it
    torch.testing.assert_close(attention.decode_attention(q, k, v, mask, None, d ** -0.5, kv), got, rtol=0, atol=0)
