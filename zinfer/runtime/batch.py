"""Left-padded batches: token grid, key masks, positions and the per-step attention inputs."""

from dataclasses import dataclass

import torch

from zinfer.layers.attention import AttentionInputs


@dataclass
class PaddedBatch:
    tokens: torch.Tensor  # [B, P] left-padded prompt ids
    key_valid: torch.Tensor  # [B, T] bool: slot holds a real token (prompt or generated)
    positions: torch.Tensor  # [B, T] position of the token in each slot (pads: 0)
    prompt_len: int  # P, the padded prompt length

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], pad_id: int, total_len: int, device) -> "PaddedBatch":
        p = max(len(x) for x in prompts)
        tokens = torch.full((len(prompts), p), pad_id, dtype=torch.long)
        valid = torch.zeros(len(prompts), total_len, dtype=torch.bool)
        for row, ids in enumerate(prompts):
            tokens[row, p - len(ids):] = torch.tensor(ids, dtype=torch.long)
            valid[row, p - len(ids):] = True
        valid[:, p:] = True  # generated slots
        positions = (valid.cumsum(-1) - 1).clamp(min=0)
        return cls(tokens.to(device), valid.to(device), positions.to(device), p)

    def inputs(self, start: int, length: int, window: int | None = None) -> AttentionInputs:
        """Attention inputs for query slots [start, start + length) reading keys [0, start + length)."""
        kv_len = start + length
        device = self.tokens.device
        q = torch.arange(start, kv_len, device=device)[:, None]  # [S, 1]
        k = torch.arange(kv_len, device=device)[None, :]  # [1, kv_len]
        allowed = k <= q
        if window is not None:
            allowed &= q - k < window
        mask = self.key_valid[:, None, None, :kv_len] & allowed
        # a query always sees itself: padded rows would otherwise attend to nothing and yield NaN
        mask |= (k == q)
        return AttentionInputs(positions=self.positions[:, start:kv_len], slots=q[:, 0], kv_len=kv_len,
                               mask=mask, key_positions=self.positions[:, :kv_len])
