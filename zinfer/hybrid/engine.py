"""The RLHF hybrid engine: a training model switches into zinfer's generation path and back.

`eval()` reads the trainer's live parameters (gathering FSDP2 shards, fusing LoRA) into a zinfer model
through the same `load_weights` loop that reads checkpoints (with `inference_tp_size > 1` the loop cuts each
rank's tensor-parallel block, as it does from a checkpoint); `generate()` runs zinfer's `Generator`;
`train()` drops every inference-only tensor so training gets its memory back.
"""

import copy
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from zinfer.errors import InputError, UnsupportedModelError
from zinfer.models import model_class
from zinfer.parallel import SINGLE, TensorParallel, within_job
from zinfer.runtime.generator import Generator, Timings
from zinfer.runtime.sampling import SamplingParams
from zinfer.weights.live import checkpoint_names
from zinfer.weights.loader import build_empty, load_weights, merged_groups

log = logging.getLogger(__name__)

Gather = Callable[[torch.Tensor], torch.Tensor]
# generate() keywords of transformers that change nothing here (synced_gpus: zinfer's tensor-parallel ranks step in
# lockstep anyway, and with inference_tp_size=1 each rank generates on its own full weights)
IGNORED_GENERATE_KWARGS = {"synced_gpus", "use_cache", "return_dict_in_generate", "output_scores"}


def _dtensor_type():
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _peft_types():
    """peft's wrapper classes, or None when peft is not installed (then no module can be one)."""
    try:
        from peft.tuners.lora import LoraLayer, ParamWrapper
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:
        return None
    return dict(param=ParamWrapper, lora=LoraLayer, tuner=BaseTunerLayer, save=ModulesToSaveWrapper,
                aux=AuxiliaryTrainingWrapper)


def _kind(module: nn.Module, peft) -> str:
    if peft is None:
        return "plain"
    for kind in ("param", "lora", "save", "aux", "tuner"):  # subclasses before their bases
        if isinstance(module, peft[kind]):
            return kind
    return "plain"


# --- LoRA fusion: W + scaling * B @ A, computed into a new tensor (the training weight is only read) -----------

def _adapters(layer) -> list[tuple[str, float]]:
    """(adapter, sign) whose delta turns the base weight into the one peft's forward effectively uses."""
    merged = list(layer.merged_adapters)
    if layer.disable_adapters:
        return [(a, -1.0) for a in merged]  # peft's forward unmerges them before calling the base layer
    if merged:
        return []  # the base weight already holds the merged adapters
    own = set(layer.lora_A) | set(layer.lora_embedding_A)
    adapters = [(a, 1.0) for a in layer.active_adapters if a in own]
    variants = [a for a, _ in adapters if a in layer.lora_variant]
    if variants:
        kind = type(layer.lora_variant[variants[0]]).__name__
        raise UnsupportedModelError(f"adapter {variants[0]!r} is a LoRA variant ({kind}, e.g. DoRA): "
                                    "HybridEngine fuses plain LoRA only")
    return adapters


def _accumulate_dtype(weight: torch.Tensor, factor: torch.Tensor) -> torch.dtype:
    # peft keeps adapters in fp32 over a bf16 base: add in fp32, round once
    return torch.promote_types(weight.dtype, factor.dtype)


def fuse_linear(layer, weight: torch.Tensor, gather: Gather) -> torch.Tensor:
    """A LoRA Linear/Embedding's effective weight (base layout: [out, in], [in, out] with fan_in_fan_out,
    [vocab, dim] for embeddings). Returns `weight` itself when no adapter applies."""
    terms = _adapters(layer)
    if not terms:
        return weight
    out = None
    for adapter, sign in terms:
        if adapter in layer.lora_embedding_A:  # A: [r, vocab], B: [dim, r]; delta = (B @ A)^T
            a, b, transposed = layer.lora_embedding_A[adapter], layer.lora_embedding_B[adapter], True
        else:  # A: [r, in], B: [out, r]; delta = B @ A
            a, b, transposed = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, layer.fan_in_fan_out
        a, b = gather(a), gather(b)
        acc = _accumulate_dtype(weight, a)
        out = weight.to(acc) if out is None else out  # may alias `weight`: addmm writes a new tensor
        lhs, rhs = (a.T, b.T) if transposed else (b, a)
        out = torch.addmm(out, lhs.to(acc), rhs.to(acc), alpha=sign * layer.scaling[adapter])
    return out.to(weight.dtype)


