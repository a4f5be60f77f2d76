"""The public Python API: `LLM`, `SamplingParams`, `Completion`."""

import json
import logging
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from zinfer.config import EngineConfig
from zinfer.errors import InputError
from zinfer.offload import store_key, stream, weights_identity
from zinfer.offload.plan import kv_policy, load_devices, make_plan
from zinfer.parallel import setup as setup_tensor_parallel
from zinfer.parallel.group import rank_device
from zinfer.quant import QuantSpec
from zinfer.runtime.generator import Generator, Timings
from zinfer.runtime.sampling import SamplingParams
from zinfer.runtime.text import TextReader, cut_at_stop, stop_prefix_len, tail_text
from zinfer.weights.dummy import iter_dummy
from zinfer.weights.loader import build_empty, load_weights, quantize_shells
from zinfer.weights.source import resolve

log = logging.getLogger(__name__)
QUANT_CONFIG = "quant_config.json"  # the QuantSpec of a quantized checkpoint, beside its safetensors

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass
class Completion:
    text: str  # the generated part, decoded (stop string excluded)
    token_ids: list[int]  # the generated part
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_token_ids: list[int]


def resolve_device(device) -> torch.device:
    if device == "auto" or device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, int):
        device = torch.device("cpu") if device < 0 else torch.device("cuda", device)
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N', an int or -1") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU; use device='cpu'")
    return device


