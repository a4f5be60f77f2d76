"""Tensor-parallel sharding rules: what each rank holds of every weight, and where partial sums are reduced.

The model files size their layers per rank (`num_heads = divide(total_num_heads, tp.size)`, the MLP's hidden
size likewise), so one rule covers every family: a rank's parameter is a block of the checkpoint tensor,
taken along each dimension where the two shapes differ (`rank_block`). That makes
- column-parallel (output rows split): q/k/v, gate/up, OPT fc1, BLOOM query_key_value and dense_h_to_4h,
  Mixtral w1/w3 — BLOOM's fused rows are laid out per head as [q_h, k_h, v_h], so a contiguous block of
  rows is whole heads with their own q, k and v;
- row-parallel (input columns split): o_proj, down_proj, OPT out_proj/fc2, BLOOM dense/dense_4h_to_h,
  Mixtral w2 — their outputs are partial sums, all-reduced once, the bias added after the reduce;
- replicated (same shape): embeddings, norms, the LM head, OPT project_in/out, the MoE router.
A layer is row-parallel when its per-rank input is smaller than the full model's (`plan`): the rule is
read off the model's own sizes, never kept in a second table that could disagree with them.
"""

from dataclasses import dataclass

import torch
from torch import nn

from zinfer.errors import CheckpointError, InputError
from zinfer.layers.linear import Linear
from zinfer.layers.moe import SparseMoE
from zinfer.parallel.group import TensorParallel


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """numerator / denominator when it splits evenly across `denominator` ranks; else a clear error."""
    if denominator < 1 or numerator % denominator:
        raise InputError(f"{what} ({numerator}) does not split evenly across tp={denominator} ranks: "
                         f"use a tp that divides {numerator}")
    return numerator // denominator


def kv_heads_per_rank(total: int, size: int) -> int:
    """Key/value heads a rank holds. An even split when there are at least as many as ranks; with fewer
    (GQA/MQA: 8 KV heads at tp=16, 2 at tp=4), each rank keeps the one KV head its query heads read,
    replicated on size/total ranks: a little more KV memory instead of refusing the model."""
    if total >= size:
        return divide(total, size, "key/value heads")
    if size % total:
        raise InputError(f"{total} key/value heads cannot be shared by tp={size} ranks: tp must divide the "
                         f"number of key/value heads or be a multiple of it")
    return 1


def rank_block(full: torch.Tensor, shape: torch.Size, tp: TensorParallel) -> torch.Tensor:
    """The rank's part of a whole checkpoint tensor, for a parameter of `shape` (a view: no copy).

    Along each dimension where they differ, the full tensor holds `parts` equal blocks and the rank takes block
    rank * parts // size: its own when parts == size; the KV head its query heads use when `parts` KV heads
    are replicated over more ranks (kv_heads_per_rank)."""
    for dim, (n, m) in enumerate(zip(full.shape, shape)):
        if n == m:
            continue
        parts = n // m
        if n % m or tp.size % parts:
            raise CheckpointError(f"a tensor of shape {tuple(full.shape)} cannot be split into tp={tp.size} "
                                  f"blocks of shape {tuple(shape)}")
        full = full.narrow(dim, tp.rank * parts // tp.size * m, m)
    return full


@dataclass
class ShardPlan:
    """What a rank holds: the full shape of every tensor (checked against the checkpoint before slicing, and
    the shapes dummy weights are made in, so every rank slices the same tensors one process would load)."""

    tp: TensorParallel
    full_shapes: dict[str, torch.Size]

    def shard(self, name: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The rank's block of checkpoint tensor `name` for a parameter of `shape`."""
        full = self.full_shapes.get(name)  # None for packed quantized tensors: their split follows the dense one
        if full is not None and tensor.shape != full:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(full)} (split over tp={self.tp.size} ranks)")
        if tensor.ndim != len(shape):
            return tensor  # the loader reports the mismatch
        return rank_block(tensor, shape, self.tp)


def check_packed_split(name: str, linear: Linear) -> None:
    """A quantized checkpoint's packed tensors split along the input only at whole quantization groups."""
    if linear.in_features % linear.qspec.group_size:
        layer = name.rpartition(".")[0]
        raise CheckpointError(f"{layer!r} is quantized in groups of {linear.qspec.group_size} input features, but a "
                              f"rank holds {linear.in_features} of them: load the dense checkpoint (quantized as "
                              f"it loads) or one quantized with a group size that divides {linear.in_features}")


def plan(model: nn.Module, full: nn.Module, tp: TensorParallel) -> ShardPlan:
    """Wire `model` (built for `tp`) for tensor parallelism, comparing it with `full` (the same config built
    for one process, on the meta device): Linears whose input this rank holds only part of all-reduce their
    output, except inside a mixture of experts, which sums its experts' partial outputs and reduces once."""
    full_linears = {name: m for name, m in full.named_modules() if isinstance(m, Linear)}
    for name, m in model.named_modules():
        if isinstance(m, Linear) and m.in_features != full_linears[name].in_features:
            m.set_row_parallel(tp)
    for m in model.modules():
        if isinstance(m, SparseMoE):
            m.set_row_parallel(tp)
    shapes = {name: p.shape for name, p in full.named_parameters()}
    return ShardPlan(tp, shapes)
