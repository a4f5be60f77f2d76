"""The KV cache: preallocated keys and values for every layer.

Prompts in a batch are left-padded to one length, so every row writes the same cache
slot at each step; a per-row key mask (built by the runtime) hides the padding.
"""

import torch


class KVCache:
    """keys[layer], values[layer]: [B, H_kv, T_max, D] on one device."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kv_len: int):
        """Store k, v: [B, H_kv, S, D] at `slots` [S]; return the cached [B, H_kv, kv_len, D] views."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, slots, k.to(keys.dtype))
        values.index_copy_(2, slots, v.to(values.dtype))
        return keys[:, :, :kv_len], values[:, :, :kv_len]
