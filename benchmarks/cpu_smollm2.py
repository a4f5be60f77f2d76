"""CPU case: SmolLM2-135M-Instruct fp32, batch 1, 64 new tokens: zinfer vs transformers `generate`, same run.

python benchmarks/cpu_smollm2.py [--compile] [--quant-bits 4|8]   (prints one JSON line; both systems load the same
converted checkpoint; with --quant-bits zinfer's weights are group-wise quantized (group 64), transformers' stay fp32)
"""

import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import zinfer
from zinfer.weights.default_model import default_model_dir

PROMPT, NEW, REPEATS = "Paris is the capital city of", 64, 5
COMPILE = "--compile" in sys.argv  # torch.compile the decode step (about 40 s once)
QUANT_BITS = int(sys.argv[sys.argv.index("--quant-bits") + 1]) if "--quant-bits" in sys.argv else 16


def timed(fn):
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    directory = default_model_dir()
    llm = zinfer.LLM(str(directory), device="cpu", dtype="float32", compile=COMPILE, quant_bits=QUANT_BITS)
    tok = AutoTokenizer.from_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt")
    params = zinfer.SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    llm.generate([PROMPT], params)

    def run_hf():
        with torch.no_grad():
            hf.generate(**ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id)

    run_hf()
    z = timed(lambda: llm.generate([PROMPT], params))
    h = timed(run_hf)
    same = llm.generate([PROMPT], params)[0].token_ids == hf.generate(
        **ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids[
            "input_ids"].shape[1]:].tolist()
    print(json.dumps({"compile": COMPILE, "quant_bits": QUANT_BITS, "zinfer_tok_s": NEW / z,
                      "transformers_tok_s": NEW / h, "speedup": h / z, "same_tokens": same,
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
