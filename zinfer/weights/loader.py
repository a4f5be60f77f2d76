"""Build a model on the meta device, then fill each parameter straight from the weight iterator.

One generic loop serves checkpoints, GGUF files, dummy weights and (later) a live trainer.
"""

import logging
from collections.abc import Iterable

import torch
from torch import nn

from zinfer.errors import CheckpointError
from zinfer.layers.linear import MergedLinears
from zinfer.models import model_class
from zinfer.models.base import CausalLM

log = logging.getLogger(__name__)


def build_empty(config, meta: bool = True) -> CausalLM:
    """The model with unmaterialised parameters (`meta`) or uninitialised CPU ones."""
    cls = model_class(config.model_type)
    with torch.device("meta" if meta else "cpu"):
        return cls(config)


def _match(name: str, params: dict, prefixes: tuple[str, ...]) -> str | None:
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


def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]], device, dtype) -> CausalLM:
    """Materialise every parameter of `model` from `weights` on `device` in `dtype`; check names and shapes."""
    for group in merged_groups(model):
        group.allocate(device, dtype)
    params = dict(model.named_parameters())
    tied = set(model.tied_weights)
    loaded, unexpected = set(), []
    for name, tensor in weights:
        target = _match(name, params, model.checkpoint_prefixes)
        if target is None:
            if not name.endswith(model.ignored_checkpoint_suffixes):
                unexpected.append(name)
            continue
        expected = params[target].shape
        if tensor.shape != expected:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected)}")
        param = params[target]
        if not param.is_meta and param.dtype == dtype and param.device.type == torch.device(device).type:
            param.data.copy_(tensor)  # preallocated in place (fused q/k/v, gate/up)
        else:
            _assign(model, target, tensor.to(device=device, dtype=dtype).contiguous())
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
    return model.eval()


def merged_groups(model: nn.Module) -> list[MergedLinears]:
    """Every MergedLinears group (q/k/v, gate/up) of the model: plain attributes, not submodules."""
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, MergedLinears)]
