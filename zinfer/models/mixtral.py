"""Mixtral: the Llama block with its MLP replaced by a sparse top-2 mixture of experts."""

from torch import nn

from zinfer.layers.moe import SparseMoE
from zinfer.layers.norm import RMSNorm
from zinfer.models.llama import LlamaAttention, LlamaForCausalLM
from zinfer.parallel import current_tp, divide


class MixtralDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # tensor parallelism inside every expert: each rank holds a slice of every expert's hidden units
        ffn = divide(config.intermediate_size, current_tp().size, "intermediate_size")
        self.block_sparse_moe = SparseMoE(config.hidden_size, ffn,
                                          config.num_local_experts, config.num_experts_per_tok,
                                          config.hidden_act)

    def forward(self, x, rope, cache, inp):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, inp)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class MixtralForCausalLM(LlamaForCausalLM):
    compilable = False  # the eager MoE picks experts on the host

    def __init__(self, config):
        super().__init__(config, make_layer=MixtralDecoderLayer)
