"""Llama 1/2/3/3.1, Mistral, Qwen2 and SmolLM: RMSNorm, rotary, grouped-query attention, SwiGLU."""

from torch import nn

from zinfer.layers.attention import AttentionInputs, CachedAttention
from zinfer.layers.linear import Embedding, Linear, MergedLinears, activation
from zinfer.layers.norm import RMSNorm
from zinfer.layers.rotary import RotaryEmbedding, apply_rotary, rope_parameters
from zinfer.models.base import CausalLM
from zinfer.parallel import current_tp, divide, kv_heads_per_rank


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d, hd, tp = config.hidden_size, head_dim_of(config), current_tp()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        # per rank: q/k/v hold this rank's heads (rows), o_proj the matching input columns
        self.num_heads = divide(self.total_num_heads, tp.size, "attention heads")
        self.num_kv_heads, self.head_dim = kv_heads_per_rank(self.total_num_kv_heads, tp.size), hd
        # Qwen2 has q/k/v bias without the `attention_bias` flag; Llama may set it for all four.
        qkv_bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.q_proj = Linear(d, self.num_heads * hd, bias=qkv_bias)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.o_proj = Linear(self.num_heads * hd, d, bias=getattr(config, "attention_bias", False))
        self.qkv = MergedLinears(self.q_proj, self.k_proj, self.v_proj)
        self.attn = CachedAttention(layer_idx, self.num_heads, self.num_kv_heads, hd)

    def forward(self, x, rope, cache, inp: AttentionInputs):
        # x: [B, S, D] -> q: [B, H, S, hd], k/v: [B, H_kv, S, hd]
        b, s, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, cache, inp))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, bias = config.hidden_size, getattr(config, "mlp_bias", False)
        f = divide(config.intermediate_size, current_tp().size, "intermediate_size")  # this rank's hidden units
        self.gate_proj, self.up_proj = Linear(d, f, bias=bias), Linear(d, f, bias=bias)
        self.down_proj = Linear(f, d, bias=bias)
        self.gate_up = MergedLinears(self.gate_proj, self.up_proj)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, rope, cache, inp):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, inp)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config, make_layer):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), rope_parameters(config),
                                          config.max_position_embeddings)


class LlamaForCausalLM(CausalLM):
    def __init__(self, config, make_layer=LlamaDecoderLayer):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, make_layer)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}
        self.num_layers = config.num_hidden_layers
        # per rank: the heads this rank's KV cache holds
        self.num_kv_heads = kv_heads_per_rank(config.num_key_value_heads or config.num_attention_heads,
                                              current_tp().size)
        self.head_dim = head_dim_of(config)
        self.max_positions = config.max_position_embeddings
        use_window = config.model_type != "qwen2" or getattr(config, "use_sliding_window", False)
        self.sliding_window = getattr(config, "sliding_window", None) if use_window else None

    def forward(self, input_ids, cache, inp: AttentionInputs, logits_for: str = "last"):
        # input_ids: [B, S] -> logits: [B, S or 1, V]
        x = self.model.embed_tokens(input_ids)
        rope = tuple(t.to(x.dtype) for t in self.model.rotary_emb(inp.positions))  # cos, sin: [B, S, hd]
        for layer in self.model.layers:
            x = layer(x, rope, cache, inp)
        x = self.model.norm(self.select_logits(x, logits_for))
        return self.lm_head(x)
