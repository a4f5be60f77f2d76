"""The generation loop: prefill the padded prompts, then decode one token per step.

Sampling stays on the device; the host sees each step's tokens to decide stopping.
"""

import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from zinfer.errors import InputError
from zinfer.kv import cache_len
from zinfer.kv.cache import KVCache
from zinfer.kv.offloaded import host_attention_bytes, offloaded_cache
from zinfer.models.base import CausalLM
from zinfer.offload.plan import KVChoice, KVPolicy, kv_shape
from zinfer.parallel import SINGLE, TensorParallel
from zinfer.runtime.batch import PaddedBatch
from zinfer.runtime.decode import DecodeState, check_fits, check_host_fits, refuse_together
from zinfer.runtime.sampling import SamplingParams, next_tokens

log = logging.getLogger(__name__)


@dataclass
class Timings:
    prefill: float = 0.0  # seconds, device-synchronised around the first forward pass
    total: float = 0.0  # seconds for the whole request, graph capture excluded
    steps: int = 0
    capture: float = 0.0  # seconds spent capturing the decode CUDA graph (first request of a bucket)


@dataclass
class StepOutput:
    tokens: list[int]  # the token each row produced this step (pad for finished rows)
    finished: list[bool]


@dataclass
class Sequence:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Runs prompts through a model. `compile` (None = auto: on CUDA only) compiles the decode step with
    torch.compile; on CUDA the step is also replayed as a CUDA graph. `kv`: where the KV cache lives (None: on
    the device); an offloaded cache runs the step eagerly. `tp`: the tensor-parallel group the model was built for
    (its ranks on one machine share the host memory an offloaded cache takes)."""

    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype, compile: bool | None = None,
                 kv: KVPolicy | None = None, tp: TensorParallel = SINGLE):
        self.model, self.device, self.dtype, self.tp = model, device, dtype, tp
        self.kv = kv or KVPolicy()
        cuda = device.type == "cuda"
        self.use_graph = cuda and compile is not False and not self.kv.offload
        # MoE routing picks experts on the host in eager mode, which torch.compile cannot trace
        wanted = cuda if compile is None else compile
        self.fuse = wanted and getattr(model, "compilable", True) and not self.kv.offload
        self.state: DecodeState | None = None
        self.kv_choice: KVChoice | None = None  # the decode attention method picked for the current bucket

    def check_prompts(self, prompts: list[list[int]]) -> None:
        if not prompts:
            raise InputError("no prompts given: pass at least one prompt")
        for i, p in enumerate(prompts):
            if not p:
                raise InputError(f"prompt {i} is empty (no tokens)")
            if len(p) > self.model.max_positions:
                raise InputError(f"prompt {i} has {len(p)} tokens, longer than the model's context of "
                                 f"{self.model.max_positions}")

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        m = self.model
        return KVCache(m.num_layers, batch_size, m.num_kv_heads, m.head_dim, max_len, self.dtype, self.device)

    def decode_state(self, batch_size: int, max_len: int, mean_len: int | None = None) -> DecodeState:
        """The static buffers (and graph) for this bucket; the previous bucket's are released first.
        `mean_len`: the average cached length over the request, for the offloaded cache's cost model."""
        key = (batch_size, cache_len(max_len, self.kv.offload))
        if self.state is None or self.state.key != key:
            old = self.state.cache if self.state is not None else None
            if self.kv.offload:
                self.kv_choice = self._check_offloaded(*key, mean_len or max_len, old)
            else:
                self._check_gpu_fits(*key, releasable=old.device_bytes if old else 0)
            if self.state is not None:  # the state sits in a reference cycle (its bound forward): free the cache now
                self.state.cache = None
            self.state = old = None
            cache = self._offloaded_cache(*key) if self.kv.offload else None
            self.state = DecodeState(self.model, *key, self.dtype, self.device, self.use_graph, self.fuse, cache)
        return self.state

    def _check_gpu_fits(self, batch_size: int, max_len: int, needed: bool = True, **kwargs) -> None:
        """check_fits on this rank (when `needed`); under tensor parallelism every rank joins, and a refusal on any
        rank is one on every rank (GPUs differ in free memory, ranks' plans may differ)."""
        problem = None
        try:
            if needed:
                check_fits(self.model, batch_size, max_len, self.dtype, self.device, **kwargs)
        except InputError as e:
            if self.tp.size == 1:
                raise
            problem = str(e)
        if self.tp.size > 1:
            refuse_together(self.tp, problem)

    def _check_offloaded(self, batch_size: int, max_len: int, mean_len: int, old) -> KVChoice:
        """Pick the decode attention method for this batch shape (logged), and check both memories."""
        m = self.model
        choice = self.kv.pick(kv_shape(m, self.dtype), batch_size, mean_len)
        # the double buffer of the "gpu" method (of its rows, split) holds one layer's keys and values, twice
        on_gpu = {"gpu": batch_size, "cpu": 0, "split": choice.gpu_rows}[choice.method]
        self._check_gpu_fits(on_gpu, max_len, needed=on_gpu > 0, releasable=old.device_bytes if old else 0,
                             layers=2)
        host = 2 * m.num_layers * batch_size * max_len * m.num_kv_heads * m.head_dim * self.dtype.itemsize
        if on_gpu < batch_size:
            host += host_attention_bytes(batch_size - on_gpu, m.num_kv_heads, max_len, m.head_dim, self.dtype,
                                         self.kv.host_compiled)
        check_host_fits(host, releasable=old.host_bytes if old else 0, tp=self.tp)
        log.info(f"{self.kv.describe()}; batch {batch_size} x {max_len}: {choice}")
        return choice

    def _offloaded_cache(self, batch_size: int, max_len: int):
        m = self.model
        return offloaded_cache(self.kv_choice.method, m.num_layers, batch_size, m.num_kv_heads, m.head_dim, max_len,
                               self.dtype, self.device, pin=self.kv.pin, async_writes=self.kv.async_writes,
                               host_compiled=self.kv.host_compiled, gpu_rows=self.kv_choice.gpu_rows)

    def release(self) -> None:
        """Free the KV cache and captured graph (the hybrid engine calls this before training)."""
        if self.state is not None:  # the state sits in a reference cycle: drop the cache without waiting for gc
            self.state.cache = None
        self.state = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], params: SamplingParams, eos_ids: list[int], pad_id: int,
            stop_check=None, timings: Timings | None = None) -> Iterator[tuple[list[Sequence], StepOutput]]:
        """Yield after every step. `stop_check(row, seq) -> bool` lets the caller end a row (stop strings)."""
        self.check_prompts(prompts)
        p = max(len(x) for x in prompts)
        # the last generated token is never fed back, so it needs no position of its own
        new = min(params.max_new_tokens, self.model.max_positions - p + 1)
        state = self.decode_state(len(prompts), p + new, p + new // 2)
        batch = state.load(PaddedBatch.from_prompts(prompts, pad_id, state.key[1], self.device))
        seqs = [Sequence(list(x)) for x in prompts]
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=self.device)
            # no seed: fresh entropy, never torch.seed(), which would re-seed the caller's global RNG
            gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        seen = self._seen(batch, params)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        suppress = torch.tensor(sorted(stop_ids), device=self.device) if stop_ids else None
        timings = timings if timings is not None else Timings()
        sync(self.device)
        start = time.perf_counter()

        logits = self.model(batch.tokens, state.cache, batch.prefill_inputs(self.model.sliding_window))[:, -1]
        tok = next_tokens(logits, params, seen, suppress if params.min_new_tokens > 0 else None, gen)
        for step in range(new):
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            if step == 0:
                sync(self.device)
                timings.prefill = time.perf_counter() - start
            more = step < new - 1
            if more:
                # enqueue the next step before reading this one's tokens: the GPU computes while the host
                # decides stopping. Finished rows keep stepping (ignored) so the batch shape never changes.
                captured = state.graph is not None
                logits = state.step(tok, p + step)
                if state.graph is not None and not captured:
                    timings.capture = state.capture_seconds
            ids = tok.tolist()
            finished = self._advance(seqs, ids, step, new, stop_ids, stop_check)
            yield seqs, StepOutput(ids, finished)
            if all(finished) or not more:
                break
            block = suppress if step + 1 < params.min_new_tokens else None
            tok = next_tokens(logits, params, seen, block, gen)
        sync(self.device)
        timings.total = time.perf_counter() - start - timings.capture
        timings.steps = step + 1

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], pad_id: int) -> list[torch.Tensor]:
        """Log-probability of every prompt token after the first, given its prefix."""
        self.check_prompts(prompts)
        p = max(len(x) for x in prompts)
        batch = PaddedBatch.from_prompts(prompts, pad_id, p, self.device)
        inputs = batch.prefill_inputs(self.model.sliding_window)
        logits = self.model(batch.tokens, self.new_cache(len(prompts), p), inputs, logits_for="all")
        logprobs = torch.log_softmax(logits.float(), -1)  # [B, P, V]; position t predicts token t + 1
        picked = logprobs[:, :-1].gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)  # [B, P - 1]
        return [picked[row, p - len(x):].cpu() for row, x in enumerate(prompts)]

    def _seen(self, batch: PaddedBatch, params: SamplingParams):
        if params.repetition_penalty == 1.0:
            return None
        vocab = self.model.config.vocab_size
        # pads scatter into an extra column that is dropped, so they never count as seen
        seen = torch.zeros(batch.tokens.shape[0], vocab + 1, dtype=torch.bool, device=self.device)
        real = batch.key_valid[:, : batch.prompt_len]
        return seen.scatter_(1, batch.tokens.masked_fill(~real, vocab), True)[:, :vocab]

    @staticmethod
    def _advance(seqs, ids, step, new, stop_ids, stop_check) -> list[bool]:
        for row, (seq, t) in enumerate(zip(seqs, ids)):
            if seq.finish_reason is not None:
                continue
            seq.tokens.append(t)
            if t in stop_ids:
                seq.finish_reason = "stop"
            elif stop_check is not None and stop_check(row, seq):
                seq.finish_reason = "stop"
            elif step == new - 1:
                seq.finish_reason = "length"
        return [s.finish_reason is not None for s in seqs]

