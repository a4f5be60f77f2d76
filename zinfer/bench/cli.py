"""`zinfer bench` (the seed's run_generation, one run or a sweep) and `zinfer compare` (zinfer vs peers).

Every flag of DeepSpeed's ZeRO-Inference `run_model.py` is here, in its dash spelling and the underscore
spelling DeepSpeed users' scripts use (`--batch-size` and `--batch_size`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace

from zinfer.api import DTYPES
from zinfer.bench.compare import COLUMNS, compare, describe
from zinfer.bench.metrics import BenchConfig
from zinfer.bench.peers import PEER_NAMES, select_peers
from zinfer.bench.plot import format_table, plot_sweep
from zinfer.bench.run import is_rank_zero, load_bench_llm, run_generation
from zinfer.cli import HelpFormatter, positive_int
from zinfer.errors import InputError

SWEEPABLE = [f.name for f in fields(BenchConfig) if f.type in (int, "int")]
REUSES_MODEL = {"batch_size", "prompt_len", "gen_len", "loops", "verbose"}  # sweeps that need no reload
SWEEP_COLUMNS = ["prefill_latency", "prefill_throughput", "decode_latency", "decode_throughput",
                 "total_throughput", "gpu_peak_mem", "decode_gb_s", "decode_ceiling_ratio"]

BENCH_EXAMPLES = """\
examples:
  zinfer bench --model ./tiny-llama --prompt-len 32 --gen-len 8 --batch-size 4 --json
  zinfer bench --model facebook/opt-66b --dummy --cpu-offload --quant_bits 4 --kv_offload --batch_size 64
  zinfer bench --model llama-3-8b --dummy --sweep batch_size=1,8,32,128 --plot bs.png

Metrics are the seed's, from the last of --loops runs: prefill throughput = B*P/prefill_latency,
decode throughput = B*(G-1)/decode_latency, total throughput = B*G/total_latency. The four-line log goes
to --output-file (auto: ds-<model>-bs<B>-prompt<P>-gen<G>-n<N>x<G>-<gpu|cpu|disk>[-kv_offload][-w_quant].log).
"""

COMPARE_EXAMPLES = """\
examples:
  zinfer compare --model ./my-checkpoint --batch-size 8 --prompt-len 128 --gen-len 32
  zinfer compare --model llama-3-8b --dummy --cpu-offload --json

Peers: transformers (eager generate), accelerate (cpu_offload / disk_offload / device_map=auto; GPU only),
deepspeed (ZeRO-3 as get_ds_model builds it; GPU only). A peer that cannot run is listed as skipped.
"""


def _names(flag: str) -> list[str]:
    """`--batch-size` plus the `--batch_size` spelling of DeepSpeed's scripts."""
    return [f"--{flag}", f"--{flag.replace('-', '_')}"] if "-" in flag else [f"--{flag}"]


def sweep_spec(text: str) -> tuple[str, list[int]]:
    name, sep, values = text.partition("=")
    field = name.strip().replace("-", "_")
    if not sep or field not in SWEEPABLE:
        raise argparse.ArgumentTypeError(f"expected FIELD=V1,V2,... with FIELD one of {', '.join(SWEEPABLE)}; "
                                         f"got {text!r}")
    try:
        numbers = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sweep values must be integers, got {values!r}") from None
    if not numbers:
        raise argparse.ArgumentTypeError(f"no values to sweep in {text!r}")
    return field, numbers


# --- flags ----------------------------------------------------------------------------------------------

def add_model_flags(parser) -> None:
    g = parser.add_argument_group("model and device")
    g.add_argument("--model", "-m", default=BenchConfig.model, metavar="NAME_OR_PATH",
                   help=f"Hugging Face directory, .gguf file, built-in config (with --dummy; a hub id such as "
                        f"facebook/opt-66b names the built-in opt-66b) or hub id (default: {BenchConfig.model})")
    g.add_argument("--dummy", action="store_true", help="random weights of the model's shape (no checkpoint)")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: auto)")
    g.add_argument("--dtype", default="auto", choices=[*DTYPES, "auto"], metavar="DTYPE",
                   help="float16, bfloat16 or float32 (default: auto = float16 on a GPU as the seed, float32 "
                        "on a CPU)")
    g.add_argument(*_names("no-compile"), action="store_true",
                   help="run decode steps eagerly instead of replaying a CUDA graph")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="seed of the --dummy weights")


