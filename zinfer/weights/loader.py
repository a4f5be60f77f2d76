"""Build a model on the meta device, then fill each parameter straight from the weight iterator.

One generic loop serves checkpoints, GGUF files, dummy weights and (later) a live trainer.
"""

import logging
from collections.abc import Callable, Collection, Iterable

import torch
from torch import nn

from zinfer.errors import CheckpointError
from zinfer.layers.linear import Linear, MergedLinears
from zinfer.models import model_class
from zinfer.models.base import CausalLM
from zinfer.parallel import SINGLE, TensorParallel, building
from zinfer.parallel.shard import ShardPlan, check_packed_split, plan
from zinfer.quant import QuantSpec

log = logging.getLogger(__name__)


def build_empty(config, meta: bool = True, tp: TensorParallel = SINGLE) -> CausalLM:
    """The model with unmaterialised parameters (`meta`) or uninitialised CPU ones. Under tensor parallelism
    (`tp.size > 1`) it holds this rank's part of every split layer, and `model.shard_plan` says how to cut
    each checkpoint tensor to it."""
    cls = model_class(config.model_type)
    with torch.device("meta" if meta else "cpu"), building(tp):
        model = cls(config)
    if tp.size > 1:
        with torch.device("meta"):
            model.shard_plan = plan(model, cls(config), tp)  # the whole model for one process: full shapes
    return model


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


def _owned(t: torch.Tensor) -> torch.Tensor:
    # a rank's block of a whole tensor may still view the whole one's memory: keep only the block
    return t.clone() if t.untyped_storage().nbytes() > t.nbytes else t


def quantizable_linears(model: CausalLM, lm_head: bool = False) -> list[Linear]:
    """The Linears quantization packs, not yet packed: those of the decoder layers not marked otherwise
    (embeddings, norms and MoE routers stay dense), and the LM head when `lm_head` (by default it stays dense:
    its error is not averaged over layers, and a tied head would need a second, packed copy of the embedding)."""
    linears = [m for layer in model.decoder_layers() for m in layer.modules()
               if isinstance(m, Linear) and m.quantizable]
    if lm_head:
        linears.append(model.lm_head)
    return [m for m in linears if m.qspec is None]


def quantize_shells(model: CausalLM, spec: QuantSpec, dtype, lm_head: bool = False) -> None:
    """Make every quantizable Linear packed (still empty). Call before planning (sizes) and loading."""
    for m in quantizable_linears(model, lm_head):
        m.set_quantized(spec, dtype)


def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]], device, dtype,
                 borrowed: Callable[[torch.Tensor], bool] | None = None,
                 place: Callable[[str], torch.device] | None = None) -> CausalLM:
    """Materialise every parameter of `model` from `weights` on `device` in `dtype`; check names and shapes.
    `place(name)`: the device parameter `name` is read to instead, when they differ (an offloaded model's
    resident layers go straight to the GPU, its streamed ones to host memory; see `offload.plan.load_devices`).

    Quantized Linears (see `quantize_shells`) take either their packed tensors from a quantized checkpoint
    or a dense `weight`, quantized as it is read: one layer's dense copy at a time, never the model's.
    Under tensor parallelism each whole tensor is cut to this rank's block as it is read (`shard_plan`): the
    rank keeps its block and the whole tensor is freed before the next one is read. `borrowed(t)`: True for a
    tensor whose storage outlives the load (a live trainer's parameter): a contiguous block of it (rows of a
    column-parallel weight) is kept as a view of that storage instead of copied, and a parameter still viewing
    one from an earlier load is re-pointed, never written into."""
    shards: ShardPlan | None = getattr(model, "shard_plan", None)
    if place is None:
        def place(name: str) -> torch.device:
            return device
    paths = {id(m): path for path, m in model.named_modules()}
    for group in merged_groups(model):
        group.allocate(place(f"{paths[id(group.linears[0])]}.weight"), dtype)
    params = dict(model.named_parameters())
    dense_for_packed = {f"{path}.weight": m for path, m in model.named_modules()
                        if isinstance(m, Linear) and m.qspec is not None}
    # row-parallel quantized Linears: packed checkpoint tensors must split at whole groups
    packed_rows = {f"{path}.{n}": m for path, m in model.named_modules()
                   if isinstance(m, Linear) and m.qspec is not None and m.tp is not None for n in MergedLinears.PACKED}
    tied = set(model.tied_weights)
    loaded, unexpected = set(), []

    def pack(target: str, dense: torch.Tensor) -> None:  # a packed Linear's `weight` read from a dense tensor
        prefix = target[: -len("weight")]
        loaded.update(prefix + n for n in dense_for_packed[target].load_weight(dense, place(target), dtype))

    names = params.keys() | dense_for_packed.keys()
    for name, tensor in weights:
        target = _match(name, names, model.checkpoint_prefixes)
        if target is None:
            if not name.endswith(model.ignored_checkpoint_suffixes):
                unexpected.append(name)
            continue
        if target in dense_for_packed:
            lin = dense_for_packed[target]
            if shards is not None:
                tensor = shards.shard(target, tensor, torch.Size((lin.out_features, lin.in_features)))
            if tensor.shape != (lin.out_features, lin.in_features):
                raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                      f"{(lin.out_features, lin.in_features)}")
            pack(target, tensor)
            continue
        expected = params[target].shape
        if shards is not None:
            if target in packed_rows:
                check_packed_split(target, packed_rows[target])
            tensor = shards.shard(target, tensor, expected)
        if tensor.shape != expected:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected)}")
        param = params[target]
        want = dtype if tensor.is_floating_point() else tensor.dtype  # packed integer tensors keep their type
        home = torch.device(place(target))
        filled = not param.is_meta and param.dtype == want and param.device.type == home.type
        if filled and not (borrowed is not None and borrowed(param)):
            param.data.copy_(tensor)  # preallocated in place (fused q/k/v, gate/up), or kept from the last load
        else:
            value = tensor.to(device=home, dtype=want).contiguous()
            keep = shards is None or (borrowed is not None and borrowed(value))
            _assign(model, target, value if keep else _owned(value))
        loaded.add(target)
    for dst, src in model.tied_weights.items():
        if dst in dense_for_packed:  # a packed head is never tied: it holds its own packed copy of the embedding
            if dst.removesuffix("weight") + "qweight" not in loaded and src in loaded:
                pack(dst, model.get_parameter(src))
            loaded.add(dst)

    def asked(name: str) -> str:  # a packed Linear's tensors come from a dense checkpoint as its `weight`
        prefix, _, last = name.rpartition(".")
        dense = f"{prefix}.weight"
        return dense if last in MergedLinears.PACKED and dense in dense_for_packed else name

    # a tied head whose source is missing is not named: the source is
    absent = (asked(n) for n in params if n not in loaded)
    missing = list(dict.fromkeys(n for n in absent if n not in tied))
    missing = [f"{n} (or its packed qweight, scale, zero)" if n in dense_for_packed else n for n in missing]
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
