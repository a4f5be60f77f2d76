"""Scaled dot-product attention over the KV cache, shared by every model family."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionInputs:
    """What one forward pass needs to know about the batch; built once per step by the runtime."""

    positions: torch.Tensor  # [B, S] token positions (rotary / learned embeddings); pads hold 0
    slots: torch.Tensor  # [S] cache slots this step writes (shared by all rows: left padding)
    kv_len: int  # keys in slots [0, kv_len) are read
    mask: torch.Tensor  # [B, 1, S, kv_len] bool, True = the query may attend to the key
    key_positions: torch.Tensor | None = None  # [B, kv_len] positions of cached keys (ALiBi)


class CachedAttention(nn.Module):
    """Attention of q over the cache after writing k, v. No parameters: projections live in the model."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = (
            layer_idx, num_heads, num_kv_heads, head_dim)
        self.scale = scale

    def forward(self, q, k, v, cache, inp: AttentionInputs, bias: torch.Tensor | None = None):
        # q: [B, H, S, D]; k, v: [B, H_kv, S, D]; bias: [B or 1, H, S or 1, kv_len] additive (ALiBi)
        keys, values = cache.write(self.layer_idx, k, v, inp.slots, inp.kv_len)
        mask = inp.mask
        if bias is not None:
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        b, h, s, d = out.shape
        return out.transpose(1, 2).reshape(b, s, h * d)