def resolve_dtype(dtype, config, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        saved = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
        return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


class LLM:
    """A model ready to generate. `model`: a directory, a .gguf file, a built-in config name
    (with `dummy=True`) or a hub id; None means the embedded SmolLM2-135M-Instruct.
    `meta=False` builds the modules on the CPU before loading (slower, same result). `compile`: None (auto)
    compiles the decode step with torch.compile and replays it as a CUDA graph on a GPU, and runs it eagerly
    on a CPU; True also compiles on a CPU (about 40 s once per batch shape, ~25% faster decode there);
    False runs every step eagerly (debugging; same tokens). With `kv_offload` and decode attention on the CPU,
    that attention is compiled on the CPU under the same rule (auto: when computing on a GPU)."""

    def __init__(self, model=None, *, dtype="auto", device="auto", dummy: bool = False, seed: int | None = None,
                 meta: bool = True, compile: bool | None = None, deepspeed_config: dict | None = None,
                 **engine_options):
        if deepspeed_config is not None:
            mapped, ignored = EngineConfig.from_deepspeed(deepspeed_config)
            if ignored:
                log.warning("deepspeed_config: ignoring keys with no meaning for zinfer: %s", ", ".join(ignored))
            engine_options = {**mapped, **engine_options}  # explicit options win
        self.options = EngineConfig.from_options(engine_options)
        missing = self.options.unsupported()
        if missing:
            raise InputError(f"not implemented yet in this version: {', '.join(missing)} "
                             "(see README: Not supported yet)")
        self.device = resolve_device(device)
        if self.options.tp > 1:
            self.device = rank_device(self.device)
        # tp > 1: one process per rank (torchrun); torch.distributed is initialised here if it is not yet
        self.tp = setup_tensor_parallel(self.options.tp, self.device)
        self.source = resolve(model)
        self.config = self.source.config
        self.dtype = resolve_dtype(dtype, self.config, self.device)
        self.seed = seed
        empty = build_empty(self.config, meta=meta, tp=self.tp)
        self.quant, self.quant_lm_head = self._quant_spec()
        if self.quant is not None:
            quantize_shells(empty, self.quant, self.dtype, lm_head=self.quant_lm_head)
        # under tp each rank plans, holds and streams only its shard, against its own GPU's memory
        self.plan = make_plan(empty, self.options, self.device, self.dtype) if self.options.offload != "none" else None
        streaming = self.plan is not None and bool(self.plan.streamed)
        # a streamed model's resident units are read straight to the GPU, the streamed ones into host memory,
        # from where each unit goes to its planned home (pinned buffers, the NVMe store)
        place = load_devices(empty, self.plan, self.device) if streaming else None
        # dummy weights are drawn on the compute device even for a streamed layer (then moved to host memory, or
        # quantized there first): CPU random numbers are far slower, and the same seed gives the same model
        weights = (iter_dummy(empty, self.dtype, self.device, seed or 0) if dummy else self.source.weights())
        # a bar for a person at a terminal: loading a large checkpoint takes a while; logs stay clean
        weights = tqdm(weights, desc=f"loading {self.source.name}", total=sum(1 for _ in empty.parameters()),
                       unit=" tensors", disable=not (sys.stderr.isatty() and self.tp.is_main), leave=False)
        self.model = load_weights(empty, weights, self.device, self.dtype, place=place)
        self.streamer = None
        if streaming:
            loaded = weights_identity(None if dummy else self.source.weight_files(), seed or 0)
            key = store_key(self.model, self.source.name, self.dtype, self.options, self.tp, loaded)
            self.streamer = stream(self.model, self.plan, self.options, self.device, key)
        kv = kv_policy(self.options, self.device, self.plan, compile=compile)
        self.engine = Generator(self.model, self.device, self.dtype, compile=False if streaming else compile, kv=kv,
                                tp=self.tp)
        self.tokenizer = self.source.tokenizer()
        self.last_timings = Timings()

    def _quant_spec(self) -> tuple[QuantSpec | None, bool]:
        """The format and whether the LM head is packed too: from quant_bits/quant_group_size/quant_lm_head, or
        as saved beside a quantized checkpoint."""
        saved = self.source.directory / QUANT_CONFIG if self.source.directory is not None else None
        asked, head = None, self.options.quant_lm_head
        if self.options.quant_bits != 16:
            asked = QuantSpec(bits=self.options.quant_bits, group_size=self.options.quant_group_size)
        if saved is not None and saved.exists():
            fields = json.loads(saved.read_text())
            saved_head = bool(fields.pop("lm_head", False))
            spec = QuantSpec.from_dict(fields)
            if (asked is not None and asked != spec) or (head and not saved_head):
                wanted = f"{asked or spec}{', LM head packed' if head else ''}"
                raise InputError(f"{self.source.name!r} is a checkpoint quantized as {spec}"
                                 f"{', LM head packed' if saved_head else ', LM head dense'}; it cannot be loaded as "
                                 f"{wanted}: drop the quant options or use the dense checkpoint")
            return spec, saved_head
        if head and asked is None:
            raise InputError("quant_lm_head packs the LM head like the layers: it needs quant_bits=4 or 8")
        return asked, head

    def save(self, directory) -> Path:
        """Write the (quantized) weights as a Hugging Face-style directory that loads without re-quantizing."""
        if self.streamer is not None:
            raise InputError("save() needs every weight in memory: load without offload, then save")
        if self.tp.size > 1:
            raise InputError(f"save() with tp={self.tp.size} would write one rank's shard of each weight: "
                             "load with tp=1 to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        if self.quant is not None:
            # "lm_head" only when packed: a checkpoint with a dense head stays readable by versions without the option
            fields = {**self.quant.to_dict(), **({"lm_head": True} if self.quant_lm_head else {})}
            (directory / QUANT_CONFIG).write_text(json.dumps(fields, indent=1))
        tied = set(self.model.tied_weights)
        state = {n: p.detach().contiguous().clone().cpu() for n, p in self.model.named_parameters() if n not in tied}
        save_file(state, str(directory / "model.safetensors"))
        return directory

    # --- token helpers -------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        ids = set()
        for source in (self.config, self._generation_config()):
            eos = getattr(source, "eos_token_id", None) if not isinstance(source, dict) else source.get(
                "eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    @property
    def pad_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        pad = getattr(self.config, "pad_token_id", None)
        return pad if pad is not None else (self.eos_token_ids or [0])[0]

    def _generation_config(self) -> dict:
        d = self.source.directory
        path = d / "generation_config.json" if d is not None else None
        return json.loads(path.read_text()) if path is not None and path.exists() else {}

    def encode(self, prompts) -> list[list[int]]:
        """Strings or token-id lists (or a single one of either) -> list of token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise InputError(f"{self.source.name!r} has no tokenizer: pass prompts as token-id lists")
                p = self.tokenizer(p)["input_ids"]
            out.append([int(t) for t in p])
        return out

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- generation ------------------------------------------------------------------------
    def _stop_check(self, params: SamplingParams):
        if not params.stop:
            return None
        longest = max(map(len, params.stop))
        # a stop string not in the text before must end in the newest token's text: only the tail is decoded
        return lambda row, seq: any(s in tail_text(self.decode, seq.tokens, longest) for s in params.stop)

    def _steps(self, prompts, params):
        params = params or SamplingParams()
        if self.tp.size > 1 and not params.greedy and params.seed is None:
            # every rank must sample the same tokens: draw one seed on rank 0 and share it
            params = replace(params, seed=self.tp.broadcast_object(secrets.randbits(63)))
        ids = self.encode(prompts)
        self.last_timings = Timings()
        return ids, params, self.engine.run(ids, params, self.eos_token_ids, self.pad_token_id,
                                            self._stop_check(params), self.last_timings)

    def continuation_text(self, prompt: list[int], tokens: list[int]) -> str:
        """The text the new tokens add to the prompt's: decoding them alone would lose a leading space with
        tokenizers (SentencePiece, WordPiece) that mark word starts on the token."""
        head, full = self.decode(prompt), self.decode(prompt + tokens)
        return full[len(head):] if full.startswith(head) else self.decode(tokens)

    def _finish(self, seq, params) -> Completion:
        text, _ = cut_at_stop(self.continuation_text(seq.prompt, seq.tokens), params.stop or ())
        return Completion(text, list(seq.tokens), seq.finish_reason or "length", seq.prompt)

    def generate(self, prompts, params: SamplingParams | None = None) -> list[Completion]:
        ids, params, steps = self._steps(prompts, params)
        seqs = []
        for seqs, _ in steps:  # noqa: B007 - the last step's sequences are the result
            pass
        if self.tp.size > 1:  # identical logits on every rank make identical tokens; check it once a request
            self.tp.check_agree([s.tokens for s in seqs], "the generated tokens")
        return [self._finish(s, params) for s in seqs]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces of one prompt's continuation as tokens are decoded."""
        ids, params, steps = self._steps(prompt, params)
        if len(ids) != 1:
            raise InputError(f"stream takes one prompt, got {len(ids)}")
        stops, reader, text, sent = params.stop or (), TextReader(self.decode, ids[0]), "", 0
        for seqs, _ in steps:
            seq = seqs[0]
            done = seq.finish_reason is not None
            text += reader.feed(seq.tokens, final=done)
            shown, stopped = cut_at_stop(text, stops)
            # text that may be the start of a stop string waits: the next tokens may complete it
            ready = len(shown) if done or stopped else len(text) - stop_prefix_len(text, stops)
            if ready > sent:
                yield shown[sent:ready]
                sent = ready

    def score(self, prompts) -> list[torch.Tensor]:
        """Log-probability of every token after the first, given its prefix: one [len - 1] tensor a prompt."""
        return self.engine.score(self.encode(prompts), self.pad_token_id)
