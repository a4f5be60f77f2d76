"""RoPE against transformers: inv_freq / attention scaling, cos/sin over changing lengths, apply_rotary."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from zinfer.layers.rotary import SUPPORTED_ROPE_TYPES, RotaryEmbedding, apply_rotary, rope_parameters

HEAD_DIM = 32
ROT_HALF = HEAD_DIM // 2  # number of frequency pairs at full rotary

# name -> (rope parameters as a transformers 5 config holds them, max_position_embeddings)
CASES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, 16),
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, 32),
    "linear_partial": (
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5},
        32,
    ),
    "dynamic": ({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 16),
    # orig 64: wavelengths 6.3 (high band), 20 and 63 (blended), the rest low band
    "llama3": (
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        512,
    ),
    "yarn": (
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024},
        4096,
    ),
    "yarn_mscale": (
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "mscale": 1.0,
            "mscale_all_dim": 0.5,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
        },
        4096,
    ),
    # no factor: max / original stands in (DeepSeek-V3 style)
    "yarn_nofactor": (
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": None,
            "original_max_position_embeddings": 1024,
        },
        8192,
    ),
    "yarn_attn": (
        {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "attention_factor": 1.25,
        },
        4096,
    ),
    "longrope": (
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.05 * i for i in range(ROT_HALF)],
            "long_factor": [1.0 + 0.5 * i for i in range(ROT_HALF)],
            "original_max_position_embeddings": 16,
        },
        64,
    ),
    "longrope_partial": (
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "factor": 2.0,
            "short_factor": [1.0 + 0.05 * i for i in range(ROT_HALF // 2)],
            "long_factor": [1.0 + 0.5 * i for i in range(ROT_HALF // 2)],
            "original_max_position_embeddings": 16,
        },
        64,
    ),
}

# max position + 1 per step: short, beyond the original 16, shrinking but still long (dynamic keeps its
# grown frequencies), exactly 16 (no reset), short (reset), long again.
SEQ_LENS = [8, 40, 30, 16, 10, 25]


def hf_config(name: str) -> LlamaConfig:
    rope, max_pos = CASES[name]
    return LlamaConfig(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_pos,
        rope_parameters=dict(rope),
    )


def ours(name: str, device=None) -> RotaryEmbedding:
    cfg = hf_config(name)
    return RotaryEmbedding(HEAD_DIM, rope_parameters(cfg), cfg.max_position_embeddings, device=device)


def positions_for(seq_len: int) -> torch.Tensor:
    # [2, S]: row 0 ends at seq_len - 1 (the batch max), row 1 is shifted left
    S = min(seq_len, 12)
    row = torch.arange(seq_len - S, seq_len)
    return torch.stack([row, (row - 3).clamp(min=0)])


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_and_scaling_match_transformers(name):
    cfg = hf_config(name)
    init = ROPE_INIT_FUNCTIONS.get(cfg.rope_parameters["rope_type"])
    if init is None:  # transformers 5 has no "default" entry
        init = LlamaRotaryEmbedding.compute_default_rope_parameters
    ref_inv_freq, ref_scaling = init(cfg)
    rope = ours(name)
    assert rope.inv_freq.dtype == torch.float32
    assert rope.inv_freq.shape == (rope.rot_dim // 2,)
    torch.testing.assert_close(rope.inv_freq, ref_inv_freq, rtol=0, atol=0)
    assert rope.attention_scaling == pytest.approx(ref_scaling, rel=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_cos_sin_match_transformers_over_lengths(name):
    ref, rope = LlamaRotaryEmbedding(hf_config(name)), ours(name)
    x = torch.zeros(1, dtype=torch.float32)  # HF only reads its device and dtype
    for seq_len in SEQ_LENS:
        pos = positions_for(seq_len)
        cos, sin = rope(pos)
        ref_cos, ref_sin = ref(x, pos)
        assert cos.dtype == torch.float32 and cos.shape == (*pos.shape, rope.rot_dim)
        torch.testing.assert_close(rope.inv_freq, ref.inv_freq, msg=f"seq_len {seq_len}")
        torch.testing.assert_close(cos, ref_cos, msg=f"seq_len {seq_len}")
        torch.testing.assert_close(sin, ref_sin, msg=f"seq_len {seq_len}")


def test_dynamic_grows_keeps_and_resets():
    rope = ours("dynamic")
    original = rope.inv_freq.clone()
    rope(positions_for(40))
    grown = rope.inv_freq.clone()
    assert int(rope.cached_len) == 40 and not torch.equal(grown, original)
    rope(positions_for(30))  # still beyond 16: keeps the frequencies of the longest batch
    assert torch.equal(rope.inv_freq, grown)
    rope(positions_for(16))  # not shorter than 16: no reset
    assert torch.equal(rope.inv_freq, grown)
    rope(positions_for(10))
    assert int(rope.cached_len) == 16 and torch.equal(rope.inv_freq, original)


def test_longrope_switches_at_original_max():
    rope = ours("longrope")
    rope(positions_for(16))
    assert torch.equal(rope.inv_freq, rope.short_inv_freq)
    rope(positions_for(17))
    assert torch.equal(rope.inv_freq, rope.long_inv_freq)
    rope(positions_for(3))
    assert torch.equal(rope.inv_freq, rope.short_inv_freq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_transformers(dtype):
    torch.manual_seed(0)
    rope = ours("yarn")
    q, k = torch.randn(2, 2, 4, 12, HEAD_DIM).unbind(0)  # each [B=2, H=4, S=12, D]
    cos, sin = rope(positions_for(40))
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    out_q = apply_rotary(q.to(dtype), cos, sin)
    assert out_q.dtype == dtype
    tol = {} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 2e-2}
    torch.testing.assert_close(out_q, ref_q.to(dtype), **tol)
    torch.testing.assert_close(apply_rotary(k.to(dtype), cos, sin), ref_k.to(dtype), **tol)


def test_apply_rotary_partial_passes_tail_through():
    torch.manual_seed(0)
    rope = ours("linear_partial")
    assert rope.rot_dim == HEAD_DIM // 2
    x = torch.randn(2, 4, 12, HEAD_DIM)
    cos, sin = rope(positions_for(20))
    out = apply_rotary(x, cos, sin)
    r = rope.rot_dim
    ref_rot, _ = apply_rotary_pos_emb(x[..., :r], x[..., :r], cos, sin)
    torch.testing.assert_close(out[..., :r], ref_rot)
    assert torch.equal(out[..., r:], x[..., r:])


def test_unsupported_type_message():
    supported = ", ".join(SUPPORTED_ROPE_TYPES)
    with pytest.raises(ValueError) as err:
        RotaryEmbedding(HEAD_DIM, {"rope_type": "mrope", "rope_theta": 1e4}, 16)
    assert str(err.value) == f"unsupported rope_type 'mrope'; supported: {supported}"


@pytest.mark.parametrize("name", ["default", "dynamic", "llama3", "yarn", "longrope"])
def test_meta_then_real_device_gives_same_values(name):
    eager = ours(name)
    pos = positions_for(40)
    want = eager(pos)
    with torch.device("meta"):
        on_meta = ours(name)
    assert on_meta.inv_freq.is_meta and ours(name, device="meta").inv_freq.is_meta

    moved = on_meta.to("cpu")  # Tensor.to alone would refuse to copy meta data
    emptied = ours(name, device="meta").to_empty(device="cpu")
    explicit = ours(name, device="meta")
    explicit.init_buffers("cpu")
    for m in (moved, emptied, explicit):
        assert m.inv_freq.device.type == "cpu" and m.attention_scaling == eager.attention_scaling
        torch.testing.assert_close(m(pos), want, rtol=0, atol=0)


def test_cast_keeps_float32_frequencies():
    rope = ours("llama3")
    want = rope.inv_freq.clone()
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, want)


def test_rope_parameters_transformers5_config():
    got = rope_parameters(hf_config("yarn"))
    assert got["rope_type"] == "yarn" and got["rope_theta"] == 10000.0
    assert got["factor"] == 4.0 and got["original_max_position_embeddings"] == 1024
    assert got["partial_rotary_factor"] == 1.0 and "type" not in got


def test_rope_parameters_transformers4_configs():
    # 4.x: rope_theta at the top, rope_scaling with the legacy "type" key, or no scaling at all
    plain = SimpleNamespace(rope_theta=500000.0, rope_scaling=None, max_position_embeddings=16)
    assert rope_parameters(plain) == {
        "rope_type": "default",
        "rope_theta": 500000.0,
        "partial_rotary_factor": 1.0,
    }

    linear = SimpleNamespace(
        rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}, max_position_embeddings=16
    )
    assert rope_parameters(linear) == {
        "rope_type": "linear",
        "rope_theta": 1e4,
        "factor": 2.0,
        "partial_rotary_factor": 1.0,
    }

    # Phi-3 style: original_max_position_embeddings at the top; partial rotary at the top
    phi3 = SimpleNamespace(
        rope_theta=1e4,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
        original_max_position_embeddings=16,
        max_position_embeddings=64,
        partial_rotary_factor=0.5,
    )
    got = rope_parameters(phi3)
    assert got["rope_type"] == "longrope" and got["original_max_position_embeddings"] == 16
    assert got["partial_rotary_factor"] == 0.5
    rope = RotaryEmbedding(16, got, phi3.max_position_embeddings)
    assert rope.rot_dim == 8 and rope.inv_freq.shape == (4,)

    # llama3 without an original max falls back to max_position_embeddings, as transformers does
    llama3 = SimpleNamespace(
        rope_theta=1e4,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        max_position_embeddings=64,
    )
    assert rope_parameters(llama3)["original_max_position_embeddings"] == 64