def fuse_bias(layer, bias: torch.Tensor, gather: Gather) -> torch.Tensor:
    """`lora_bias=True` adapters add scaling * lora_B.bias to the base bias."""
    out = bias
    for adapter, sign in _adapters(layer):
        lora_b = layer.lora_B[adapter] if adapter in layer.lora_B else None
        if lora_b is not None and lora_b.bias is not None:
            out = out + sign * layer.scaling[adapter] * gather(lora_b.bias).to(out.dtype)
    return out


def fuse_param(wrapper, weight: torch.Tensor, gather: Gather) -> torch.Tensor:
    """peft's `target_parameters` LoRA (ParamWrapper) on a 2D or 3D (experts) parameter, as peft lays it out:
    A: [E * r, in], B: [out, r * E]. Returns `weight` itself when no adapter applies."""
    terms = _adapters(wrapper)
    if not terms:
        return weight
    e = wrapper.num_experts
    w3 = weight if weight.ndim == 3 else weight[None]  # [E, out, in] or [E, in, out]
    # peft's rule: 3D expert stacks are [E, out, in] unless the module says `is_transposed`
    out_first = weight.ndim == 2 or not getattr(wrapper.get_base_layer(), "is_transposed", False)
    out = None
    for adapter, sign in terms:
        a, b = gather(wrapper.lora_A[adapter].weight), gather(wrapper.lora_B[adapter].weight)
        acc = _accumulate_dtype(weight, a)
        out = w3.to(acc) if out is None else out
        a = a.to(acc).reshape(e, -1, a.shape[-1])  # [E, r, in]
        b = b.to(acc).reshape(b.shape[0], -1, e).permute(2, 0, 1)  # [E, out, r]
        lhs, rhs = (b, a) if out_first else (a.transpose(1, 2), b.transpose(1, 2))
        out = torch.baddbmm(out, lhs, rhs, alpha=sign * wrapper.scaling[adapter])
    return out.reshape(weight.shape).to(weight.dtype)


# --- the live model as a checkpoint: (HF name, tensor) ------------------------------------------------------

