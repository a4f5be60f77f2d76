"""BLOOM: ALiBi position bias, fused query_key_value in BLOOM's per-head interleaved layout."""

import math

import torch
from torch import nn

from zinfer.layers.attention import AttentionInputs, CachedAttention
from zinfer.layers.linear import Embedding, Linear, activation
from zinfer.layers.norm import LayerNorm
from zinfer.models.base import CausalLM
from zinfer.parallel import current_tp, divide


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head ALiBi slopes: a geometric series, interleaved extras when heads are not a power of 2."""
    p = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(p) - 3)))
    slopes = [base ** i for i in range(1, p + 1)]
    if p != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * p) - 3)))
        slopes += [extra ** i for i in range(1, 2 * min(p, num_heads - p), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class BloomAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.total_num_heads, self.head_dim = config.n_head, d // config.n_head
        self.num_heads = divide(self.total_num_heads, current_tp().size, "attention heads")  # this rank's
        inner = self.num_heads * self.head_dim
        self.query_key_value = Linear(d, 3 * inner, bias=True)  # rows [q_h, k_h, v_h] of this rank's heads
        self.dense = Linear(inner, d, bias=True)
        self.attn = CachedAttention(layer_idx, self.num_heads, self.num_heads, self.head_dim)

    def forward(self, x, alibi, cache, inp: AttentionInputs):
        # fused rows are laid out per head as [q_h, k_h, v_h]: view [B, S, H, 3, hd]
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.num_heads, 3, self.head_dim)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        return self.dense(self.attn(q, k, v, cache, inp, bias=alibi))


class BloomMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        f = divide(4 * d, current_tp().size, "BLOOM's MLP size 4 * hidden_size")  # this rank's hidden units
        self.dense_h_to_4h, self.dense_4h_to_h = Linear(d, f, bias=True), Linear(f, d, bias=True)
        self.act = activation("gelu_pytorch_tanh")

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_epsilon
        self.input_layernorm = LayerNorm(d, eps)
        self.self_attention = BloomAttention(config, layer_idx)
        self.post_attention_layernorm = LayerNorm(d, eps)
        self.mlp = BloomMLP(config)
        self.residual_after_norm = config.apply_residual_connection_post_layernorm

    def forward(self, x, alibi, cache, inp):
        h = self.input_layernorm(x)
        x = (h if self.residual_after_norm else x) + self.self_attention(h, alibi, cache, inp)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_after_norm else x) + self.mlp(h)


class BloomModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = Embedding(config.vocab_size, d)
        self.word_embeddings_layernorm = LayerNorm(d, config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(d, config.layer_norm_epsilon)


class BloomForCausalLM(CausalLM):
    # bigscience checkpoints omit the `transformer.` prefix that transformers saves
    checkpoint_prefixes = ("transformer.",)
    tied_weights = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        tp = current_tp()
        self.num_layers, self.num_kv_heads = config.n_layer, divide(config.n_head, tp.size, "attention heads")
        self.head_dim = config.hidden_size // config.n_head
        self.max_positions = getattr(config, "seq_length", None) or 2048
        # ALiBi slopes of this rank's heads: heads are split in contiguous blocks, rank r holds block r
        self.heads = slice(tp.rank * self.num_kv_heads, (tp.rank + 1) * self.num_kv_heads)
        self.register_buffer("slopes", alibi_slopes(config.n_head)[self.heads], persistent=False)

    def init_buffers(self, device):
        self.slopes = alibi_slopes(self.config.n_head)[self.heads].to(device)

    def forward(self, input_ids, cache, inp: AttentionInputs, logits_for: str = "last"):
        t = self.transformer
        x = t.word_embeddings_layernorm(t.word_embeddings(input_ids))
        # alibi: [B, H, 1, kv_len] = slope_h * position of each key (softmax ignores the per-query shift)
        alibi = self.slopes[None, :, None, None] * inp.key_positions[:, None, None, :].float()
        for block in t.h:
            x = block(x, alibi, cache, inp)
        return self.lm_head(t.ln_f(self.select_logits(x, logits_for)))
