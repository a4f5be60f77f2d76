"""Build a model on the meta device, then fill each parameter straight from the weight iterator.

One generic loop serves checkpoints, GGUF files, dummy weights and (later) a live trainer.
"""

import logging
from collections.abc import Collection, Iterable

import torch
from torch import nn

from zinfer.errors import CheckpointError
from zinfer.layers.linear import Linear, MergedLinears
from zinfer.models import model_class
from zinfer.models.base import CausalLM
from zinfer.quant import QuantSpec

log = logging.getLogger(__name__)


def build_empty(config, meta: bool = True) -> CausalLM:
    """The model with unmaterialised parameters (`meta`) or uninitialised CPU ones."""
    cls = model_class(config.model_type)
    with torch.device("meta" if meta else "cpu"):
        return cls(config)


def _match(name: str, params: Collection[str], prefixes: tuple[str, ...]) -> str | None:
    if name in params:
        return name
    for p in prefixes:
        if p + name in params:
            return p + name
        if name.startswith(p) and name[len(p):] in params:
            return name[len(p):]
    return None


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    owner = model.get_submodule(path) if path else model
    setattr(owner, attr, nn.Parameter(value, requires_grad=False))


def quantize_shells(model: CausalLM, spec: QuantSpec, dtype) -> None:
    """Make every quantizable Linear of the decoder layers packed (still empty): embeddings, LM head,
    norms and MoE routers stay dense. Call before planning (sizes) and loading."""
    for layer in model.decoder_layers():
        for m in layer.modules():
            if isinstance(m, Linear) and m.quantizable and m.qspec is None:
                m.set_quantized(spec, dtype)


def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]], device, dtype) -> CausalLM:
    """Materialise every parameter of `model` from `weights` on `device` in `dtype`; check names and shapes.

    Quantized Linears (see `quantize_shells`) take either their packed tensors from a quantized checkpoint
    or a dense `weight`, quantized as it is read: one layer's dense copy at a time, never the model's."""
    for group in merged_groups(model):
        group.allocate(device, dtype)
    params = dict(model.named_parameters())
    dense_for_packed = {f"{path}.weight": m for path, m in model.named_modules()
                        if isinstance(m, Linear) and m.qspec is not None}
    tied = set(model.tied_weights)
    loaded, unexpected = set(), []
    names = params.keys() | dense_for_packed.keys()
    for name, tensor in weights:
        target = _match(name, names, model.checkpoint_prefixes)
        if target is None:
            if not name.endswith(model.ignored_checkpoint_suffixes):
                unexpected.append(name)
            continue
        if target in dense_for_packed:
            lin = dense_for_packed[target]
            if tensor.shape != (lin.out_features, lin.in_features):
                raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                      f"{(lin.out_features, lin.in_features)}")
            prefix = target[: -len("weight")]
            loaded.update(prefix + n for n in lin.load_weight(tensor, device, dtype))
            continue
        expected = params[target].shape
        if tensor.shape != expected:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected)}")
        param = params[target]
        want = dtype if tensor.is_floating_point() else tensor.dtype  # packed integer tensors keep their type
        if not param.is_meta and param.dtype == want and param.device.type == torch.device(device).type:
            param.data.copy_(tensor)  # preallocated in place (fused q/k/v, gate/up)
        else:
            _assign(model, target, tensor.to(device=device, dtype=want).contiguous())
        loaded.add(target)
    missing = [n for n in params if n not in loaded and n not in tied]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}{more}")
    if unexpected:
        log.warning("ignored %d checkpoint tensor(s) the model does not use, e.g. %s",
                    len(unexpected), unexpected[:3])
    model.tied_weights = {k: v for k, v in model.tied_weights.items() if k not in loaded}
    model.tie_weights()
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers(device)
    for group in merged_groups(model):
        group.fuse_packed()
    return model.eval()


def merged_groups(model: nn.Module) -> list[MergedLinears]:
    """Every MergedLinears group (q/k/v, gate/up) of the model: plain attributes, not submodules."""
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, MergedLinears)]
