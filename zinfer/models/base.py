"""What every causal LM family shares: cache geometry, the LM head, weight-name rules."""

import torch
from torch import nn


class CausalLM(nn.Module):
    # Prefixes that checkpoints of this family may carry or omit (e.g. OPT's `decoder.` vs
    # `model.decoder.`); the loader tries each to match a checkpoint name to a parameter.
    checkpoint_prefixes: tuple[str, ...] = ("model.",)
    # Parameters that may be absent from a checkpoint and are then tied to another one.
    tied_weights: dict[str, str] = {}
    # Checkpoint tensors that are not parameters (buffers older exports saved).
    ignored_checkpoint_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq", ".attn.bias", ".masked_bias")

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    sliding_window: int | None = None

    def decoder_layers(self) -> nn.ModuleList:
        """The list of decoder blocks (model.layers, model.decoder.layers, transformer.h ...)."""
        for module in self.modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.num_layers:
                return module
        raise ValueError(f"{type(self).__name__} has no ModuleList of {self.num_layers} layers")

    def tie_weights(self) -> None:
        """Point tied parameters at their source (`tie_word_embeddings`)."""
        for dst, src in self.tied_weights.items():
            owner, name = _owner(self, dst)
            setattr(owner, name, self.get_parameter(src))

    @staticmethod
    def select_logits(hidden: torch.Tensor, logits_for: str) -> torch.Tensor:
        # hidden: [B, S, D] -> only the last position unless every position's logits are asked for
        return hidden if logits_for == "all" else hidden[:, -1:]


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    path, _, name = dotted.rpartition(".")
    return (root.get_submodule(path) if path else root), name