class LiveWeights:
    """Every parameter of a live transformers model (under peft's wrappers) as (HF name, tensor), in module order.

    Names are the base model's: walking from peft's `get_base_model()` there is no `base_model.model.` prefix,
    and a LoRA layer's weight is reported under the layer's own name (no `.base_layer.` infix). Tensors are the
    training parameters themselves (detached aliases, so storage is shared) unless LoRA fusion or an FSDP2
    gather makes a new one. Tied parameters are reported once; zinfer re-ties them.
    """

    def __init__(self, gather: Gather):
        self.gather, self.peft, self.seen = gather, _peft_types(), set()

    def __call__(self, module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        kind = _kind(module, self.peft)
        if kind == "lora":
            yield from self._lora_layer(module, prefix)
        elif kind == "param":
            yield from self._param_wrappers(module, prefix)
        elif kind == "save":
            yield from self(_active_copy(module), prefix)
        elif kind in ("aux", "tuner"):
            raise UnsupportedModelError(f"{prefix.rstrip('.')}: peft's {type(module).__name__} cannot be fused "
                                        "into inference weights; HybridEngine supports LoRA and modules_to_save")
        else:
            yield from self._own(module, prefix, {})
            for name, child in module.named_children():
                yield from self(child, f"{prefix}{name}.")

    def _own(self, module, prefix, fusers) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in module.named_parameters(recurse=False):
            if name in fusers:
                yield prefix + name, fusers[name](self.gather(p))
            elif id(p) not in self.seen:
                self.seen.add(id(p))
                yield prefix + name, self.gather(p)

    def _lora_layer(self, layer, prefix):
        base = layer.get_base_layer()
        if not base.weight.is_floating_point():
            raise UnsupportedModelError(f"{prefix}weight: LoRA over a quantized base ({base.weight.dtype}) "
                                        "cannot be fused; train on a floating-point base model")
        yield prefix + "weight", fuse_linear(layer, self.gather(base.weight), self.gather)
        if getattr(base, "bias", None) is not None:
            yield prefix + "bias", fuse_bias(layer, self.gather(base.bias), self.gather)

    def _param_wrappers(self, wrapper, prefix):
        # wrappers nest, one per targeted parameter of the same module (e.g. experts' gate_up_proj, down_proj)
        fusers, m = {}, wrapper
        while _kind(m, self.peft) == "param":
            fusers[m.parameter_name] = lambda w, layer=m: fuse_param(layer, w, self.gather)
            m = m.base_layer
        yield from self._own(m, prefix, fusers)
        for name, child in m.named_children():
            yield from self(child, f"{prefix}{name}.")


def _active_copy(wrapper) -> nn.Module:
    """The module a ModulesToSaveWrapper's forward runs: the active adapter's copy, or the original."""
    active = wrapper.active_adapters
    if wrapper.disable_adapters or not active or active[0] not in wrapper.modules_to_save:
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


# --- per-iteration timings, as DeepSpeed-Chat's hybrid engine reports them ----------------------------------

@dataclass
class Iteration:
    start: float  # eval() began
    gather_s: float = 0.0  # FSDP2 all-gathers (inside eval)
    eval_s: float = 0.0  # the whole switch: gather + LoRA fusion + load
    generate_s: float = 0.0
    samples: int = 0  # rows generated
    train_start: float | None = None

    def report(self, now: float, index: int) -> dict:
        e2e = now - self.start
        training = now - self.train_start if self.train_start is not None else 0.0
        return dict(iteration=index, e2e_s=e2e, eval_s=self.eval_s, gather_s=self.gather_s,
                    generate_s=self.generate_s, training_s=training,
                    others_s=e2e - self.eval_s - self.generate_s - training,
                    samples=self.samples, samples_per_s=self.samples / e2e if e2e > 0 else 0.0)


def _log_iteration(t: dict, avg_samples_per_s: float) -> None:
    e2e = t["e2e_s"] or float("nan")
    pct = {k: 100 * t[k] / e2e for k in ("eval_s", "gather_s", "generate_s", "training_s", "others_s")}
    log.info("|E2E latency=%.2fs |Gather latency=%.2fs (%.2f%%) |Switch (eval) time=%.2fs (%.2f%%) "
             "|Generate time=%.2fs (%.2f%%) |Training time=%.2fs (%.2f%%) |Others=%.2fs (%.2f%%) "
             "|CurSamplesPerSec=%.2f |AvgSamplesPerSec=%.2f",
             t["e2e_s"], t["gather_s"], pct["gather_s"], t["eval_s"], pct["eval_s"], t["generate_s"],
             pct["generate_s"], t["training_s"], pct["training_s"], t["others_s"], pct["others_s"],
             t["samples_per_s"], avg_samples_per_s)


def _rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the engine --------------------------------------------------------------------------------------------

class HybridEngine:
    """Wrap a training model (transformers causal LM of a zinfer family; optionally peft LoRA; optionally
    FSDP2-sharded) so RLHF experience generation runs on zinfer's fast path.

        engine = HybridEngine(model, tokenizer)
        engine.eval(); seqs = engine.generate(ids, attention_mask=mask, max_new_tokens=256); engine.train()

    Storage: parameters that zinfer uses as they are (embeddings, norms, o_proj/down_proj without LoRA,
    ...) share storage with the training parameters, so `eval()` costs no memory for them. New tensors are
    made only where needed: LoRA-fused weights, FSDP2-gathered weights, a dtype change, and zinfer's own fused
    q/k/v and gate/up buffers (`MergedLinears`: one GEMM for several projections), into which the loader
    copies. With `release_cache` (default) `train()` frees all of those plus the KV cache and CUDA graph;
    without it they stay allocated between iterations (faster switch, memory held during training).

    `inference_tp_size=N > 1` (inside a torch.distributed job of W ranks, N dividing W, e.g. the FSDP2
    trainer's): each rank's inference model holds its tensor-parallel block of every weight, cut from the
    live (gathered, LoRA-fused) weights by the loader's sharding rule; the job splits into W / N groups of
    consecutive ranks (the whole job when W == N). A block that is a contiguous slice of a training tensor
    (rows of a column-parallel weight) is a view of it; others (column blocks, blocks of gathered or fused
    tensors) are copies of 1/N of the tensor. `generate()` is then collective over the group: each rank
    passes its own prompts (data-parallel ranks bring different ones, as with DeepSpeed-Chat's hybrid
    engine), the group generates them all in one batch in lockstep, and each rank gets its own rows back;
    when every rank passes the same prompts, they are generated once. Every rank of the group must call
    `eval()`, `generate()` and `train()` together, with the same generation settings.

    `dtype` (default: the model's) and `compile` (see `zinfer.LLM`) are inference options.
    """

    def __init__(self, model: nn.Module, tokenizer=None, inference_tp_size: int = 1, release_cache: bool = True,
                 *, dtype: torch.dtype | None = None, compile: bool | None = None):
        self.module, self.tokenizer, self.release_cache, self.compile = model, tokenizer, release_cache, compile
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
        self.config = copy.deepcopy(_checked_config(model, self.base))
        _check_peft(model)
        first = next(p for p in self.base.parameters() if p.is_floating_point())
        self.device, self.dtype = torch.device(first.device), dtype or first.dtype
        self.tp = inference_group(inference_tp_size)
        try:  # on `meta`, re-used by every eval(); a model whose heads do not split over the group fails here
            self.inference_model = build_empty(self.config, tp=self.tp)
        except InputError as e:
            raise InputError(f"inference_tp_size={inference_tp_size}: {e}") from e
        self.generator = Generator(self.inference_model, self.device, self.dtype, compile=self.compile, tp=self.tp)
        self.timings: dict = {}  # the previous iteration's, see `Iteration.report`
        self.last_timings = Timings()  # the last generate()'s prefill/total
        self.inference_mode = False
        self._iteration: Iteration | None = None
        self._done, self._total_e2e, self._total_samples = 0, 0.0, 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # --- mode switches ---------------------------------------------------------------------------------------
    def eval(self) -> "HybridEngine":
        """Gather (FSDP2), fuse LoRA and point zinfer's model at the training weights; logs the last iteration."""
        now = time.perf_counter()
        self._close_iteration(now)
        self._iteration = Iteration(start=now)
        self.module.eval()
        try:
            self._load()
        except BaseException:  # e.g. out of memory while gathering: keep none of the copies made so far
            unbind(self.inference_model)
            self.generator.release()
            raise
        _sync(self.device)
        self._iteration.eval_s = time.perf_counter() - now
        self.inference_mode = True
        return self

    def train(self, mode: bool = True) -> "HybridEngine":
        """Back to training: free inference caches (with `release_cache`), restore the model's training mode."""
        if not mode:
            return self.eval()
        if self.release_cache and self.inference_mode:
            unbind(self.inference_model)
            self.generator.release()
            if self.device.type == "cuda":
                # the decode state holds itself through its bound forward: collect it now, so its CUDA graph
                # pool and static buffers go back before training allocates
                gc.collect()
                torch.cuda.empty_cache()
        self.module.train()
        self.inference_mode = False
        if self._iteration is not None:
            self._iteration.train_start = time.perf_counter()
        return self

    def _close_iteration(self, now: float) -> None:
        if self._iteration is None:
            return
        self._done += 1
        self.timings = self._iteration.report(now, self._done)
        self._total_e2e += self.timings["e2e_s"]
        self._total_samples += self.timings["samples"]
        if _rank0():
            _log_iteration(self.timings, self._total_samples / self._total_e2e)

    # --- loading ---------------------------------------------------------------------------------------------
    def _load(self) -> None:
        _reshard(self.module)
        before = weight_pointers(self.inference_model)
        weights = checkpoint_names(self.config.model_type, LiveWeights(self._gather)(self.base))
        with torch.no_grad():
            load_weights(self.inference_model, weights, self.device, self.dtype, borrowed=training_storage(self.base))
        if self.generator.state is not None and weight_pointers(self.inference_model) != before:
            # a kept CUDA graph read the old addresses; drop it (and its KV cache) so the next run re-captures
            self.generator.release()

    def _gather(self, p: torch.Tensor) -> torch.Tensor:
        dtensor = _dtensor_type()
        if dtensor is None or not isinstance(p, dtensor):
            return p.detach()  # an alias: same storage
        start = time.perf_counter()
        with torch.no_grad():
            full = p.full_tensor()
        _sync(self.device)
        self._iteration.gather_s += time.perf_counter() - start
        return full

    # --- generation ------------------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, eos_token_id=None, pad_token_id: int | None = None,
                 min_new_tokens: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                 max_length: int | None = None, **kwargs) -> torch.Tensor:
        """Like transformers' `generate`: [B, P] prompts (left-padded, `attention_mask` marks real tokens) ->
        [B, P + G] LongTensor of the prompts as given, then the new tokens; rows that stop early (EOS) are
        padded with `pad_token_id` to the longest. `max_length` (prompt + new) may stand in for
        `max_new_tokens` (default 20). Sampling without `seed` draws one from torch's global generator (under
        tensor parallelism, the group's rank 0's draw). With `inference_tp_size > 1` this is collective over the
        rank's group (see the class docstring)."""
        if not self.inference_mode:
            raise InputError("HybridEngine.generate() needs inference mode: call engine.eval() first")
        # under tensor parallelism a rank's own mistake is reported to the whole group (group_batch), so no rank
        # is left waiting in a collective that the others never reach
        problem, prompts, params, drawn, eos, pad = None, [], SamplingParams(), False, [], 0
        try:
            _check_generate_kwargs(kwargs)
            prompts = prompt_lists(input_ids, attention_mask)
            new = _new_tokens(max_new_tokens, max_length, input_ids.shape[1])
            if do_sample and temperature <= 0:
                raise InputError(f"do_sample=True needs temperature > 0, got {temperature}")
            drawn = seed is None and do_sample
            if drawn:
                seed = int(torch.randint(0, 2**62, ()).item())
            params = SamplingParams(max_new_tokens=new, temperature=temperature if do_sample else 0.0, top_p=top_p,
                                    top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                                    min_new_tokens=min_new_tokens)
            eos = self._eos_ids(eos_token_id)
            pad = self._pad_id(pad_token_id, eos)
        except (InputError, ValueError, TypeError) as e:
            if self.tp.size == 1:
                raise
            problem = f"{type(e).__name__}: {e}"
        start = time.perf_counter()
        batch, mine, mine_new = prompts, slice(0, len(prompts)), params.max_new_tokens
        if self.tp.size > 1:
            batch, mine, params = group_batch(self.tp, prompts, params, eos, pad, drawn, problem)
        self.last_timings = Timings()
        seqs = []
        for seqs, _ in self.generator.run(batch, params, eos, pad, timings=self.last_timings):  # noqa: B007
            pass
        if self.tp.size > 1:  # identical logits on every rank make identical tokens; check it once a request
            self.tp.check_agree([s.tokens for s in seqs], "the generated tokens")
        new_ids = pad_rows([s.tokens[:mine_new] for s in seqs[mine]], pad).to(input_ids.device)
        self._iteration.generate_s += time.perf_counter() - start
        self._iteration.samples += len(prompts)
        return torch.cat([input_ids.long(), new_ids], dim=1)

    def _eos_ids(self, eos_token_id) -> list[int]:
        # transformers' order: the argument, then the model's generation config; our tokenizer last
        for source in (eos_token_id, getattr(getattr(self.base, "generation_config", None), "eos_token_id", None),
                       getattr(self.config, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if source is not None:
                return [int(t) for t in (source if isinstance(source, (list, tuple)) else [source])]
        return []

    def _pad_id(self, pad_token_id, eos: list[int]) -> int:
        gen = getattr(self.base, "generation_config", None)
        for source in (pad_token_id, getattr(gen, "pad_token_id", None), getattr(self.tokenizer, "pad_token_id",
                                                                                   None)):
            if source is not None:
                return int(source)
        return eos[0] if eos else 0


# --- tensor parallelism ------------------------------------------------------------------------------------

def inference_group(size: int) -> TensorParallel:
    """The tensor-parallel group this rank generates in.

    A job with more ranks than `size` is split into groups of `size` consecutive ranks rather than refused
    (DeepSpeed-Chat does the same): RLHF jobs train data-parallel over more GPUs than generation needs, and
    the alternatives are worse: one group over the whole job all-reduces every layer across all of them (across
    nodes, beyond NVLink) and needs heads divisible by the world size; inference_tp_size=1 needs the whole
    model on every GPU. Consecutive ranks are one node's GPUs under torchrun, so a group's all-reduces stay on
    NVLink; groups generate their own ranks' prompts independently, data-parallel."""
    if size == 1:
        return SINGLE
    return within_job(size, "inference_tp_size")


def group_batch(tp: TensorParallel, prompts: list[list[int]], params: SamplingParams, eos: list[int], pad: int,
                drawn_seed: bool, problem: str | None = None) -> tuple[list[list[int]], slice, SamplingParams]:
    """The one batch a tensor-parallel group generates in lockstep, and this rank's rows of it: every rank's
    prompts in group-rank order, or the prompts once when every rank passed the same. Settings must agree
    except the number of new tokens (`max_length` over prompts of other widths gives each rank its own): the
    group generates the most any rank asked for, and each rank keeps its own count. A sampling seed each rank
    drew for itself becomes the group's rank 0's (all ranks sample the same). `problem`: this rank's request
    was refused; every rank of the group then raises it together."""
    mine = {k: v for k, v in vars(params).items() if k != "max_new_tokens" and not (drawn_seed and k == "seed")}
    settings = (mine, eos, pad)
    everyone = tp.all_gather_object((problem, prompts, settings, params.seed, params.max_new_tokens))
    refused = [(r, e[0]) for r, e in enumerate(everyone) if e[0] is not None]
    if refused:
        raise InputError("generate() was refused on group rank(s) " + "; ".join(f"{r}: {msg}" for r, msg in refused))
    bad = [r for r, e in enumerate(everyone) if e[2] != everyone[0][2]]
    if bad:
        raise InputError(f"the ranks of an inference tensor-parallel group must generate with the same settings "
                         f"(sampling, seed, eos/pad ids): group rank(s) {bad} differ from rank 0: "
                         f"{everyone[bad[0]][2]} != {everyone[0][2]}")
    params = replace(params, seed=everyone[0][3], max_new_tokens=max(e[4] for e in everyone))
    rows = [e[1] for e in everyone]
    if all(r == prompts for r in rows):
        return prompts, slice(0, len(prompts)), params
    start = sum(len(r) for r in rows[:tp.rank])
    return [p for r in rows for p in r], slice(start, start + len(prompts)), params


def training_storage(model: nn.Module) -> Callable[[torch.Tensor], bool]:
    """True for a tensor viewing a training parameter's storage (kept alive by the trainer, so a block of it
    can be a view); gathered and fused tensors are new storage, and their blocks are copied out."""
    dtensor = _dtensor_type()
    ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()
            if dtensor is None or not isinstance(p, dtensor)}
    return lambda t: t.untyped_storage().data_ptr() in ptrs


# --- helpers -----------------------------------------------------------------------------------------------

def _checked_config(model: nn.Module, base: nn.Module):
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"HybridEngine wraps a transformers causal LM (optionally under peft LoRA "
                                    f"and FSDP2); {type(model).__name__} has no `config.model_type`")
    try:
        model_class(model_type)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"HybridEngine cannot generate for {type(base).__name__}: {e}") from e
    return config


