"""Linear and embedding layers that hold Hugging Face-named parameters.

They start empty (usually on the `meta` device) and are filled by the weight loader;
quantized and tensor-parallel variants replace them without the model file knowing.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    # weight: [out_features, in_features], as in the checkpoint
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Embedding(nn.Module):
    # weight: [num_embeddings, dim]
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MergedLinears:
    """One matmul for Linears that read the same input (q/k/v, gate/up).

    Not a module: each Linear stays registered under its Hugging Face name. `fuse()` (called after
    loading) concatenates their weights into one tensor and re-points each Linear's parameter at its
    view of it, so the checkpoint layout is untouched and only one GEMM is launched. Unfused (before
    loading, or for layers that cannot be concatenated) it calls the Linears one by one.
    """

    def __init__(self, *linears: Linear):
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def allocate(self, device, dtype) -> None:
        """Before loading: one empty fused weight (and bias); each Linear's parameter becomes its view, so the
        loader copies checkpoint tensors straight into place (no second copy of these weights)."""
        if not all(isinstance(lin, Linear) for lin in self.linears):
            return
        in_features = self.linears[0].in_features
        self.weight = torch.empty(sum(self.sizes), in_features, device=device, dtype=dtype)
        has_bias = [lin.bias is not None for lin in self.linears]
        self.bias = torch.zeros(sum(self.sizes), device=device, dtype=dtype) if any(has_bias) else None
        self._point_views(has_bias)

    def _point_views(self, has_bias) -> None:
        start = 0
        for lin, n, b in zip(self.linears, self.sizes, has_bias):
            lin.weight = nn.Parameter(self.weight[start:start + n], requires_grad=False)
            if b:
                lin.bias = nn.Parameter(self.bias[start:start + n], requires_grad=False)
            start += n

    def fuse(self) -> None:
        """After the Linears' weights were replaced (e.g. by a trainer's): concatenate them again."""
        weights = [lin.weight for lin in self.linears]
        if any(not isinstance(lin, Linear) or w.is_meta for lin, w in zip(self.linears, weights)):
            return
        biases = [lin.bias for lin in self.linears]
        self.weight = torch.cat([w.detach() for w in weights])
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(n, dtype=self.weight.dtype, device=self.weight.device)
             for b, n in zip(biases, self.sizes)])
        self._point_views([b is not None for b in biases])

    def unfuse(self) -> None:
        self.weight = self.bias = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.weight is None:
            return tuple(lin(x) for lin in self.linears)
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
