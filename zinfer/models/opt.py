"""OPT: learned positions (offset 2), LayerNorm before or after each sublayer, optional project_in/out."""

from torch import nn

from zinfer.layers.attention import AttentionInputs, CachedAttention
from zinfer.layers.linear import Embedding, Linear, activation
from zinfer.layers.norm import LayerNorm
from zinfer.models.base import CausalLM
from zinfer.parallel import current_tp, divide

POSITION_OFFSET = 2  # OPT's learned position table starts two rows in (a fairseq legacy)


class OPTAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d, bias = config.hidden_size, getattr(config, "enable_bias", True)
        self.total_num_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.num_heads = divide(self.total_num_heads, current_tp().size, "attention heads")  # this rank's
        inner = self.num_heads * self.head_dim
        self.q_proj, self.k_proj = Linear(d, inner, bias=bias), Linear(d, inner, bias=bias)
        self.v_proj, self.out_proj = Linear(d, inner, bias=bias), Linear(inner, d, bias=bias)
        self.attn = CachedAttention(layer_idx, self.num_heads, self.num_heads, self.head_dim)

    def forward(self, x, cache, inp: AttentionInputs):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(self.attn(q, k, v, cache, inp))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        d, bias = config.hidden_size, getattr(config, "enable_bias", True)
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.pre_norm = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = LayerNorm(d, affine=affine)
        ffn = divide(config.ffn_dim, current_tp().size, "ffn_dim")  # this rank's hidden units
        self.fc1, self.fc2 = Linear(d, ffn, bias=bias), Linear(ffn, d, bias=bias)
        self.final_layer_norm = LayerNorm(d, affine=affine)
        self.act = activation(config.activation_function)

    def forward(self, x, cache, inp):
        # pre-LN: x + f(norm(x)); post-LN (opt-350m): norm(x + f(x))
        pre, post = (self._norm_or_id(n) for n in (self.pre_norm, not self.pre_norm))
        x = x + self.self_attn(pre(self.self_attn_layer_norm, x), cache, inp)
        x = post(self.self_attn_layer_norm, x)
        x = x + self.fc2(self.act(self.fc1(pre(self.final_layer_norm, x))))
        return post(self.final_layer_norm, x)

    @staticmethod
    def _norm_or_id(apply: bool):
        return (lambda norm, x: norm(x)) if apply else (lambda norm, x: x)


class OPTDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, e = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = Embedding(config.vocab_size, e)
        self.embed_positions = Embedding(config.max_position_embeddings + POSITION_OFFSET, d)
        self.project_in = Linear(e, d) if e != d else None
        self.project_out = Linear(d, e) if e != d else None
        has_final = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        affine = getattr(config, "layer_norm_elementwise_affine", True)
        self.final_layer_norm = LayerNorm(d, affine=affine) if has_final else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))


class OPTModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(CausalLM):
    # facebook/opt-* checkpoints name tensors `decoder.*`; transformers saves `model.decoder.*`
    checkpoint_prefixes = ("model.",)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = Linear(config.word_embed_proj_dim, config.vocab_size)
        if getattr(config, "tie_word_embeddings", True):
            self.tied_weights = {"lm_head.weight": "model.decoder.embed_tokens.weight"}
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = divide(config.num_attention_heads, current_tp().size, "attention heads")
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.max_positions = config.max_position_embeddings

    def forward(self, input_ids, cache, inp: AttentionInputs, logits_for: str = "last"):
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        x = x + dec.embed_positions(inp.positions + POSITION_OFFSET)
        for layer in dec.layers:
            x = layer(x, cache, inp)
        x = self.select_logits(x, logits_for)
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        return self.lm_head(x)