def _check_peft(model: nn.Module) -> None:
    """Only LoRA adapters can be fused into plain weights (prompt learning adds tokens, IA3 scales, ...)."""
    for name, cfg in (getattr(model, "peft_config", None) or {}).items():
        kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
        if kind != "LORA":
            raise UnsupportedModelError(f"peft adapter {name!r} is {kind}: HybridEngine fuses LoRA adapters only")
    peft = _peft_types()
    for module in model.modules() if peft is not None else ():
        if _kind(module, peft) in ("lora", "param"):
            _adapters(module)  # raises on LoRA variants (DoRA, ...)


def _reshard(model: nn.Module) -> None:
    """FSDP2 modules left unsharded (reshard_after_forward=False) expose storage FSDP frees later: reshard
    first, so every parameter is a DTensor shard that `full_tensor()` copies."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unbind(model: nn.Module) -> None:
    """Point every parameter of zinfer's model back at `meta`: drops the references that would keep fused LoRA
    weights, gathered FSDP2 weights and the q/k/v, gate/up buffers alive during training. The next load
    assigns the training tensors again (shared storage) and refills the fused buffers."""
    for group in merged_groups(model):
        group.unfuse()
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                               requires_grad=False))


def weight_pointers(model: nn.Module | None) -> list[int]:
    return [] if model is None else [p.data_ptr() for p in model.parameters()]


def prompt_lists(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """[B, P] ids (+ mask of real tokens) -> one token list a row, padding removed."""
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: they must match")
    keep = attention_mask.bool().tolist()
    return [[t for t, k in zip(row, mask) if k] for row, mask in zip(rows, keep)]


def pad_rows(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)  # a rank of a TP group may bring no prompts
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)


def _new_tokens(max_new_tokens: int | None, max_length: int | None, prompt_len: int) -> int:
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is not None:
        if max_length <= prompt_len:
            raise InputError(f"max_length={max_length} leaves no room after the {prompt_len}-token prompts; "
                             "raise it or pass max_new_tokens")
        return max_length - prompt_len
    return 20  # transformers' default


def _check_generate_kwargs(kwargs: dict) -> None:
    if kwargs.get("num_beams", 1) != 1 or kwargs.get("num_return_sequences", 1) != 1:
        raise InputError(f"beam search / several sequences per prompt are not supported "
                         f"(num_beams={kwargs.get('num_beams', 1)}, "
                         f"num_return_sequences={kwargs.get('num_return_sequences', 1)})")
    unknown = sorted(set(kwargs) - IGNORED_GENERATE_KWARGS - {"num_beams", "num_return_sequences"})
    if unknown:
        raise InputError(f"HybridEngine.generate() got unsupported argument(s): {', '.join(unknown)}")
