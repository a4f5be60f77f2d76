"""Name mapping for a live transformers model's tensors (the hybrid engine's weight source): where transformers
holds a family differently from its checkpoints, rename (and view) its tensors into the checkpoint layout the
model files are named after."""

from collections.abc import Iterable, Iterator

import torch

Weights = Iterable[tuple[str, torch.Tensor]]


def legacy_moe_names(weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers >= 5 holds Mixtral experts as stacks (`mlp.experts.gate_up_proj`: [E, 2F, D],
    `down_proj`: [E, D, F]); checkpoints and zinfer name them per expert (`block_sparse_moe.experts.e.w1/w3/w2`).
    The per-expert tensors are views of the stacks (storage stays shared)."""
    for name, t in weights:
        head, sep, tail = name.rpartition(".mlp.")
        moe = f"{head}.block_sparse_moe"
        if not sep or tail not in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            yield name, t
        elif tail == "gate.weight":
            yield f"{moe}.gate.weight", t
        elif tail == "experts.gate_up_proj":
            f = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{moe}.experts.{e}.w1.weight", t[e, :f]
                yield f"{moe}.experts.{e}.w3.weight", t[e, f:]
        else:
            for e in range(t.shape[0]):
                yield f"{moe}.experts.{e}.w2.weight", t[e]


LIVE_LAYOUTS = {"mixtral": legacy_moe_names}  # model_type -> rename of a live transformers model's tensors


def checkpoint_names(model_type: str, weights: Weights) -> Weights:
    """A live model's (name, tensor) pairs under the names its checkpoints use."""
    rename = LIVE_LAYOUTS.get(model_type)
    return rename(weights) if rename else weights
