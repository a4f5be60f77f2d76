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
    padded: bool  # any row shorter than P

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
        padded = any(len(x) < p for x in prompts)
        return cls(tokens.to(device), valid.to(device), positions.to(device), p, padded)

    def prefill_inputs(self, window: int | None = None) -> AttentionInputs:
        """Inputs for the whole padded prompt, slots [0, P)."""
        p, device = self.prompt_len, self.tokens.device
        slots = torch.arange(p, device=device)
        key_positions = self.positions[:, :p]
        if not self.padded and (window is None or p <= window):
            return AttentionInputs(self.positions[:, :p], slots, p, None, key_positions)
        q, k = slots[:, None], slots[None, :]
        allowed = k <= q
        if window is not None:
            allowed &= q - k < window
        # a query always sees itself: padded rows would otherwise attend to nothing and yield NaN
        mask = (self.key_valid[:, None, None, :p] & allowed) | (k == q)
        return AttentionInputs(self.positions[:, :p], slots, p, mask, key_positions)

    def decode_inputs(self, slot: torch.Tensor, window: int | None = None) -> AttentionInputs:
        """Inputs for one new token per row at cache slot `slot` ([1] device tensor), reading every slot.

        Shapes never change from step to step and nothing is read back to the host, so the step can be
        captured once in a CUDA graph and replayed with a new `slot`.
        """
        t = self.key_valid.shape[1]
        k = torch.arange(t, device=slot.device)
        allowed = k <= slot
        if window is not None:
            allowed &= slot - k < window
        mask = self.key_valid & allowed  # [B, T]
        return AttentionInputs(self.positions.index_select(1, slot), slot, t, mask[:, None, None, :],
                               self.positions)
