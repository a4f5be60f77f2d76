"""Linear and embedding layers that hold Hugging Face-named parameters.

They start empty (usually on the `meta` device) and are filled by the weight loader;
quantized and tensor-parallel variants replace them without the model file knowing.
"""

import torch
import torch.nn.functional as F
from torch import nn

from zinfer.layers import gemv
from zinfer.quant import QuantizedWeight, QuantSpec, quant_matmul, quantize


def quantize_here(dense: torch.Tensor, spec: QuantSpec, dtype, device, **fit) -> QuantizedWeight:
    """quantize(dense in `dtype`, spec, **fit), computed on the GPU when there is one, the result on `device`."""
    on = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return quantize(dense.to(device=on, dtype=dtype), spec, **fit).to(device)


class Linear(nn.Module):
    """Dense: `weight` [out, in] as in the checkpoint. Quantized (`set_quantized`): `qweight`, `scale`
    (and `zero`) in the group-wise format of zinfer.quant, filled from a dense checkpoint tensor by
    `load_weight` or directly from a quantized checkpoint; the model file never knows which."""

    quantizable = True  # False for layers kept dense (e.g. the MoE router)

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.qspec: QuantSpec | None = None
        self.tp = None  # row-parallel: the TensorParallel group over which the output is a partial sum
        self.reduce_output = True

    def set_row_parallel(self, tp, reduce: bool = True) -> None:
        """This rank holds a slice of the input features (o_proj, down_proj ...): its output is a partial sum.
        `reduce`: all-reduce it here, then add the bias once; False when the caller sums several such outputs
        and reduces once (MoE experts), in which case only rank 0 adds the bias."""
        self.tp, self.reduce_output = tp, reduce

    def set_quantized(self, spec: QuantSpec, dtype: torch.dtype) -> None:
        """Swap the dense weight for empty (meta) packed tensors; call before loading."""
        del self.weight
        n, kp = self.out_features, spec.padded_k(self.in_features)
        with torch.device("meta"):
            self.qweight = nn.Parameter(torch.empty(n, kp // spec.per_byte, dtype=torch.uint8), requires_grad=False)
            self.scale = nn.Parameter(torch.empty(n, kp // spec.group_size, dtype=dtype), requires_grad=False)
            self.zero = None if spec.symmetric else nn.Parameter(
                torch.empty(n, kp // spec.group_size, dtype=dtype), requires_grad=False)
        self.qspec = spec

    def load_weight(self, dense: torch.Tensor, device, dtype) -> list[str]:
        """Quantize a dense [out, in] checkpoint tensor into place."""
        return self.set_packed(quantize_here(dense, self.qspec, dtype, device))

    def set_packed(self, qw: QuantizedWeight) -> list[str]:
        """Take packed tensors made elsewhere (a dense weight, if any, is dropped); returns their names."""
        if hasattr(self, "weight"):
            del self.weight
        self.qspec = qw.spec
        for name, t in qw.tensors().items():
            setattr(self, name, nn.Parameter(t, requires_grad=False))
        return list(qw.tensors())

    @property
    def packed(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scale, self.zero, (self.out_features, self.in_features), self.qspec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:
            return self._row_parallel(x)
        if self.qspec is None:
            return gemv.linear(x, self.weight, self.bias)
        y = quant_matmul(x, self.packed)
        return y if self.bias is None else y + self.bias

    def _row_parallel(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in / tp] -> this rank's partial sum [..., out]; the bias must count once in the total
        y = gemv.linear(x, self.weight) if self.qspec is None else quant_matmul(x, self.packed)
        if self.reduce_output:
            y = self.tp.all_reduce(y)
        if self.bias is not None and (self.reduce_output or self.tp.is_main):
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        q = f", quant={self.qspec.bits}bit/g{self.qspec.group_size}" if self.qspec else ""
        tp = f", row-parallel over {self.tp.size}" if self.tp is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{q}{tp}"


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

    PACKED = ("qweight", "scale", "zero")

    def __init__(self, *linears: Linear):
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.qweight = self.scale = self.zero = None  # fused packed tensors of quantized members
        self.qspec: QuantSpec | None = None

    def fused_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the fused matmul reads (the weight streamer moves these)."""
        names = ("weight", "bias") + self.PACKED
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def allocate(self, device, dtype) -> None:
        """Before loading: one empty fused weight (and bias); each Linear's parameter becomes its view, so the
        loader copies checkpoint tensors straight into place (no second copy of these weights)."""
        if any(lin.qspec is not None for lin in self.linears):
            return  # quantized members are fused after loading (fuse_packed)
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
        if any(lin.qspec is not None for lin in self.linears):
            return self.fuse_packed()
        weights = [lin.weight for lin in self.linears]
        if any(w.is_meta for w in weights):
            return
        biases = [lin.bias for lin in self.linears]
        self.weight = torch.cat([w.detach() for w in weights])
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(n, dtype=self.weight.dtype, device=self.weight.device)
             for b, n in zip(biases, self.sizes)])
        self._point_views([b is not None for b in biases])

    def fuse_packed(self) -> None:
        """After loading quantized members: concatenate their packed rows (groups run along K, so rows of
        different Linears stack) and re-point each member at its view."""
        if any(lin.qspec is None or lin.qweight.is_meta for lin in self.linears):
            return
        self.weight = None  # a dense fused weight of before (members quantized in place) is no longer read
        self.qspec = self.linears[0].qspec
        for name in self.PACKED:
            parts = [getattr(lin, name) for lin in self.linears]
            if parts[0] is None:
                continue
            setattr(self, name, torch.cat([p.detach() for p in parts]))
        biases = [lin.bias for lin in self.linears]
        if any(b is not None for b in biases):
            self.bias = torch.cat([b.detach() if b is not None else torch.zeros(n, dtype=self.scale.dtype,
                                                                                 device=self.scale.device)
                                   for b, n in zip(biases, self.sizes)])
        start = 0
        for lin, n, b in zip(self.linears, self.sizes, biases):
            for name in self.PACKED:
                if getattr(self, name) is not None:
                    setattr(lin, name, nn.Parameter(getattr(self, name)[start:start + n], requires_grad=False))
            if b is not None:
                lin.bias = nn.Parameter(self.bias[start:start + n], requires_grad=False)
            start += n

    def unfuse(self) -> None:
        self.weight = self.bias = self.qweight = self.scale = self.zero = None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.qweight is not None:
            shape = (sum(self.sizes), self.linears[0].in_features)
            y = quant_matmul(x, QuantizedWeight(self.qweight, self.scale, self.zero, shape, self.qspec))
            return (y if self.bias is None else y + self.bias).split(self.sizes, dim=-1)
        if self.weight is None:
            return tuple(lin(x) for lin in self.linears)
        return gemv.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