def add_workload_flags(parser) -> None:
    d = BenchConfig()
    w = parser.add_argument_group("workload (the seed's flags; --x_y spellings also accepted)")
    w.add_argument(*_names("batch-size"), type=positive_int, default=d.batch_size, metavar="B",
                   help=f"prompts per batch, total across all GPUs (default: {d.batch_size})")
    w.add_argument(*_names("prompt-len"), type=positive_int, default=d.prompt_len, metavar="P",
                   help=f"tokens per prompt (default: {d.prompt_len})")
    w.add_argument(*_names("gen-len"), type=positive_int, default=d.gen_len, metavar="G",
                   help=f"tokens generated per prompt (default: {d.gen_len})")
    w.add_argument("--loops", type=positive_int, default=d.loops, metavar="N",
                   help=f"timed runs; the last one counts, as in the seed (default: {d.loops})")
    p = parser.add_argument_group("placement")
    where = p.add_mutually_exclusive_group()
    where.add_argument(*_names("cpu-offload"), action="store_true", help="weights in CPU memory, streamed")
    where.add_argument(*_names("disk-offload"), action="store_true", help="weights on NVMe (--offload-dir)")
    where.add_argument("--offload", choices=["cpu", "nvme"], help="same as --cpu-offload / --disk-offload")
    p.add_argument(*_names("offload-dir"), default=d.offload_dir, metavar="DIR",
                   help=f"NVMe offload directory (default: {d.offload_dir})")
    p.add_argument(*_names("pin-memory"), type=int, choices=[0, 1], default=1,
                   help="pin offloaded weights in host memory (default: 1; the seed's default is 0)")
    p.add_argument(*_names("kv-offload"), action="store_true", help="KV cache in CPU memory")
    p.add_argument(*_names("pin-kv-cache"), action="store_true", help="pin the offloaded KV cache")
    p.add_argument(*_names("async-kv-offload"), action="store_true", help="non-blocking KV cache copies")
    p.add_argument(*_names("quant-bits"), type=int, choices=[4, 8, 16], default=d.quant_bits,
                   help="weight bits: 4, 8 or 16 (= not quantized; default)")
    p.add_argument(*_names("quant-group-size"), type=positive_int, default=d.quant_group_size, metavar="N",
                   help=f"weights per quantization group (default: {d.quant_group_size})")
    p.add_argument(*_names("quant-lm-head"), action="store_true",
                   help="with --quant-bits 4 or 8: pack the LM head too (by default it stays dense)")
    p.add_argument(*_names("num-nodes"), type=positive_int, default=d.num_nodes, metavar="N",
                   help="nodes; nodes x GPUs per node > 1 runs tensor-parallel")
    p.add_argument(*_names("num-gpus-per-node"), type=positive_int, default=d.num_gpus_per_node, metavar="N",
                   help="GPUs per node")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="the ZeRO-Inference run_generation benchmark",
                              description="Time generation of a batch of identical prompts, as DeepSpeed's "
                                          "ZeRO-Inference run_generation does, and report its metrics, the "
                                          "achieved GB/s and TFLOP/s and their ratio to this machine's ceilings.",
                              epilog=BENCH_EXAMPLES, formatter_class=HelpFormatter)
    add_model_flags(p)
    add_workload_flags(p)
    o = p.add_argument_group("output")
    o.add_argument(*_names("output-file"), *_names("log-file"), dest="output_file", default="auto", metavar="FILE",
                   help="append the seed's log here (default: auto = named from the configuration)")
    o.add_argument("--verbose", type=int, choices=[0, 1, 2], default=BenchConfig.verbose,
                   help="0 quiet, 1 metrics, 2 metrics and generated text (default: 2)")
    o.add_argument("--json", action="store_true", help="print one JSON object (human output goes to stderr)")
    o.add_argument("--sweep", type=sweep_spec, metavar="FIELD=V1,V2,...",
                   help=f"run once per value of an int field ({', '.join(SWEEPABLE)}), print a table, plot")
    o.add_argument("--plot", metavar="FILE", help="the sweep's PNG (default: sweep-<FIELD>.png)")
    # the deepspeed launcher passes --local_rank to scripts; accepted so their command lines still parse
    p.add_argument(*_names("local-rank"), type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(run=run_bench)
    return p


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="the same workload on zinfer and on peers (transformers, ...)",
                              description="Run the bench workload on zinfer and on each peer system importable "
                                          "here, and print each one's figures and zinfer's throughput ratio.",
                              epilog=COMPARE_EXAMPLES, formatter_class=HelpFormatter)
    add_model_flags(p)
    add_workload_flags(p)
    p.add_argument("--peers", type=comma_list(PEER_NAMES, "peer"), default=None, metavar="NAMES",
                   help=f"comma-separated peers to run (default: all of {', '.join(PEER_NAMES)})")
    p.add_argument("--json", action="store_true", help="print one JSON object with a list of rows")
    p.set_defaults(run=run_compare)
    return p


