"""Perplexity of a text under a model, built on `LLM.score`, with a sliding window past the context.

`zinfer perplexity FILE [--model M] [--quant-bits B] [--quant-group-size G]`
"""

import argparse
import json
import math
import time
from pathlib import Path

from zinfer.api import LLM
from zinfer.errors import InputError

SAMPLE_TEXT = Path(__file__).parent / "data" / "declaration.txt"


def perplexity(llm: LLM, text: str, window: int | None = None, stride: int | None = None) -> dict:
    """exp(mean negative log-likelihood) of every token after the first.

    Windows of `window` tokens (default: the model's context) advance by `stride` (default: half a window);
    each token is scored once, by the first window in which it has at least `window - stride` tokens of
    context (the first window scores everything it holds).
    """
    ids = llm.encode([text])[0]
    if len(ids) < 2:
        raise InputError("perplexity needs a text of at least two tokens")
    window = min(window or llm.model.max_positions, llm.model.max_positions)
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise InputError(f"stride must be in [1, window={window}], got {stride}")
    nll, count, scored_to = 0.0, 0, 1  # tokens [1, scored_to) are scored
    begin = 0
    while scored_to < len(ids):
        end = min(begin + window, len(ids))
        logprobs = llm.score([ids[begin:end]])[0]  # logprob of ids[begin + 1 .. end - 1]
        fresh = logprobs[scored_to - begin - 1:]
        nll -= fresh.double().sum().item()
        count += fresh.numel()
        scored_to = end
        begin = min(begin + stride, scored_to - 1)  # the next unscored token needs at least one of context
    return {"perplexity": math.exp(nll / count), "tokens": count, "window": window, "stride": stride,
            "nll": nll / count}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from zinfer.cli import add_model_arguments, positive_int

    p = subparsers.add_parser(
        "perplexity", help="perplexity of a text file (sliding window past the context)",
        description="Perplexity of FILE under the model: exp of the mean negative log-likelihood of every "
                    "token after the first. Texts longer than the context are scored with a sliding window.")
    p.add_argument("file", nargs="?", default=str(SAMPLE_TEXT),
                   help=f"text file (default: the public-domain sample {SAMPLE_TEXT.name} shipped with zinfer)")
    add_model_arguments(p)
    p.add_argument("--quant-bits", "--quant_bits", type=int, choices=(4, 8, 16), default=16)
    p.add_argument("--quant-group-size", "--quant_group_size", type=positive_int, default=64)
    p.add_argument("--quant-lm-head", "--quant_lm_head", action="store_true",
                   help="with --quant-bits 4 or 8: pack the LM head too (by default it stays dense)")
    p.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="with --quant-bits 4 or 8: fit the quantized weights to the inputs each layer sees on this "
                        "text (zinfer.calibrate) instead of to the weights alone; use a text other than FILE")
    p.add_argument("--window", type=positive_int, default=None, help="tokens per window (default: context)")
    p.add_argument("--stride", type=positive_int, default=None, help="tokens a window advances (default: half)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise InputError(f"no such text file: {path}")
    calibration = None
    if args.calibration is not None:
        calibration = Path(args.calibration)
        if args.quant_bits == 16:
            raise InputError("--calibration fits quantized weights: give --quant-bits 4 or 8 as well")
        if args.quant_lm_head:
            raise InputError("--calibration fits the decoder layers only: drop --quant-lm-head with it")
        if not calibration.is_file():
            raise InputError(f"no such calibration text file: {calibration}")
    llm = LLM(args.model, dtype=args.dtype, device=args.device, dummy=args.dummy,
              quant_bits=16 if calibration else args.quant_bits, quant_group_size=args.quant_group_size,
              quant_lm_head=args.quant_lm_head)
    if calibration:
        from zinfer.calibrate import calibrate_quantize
        from zinfer.quant import QuantSpec

        calibrate_quantize(llm, calibration.read_text(encoding="utf-8"),
                           QuantSpec(bits=args.quant_bits, group_size=args.quant_group_size))
    start = time.perf_counter()
    result = perplexity(llm, path.read_text(encoding="utf-8"), args.window, args.stride)
    spec = llm.quant  # what the model holds: a saved quantized checkpoint brings its own format
    result.update(file=str(path), model=llm.source.name, quant_bits=spec.bits if spec else 16,
                  quant_group_size=spec.group_size if spec else None, quant_lm_head=llm.quant_lm_head,
                  calibration=args.calibration,
                  seconds=time.perf_counter() - start)
    if args.json:
        print(json.dumps(result))
    else:
        calibrated = f", calibrated on {args.calibration}" if args.calibration else ""
        calibrated += ", LM head packed" if llm.quant_lm_head else ""
        print(f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
              f"(window {result['window']}, stride {result['stride']}, quant_bits {result['quant_bits']}{calibrated})")
    return 0


def register(subparsers) -> None:
    add_parser(subparsers).set_defaults(run=run)
