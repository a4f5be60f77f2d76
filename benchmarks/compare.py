"""`zinfer compare` on the two workloads issue 8 names, as named cases: zinfer vs every peer importable here.

Run on the device:  python benchmarks/compare.py [--cases llama3-8b-offload,llama3-8b-b1]
                    [--peers transformers,accelerate,deepspeed] [--loops 3] [--model llama-3-8b]
Writes $OUT/compare_<case>.json (or ./compare_<case>.json) per case: the `zinfer compare --json` object (workload,
rows with zinfer's throughput ratios, notes) plus the case, its flags and the GPU; prints each case's table.
Peers that cannot run here (not installed, no GPU) are rows with status "skipped"; a peer's failure is a
"failed" row. Exits 1 if zinfer did not run a case.
"""

import argparse
import json
import os
import sys
import traceback

import torch

from zinfer.bench.cli import comma_list
from zinfer.bench.compare import COLUMNS, compare, describe
from zinfer.bench.metrics import BenchConfig
from zinfer.bench.peers import PEER_NAMES, select_peers
from zinfer.bench.plot import format_table

# issue 8's command lines: `zinfer compare --model llama-3-8b --dummy <flags>`
CASES = {
    # weights streamed from pinned CPU memory: vs accelerate.cpu_offload and ZeRO-3 offload_param cpu
    "llama3-8b-offload": dict(config=dict(cpu_offload=True, batch_size=16, prompt_len=512, gen_len=32),
                              dtype="auto", flags="--cpu-offload --batch-size 16 --prompt-len 512 --gen-len 32"),
    # all weights in HBM, batch 1: the memory-bound decode step
    "llama3-8b-b1": dict(config=dict(batch_size=1, prompt_len=128, gen_len=128), dtype="bfloat16",
                         flags="--dtype bfloat16 --batch-size 1 --prompt-len 128 --gen-len 128"),
}


def run_case(name: str, args) -> dict:
    case = CASES[name]
    config = BenchConfig(model=args.model, dummy=True, loops=args.loops, verbose=0, **case["config"])
    report = compare(config, args.device, case["dtype"], peers=select_peers(args.peers))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(case=name, command=f"zinfer compare --model {args.model} --dummy {case['flags']}", gpu=gpu,
                torch=torch.__version__, **report)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=comma_list(CASES, "case"), default=list(CASES), help="comma-separated")
    ap.add_argument("--peers", type=comma_list(PEER_NAMES, "peer"), default=None,
                    help=f"comma-separated (default: all of {', '.join(PEER_NAMES)})")
    ap.add_argument("--loops", type=int, default=3, help="timed runs per system; the last counts, as the seed")
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    out_dir = os.environ.get("OUT", ".")
    failed = []
    for name in args.cases:
        try:
            result = run_case(name, args)
        except Exception as e:  # a bug in zinfer on one case: record it, run the next case
            traceback.print_exc()
            result = dict(case=name, error=f"{type(e).__name__}: {e}")
        path = os.path.join(out_dir, f"compare_{name}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\n=== {name}: {path}")
        if "error" in result:
            failed.append(name)
            print(f"error: {result['error']}")
            continue
        print("workload: " + describe(result["workload"]))
        print(format_table(result["rows"], COLUMNS))
        print("\n".join(f"  {n}" for n in result["notes"]), flush=True)
        if result["rows"][0]["status"] != "ok":
            failed.append(name)
    if failed:
        print(f"zinfer did not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