def comma_list(known, what: str):
    """An argparse type: comma-separated names, each one of `known` (else the error names the unknown ones)."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
        return names
    return parse


def register(subparsers) -> None:
    add_bench_parser(subparsers)
    add_compare_parser(subparsers)


# --- running --------------------------------------------------------------------------------------------

def bench_config(args: argparse.Namespace) -> BenchConfig:
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig) if hasattr(args, f.name)}
    values["cpu_offload"] = args.cpu_offload or args.offload == "cpu"
    values["disk_offload"] = args.disk_offload or args.offload == "nvme"
    return checked(BenchConfig, **values)


def checked(make, *args, **kwargs):
    """BenchConfig's ValueError is the user's to fix: report it as one line, exit 2."""
    try:
        return make(*args, **kwargs)
    except ValueError as e:
        raise InputError(str(e)) from e


def run_options(args: argparse.Namespace) -> dict:
    return dict(compile=not args.no_compile, seed=args.seed, pin_memory=bool(args.pin_memory))


def run_bench(args: argparse.Namespace) -> int:
    config = bench_config(args)
    if args.sweep is not None:
        return run_sweep(args, config)
    out = sys.stderr if args.json else sys.stdout
    result = run_generation(config, args.device, args.dtype, out=out, **run_options(args))
    if args.json and is_rank_zero():
        print(json.dumps(result))
    return 0


def run_sweep(args: argparse.Namespace, config: BenchConfig) -> int:
    field, values = args.sweep
    configs = [checked(replace, config, **{field: v}) for v in values]  # every value is checked before any run
    out = sys.stderr if args.json else sys.stdout
    options = run_options(args)
    llm = load_bench_llm(configs[0], args.device, args.dtype, **options) if field in REUSES_MODEL else None
    rows = []
    for c in configs:
        print(f"--- {field}={getattr(c, field)}", file=out)
        rows.append(run_generation(c, args.device, args.dtype, llm=llm, out=out, **options))
    if not is_rank_zero():
        return 0
    plot = plot_throughput(rows, field, args.plot or f"sweep-{field}.png")
    if args.json:
        print(json.dumps({"sweep": field, "values": values, "plot": plot, "rows": rows}))
    else:
        print(format_table(rows, [field, *SWEEP_COLUMNS]))
        print(f"plot: {plot}")
    return 0


def plot_throughput(rows: list[dict], field: str, path: str) -> str:
    """Decode and total throughput against the swept value, each with its ceiling dashed beside it (the ceiling
    moves with the batch and lengths, so it is a line of its own rather than one horizontal rule)."""
    points = [{field: row[field], "series": metric, "tokens/s": row[metric], "ceiling": row[f"{metric}_ceiling"]}
              for row in rows for metric in ("decode_throughput", "total_throughput")]
    bounds = ", ".join(dict.fromkeys(row["decode_bound"] for row in rows))  # the decode floor's slowest link
    first = rows[0]
    title = f"{first['model']} on {first['device']} ({first['dtype']})"
    return plot_sweep(points, field, "tokens/s", path, ceiling="ceiling", title=title, series="series",
                      ceiling_label=f"decode bound: {bounds}")


def run_compare(args: argparse.Namespace) -> int:
    config = bench_config(args)
    options = run_options(args)
    report = compare(config, args.device, args.dtype, peers=select_peers(args.peers, options["pin_memory"]),
                     **options)
    if args.json:
        print(json.dumps(report))
    else:
        print("workload: " + describe(report["workload"]))
        print(format_table(report["rows"], COLUMNS))
        print("notes:\n" + "\n".join(f"  {n}" for n in report["notes"]))
    ours = report["rows"][0]
    if ours["status"] != "ok":  # zinfer could not run the workload (an option not implemented yet, out of memory)
        print(f"zinfer: error: zinfer failed on the workload {describe(report['workload'])}: {ours['note']}",
              file=sys.stderr)
        return 2
    return 0
