"""The KV cache: preallocated keys and values for every layer.

Prompts in a batch are left-padded to one length, so every row writes the same cache
slot at each step; a per-row key mask (built by the runtime) hides the padding.

Every cache placement answers the same three calls (this one lives on the compute device;
`zinfer.kv.offloaded` keeps it in host memory):
- `write(layer, k, v, slots, kv_len)`: store a prefill's keys/values, return what attention reads;
- `attend(layer, q, k, v, inp, bias, fn)`: one decode token: store k, v and run `fn` (the attention
  math, owned by the layer) over the cached keys/values, wherever the cache decides to run it;
- `begin_step(slot)`: the runtime names the slot the next decode step writes (a host int).
"""

import torch


class KVCache:
    """keys[layer], values[layer]: [B, H_kv, T_max, D] on one device."""

    offloaded = False  # the decode step may be captured in a CUDA graph
    host_bytes = 0

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def device_bytes(self) -> int:
        return self.nbytes

    def begin_step(self, slot: int) -> None:
        """Nothing to prepare: the slot reaches the (graph-captured) step as a device tensor."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kv_len: int):
        """Store k, v: [B, H_kv, S, D] at `slots` [S]; return the cached [B, H_kv, kv_len, D] views."""
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, slots, k.to(keys.dtype))
        values.index_copy_(2, slots, v.to(values.dtype))
        return keys[:, :, :kv_len], values[:, :, :kv_len]

    def attend(self, layer: int, q, k, v, inp, bias, fn):
        """Decode attention `fn(q, keys, values, mask, bias)` over the whole static cache: no host ints, so the
        step replays as a CUDA graph."""
        keys, values = self.write(layer, k, v, inp.slots, inp.kv_len)
        return fn(q, keys, values, inp.mask, bias)
