"""Sparse mixture of experts with top-k routing (Mixtral)."""

import torch
import torch.nn.functional as F
from torch import nn

from zinfer.layers.linear import Linear, activation


class Expert(nn.Module):
    # Mixtral's names: w1 = gate, w3 = up, w2 = down
    def __init__(self, dim: int, ffn_dim: int, act: str):
        super().__init__()
        self.w1, self.w3, self.w2 = Linear(dim, ffn_dim), Linear(dim, ffn_dim), Linear(ffn_dim, dim)
        self.act = activation(act)

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int, act: str):
        super().__init__()
        self.top_k = top_k
        self.gate = Linear(dim, num_experts)
        self.gate.quantizable = False  # the router stays dense: its few weights decide every token's experts
        self.experts = nn.ModuleList(Expert(dim, ffn_dim, act) for _ in range(num_experts))
        self.tp = None  # tensor parallelism inside every expert: the group to all-reduce the summed output over

    def set_row_parallel(self, tp) -> None:
        """Each rank holds a slice of every expert's hidden units (w1/w3 rows, w2 columns), so every rank works
        on every routed token even at batch 1; the experts' partial outputs are summed, then reduced once."""
        self.tp = tp
        for expert in self.experts:
            expert.w2.set_row_parallel(tp, reduce=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D] -> tokens t: [T, D]; routing in fp32, the chosen weights renormalised to sum 1
        shape = x.shape
        t = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(t).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [T, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            out = self._dense(t, weights, chosen)
        else:
            out = torch.zeros_like(t)
            for e in chosen.unique().tolist():
                token, slot = (chosen == e).nonzero(as_tuple=True)
                y = self.experts[e](t[token]) * weights[token, slot, None]
                out.index_add_(0, token, y)
        if self.tp is not None:  # out: this rank's partial sum over its slice of every expert
            out = self.tp.all_reduce(out)
        return out.view(shape)

    def _dense(self, t, weights, chosen):
        # CUDA-graph safe (no host sync on which experts were chosen): every expert runs on every token
        # and unchosen ones get weight 0. Decode batches are small, so the extra FLOPs are cheap.
        combine = torch.zeros(t.shape[0], len(self.experts), dtype=t.dtype, device=t.device)
        combine.scatter_(1, chosen, weights)  # [T, E]
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            out += expert(t) * combine[:, e, None]
        return out
