"""`zinfer bench` and `zinfer compare`: the seed's flags, metrics, log, sweep plot and peer table, on CPU."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import make_checkpoint, save_word_tokenizer
from zinfer import cli
from zinfer.bench import cli as bench_cli
from zinfer.bench import compare, run
from zinfer.bench.cli import bench_config
from zinfer.bench.metrics import BenchConfig
from zinfer.bench.peers import PeerTimings, ds_zero3_config
from zinfer.bench.plot import sweep_figure
from zinfer.errors import InputError

SEED_METRICS = {"prefill_latency", "prefill_throughput", "decode_latency", "decode_throughput", "total_latency",
                "total_throughput", "gpu_peak_mem"}
CEILINGS = {"device_name": "test cpu", "device_copy_bytes_per_s": 10e9, "matmul_flops_per_s": 100e9}
SMALL = ["--batch-size", "2", "--prompt-len", "8", "--gen-len", "4", "--loops", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama named `tiny-llama` (the log's auto name uses it), with a word tokenizer."""
    directory = tmp_path_factory.mktemp("models") / "tiny-llama"
    hf = make_checkpoint("llama", directory)
    save_word_tokenizer(directory)
    return directory, hf


@pytest.fixture(autouse=True)
def fixed_ceilings(monkeypatch):
    # measuring takes a second and varies; the roofline arithmetic is checked against these numbers
    monkeypatch.setattr(run, "get_ceilings", lambda device, disk_dir=None: dict(CEILINGS))


def main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- metrics and log ------------------------------------------------------------------------------------

def test_json_metrics_follow_seed_formulas_from_timings(tiny, tmp_path, capsys, monkeypatch):
    directory, hf = tiny
    loops = iter([(0.5, 3.0), (0.2, 2.2)])  # loop 0 is warm-up: the seed reports the last loop
    monkeypatch.setattr(run, "loop_timings", lambda llm: next(loops))
    log = tmp_path / "bench.log"
    code, out, _ = main(capsys, "bench", "--model", directory, "--batch-size", 4, "--prompt-len", 16,
                        "--gen-len", 9, "--loops", 2, "--json", "--output-file", log)
    assert code == 0
    r = json.loads(out)
    b, p, g = 4, 16, 9
    assert r["prefill_latency"] == 0.2 and r["total_latency"] == 2.2 and r["gpu_peak_mem"] == 0
    assert r["prefill_throughput"] == pytest.approx(b * p / 0.2)
    assert r["decode_latency"] == pytest.approx(2.0)
    assert r["decode_throughput"] == pytest.approx(b * (g - 1) / 2.0)
    assert r["total_throughput"] == pytest.approx(b * g / 2.2)
    assert (r["batch_size"], r["prompt_len"], r["gen_len"], r["loops"]) == (b, p, g, 2)
    assert (r["device"], r["dtype"], r["output_file"]) == ("cpu", "float32", str(log))
    # decode bytes: every weight but the (untied) embedding table, fp32, + K and V at the mean length P + G/2
    weights = 4 * sum(t.numel() for n, t in hf.named_parameters() if "embed_tokens" not in n)
    kv = 2 * 2 * 4 * 16 * 4 * b * (p + g / 2)  # K+V, layers, kv heads, head dim, fp32 bytes, batch
    assert r["decode_bytes_per_step"] == weights + int(kv)
    assert r["decode_bound"] == "cpu_memory"
    assert r["decode_gb_s"] == pytest.approx(r["decode_bytes_per_step"] * (g - 1) / 2.0 / 1e9)
    assert r["decode_ceiling_ratio"] == pytest.approx(r["decode_gb_s"] * 1e9 / CEILINGS["device_copy_bytes_per_s"])
    assert r["prefill_tflops"] == pytest.approx(r["prefill_flops"] / 0.2 / 1e12)
    assert r["prefill_ceiling_tflops"] == pytest.approx(0.1)
    assert log.read_text().splitlines()[1] == ("peak gpu mem: 0.000 GB\tprefill latency: 0.200 s\t"
                                               "prefill throughput: 320.000 token/s")


def test_streamed_layers_count_in_the_decode_floor(tiny, tmp_path, capsys):
    # streamed layers' modules hold empty tensors between uses: their bytes and matmuls must still count
    directory, hf = tiny
    args = ["bench", "--model", directory, *SMALL, "--json", "--output-file", tmp_path / "b.log"]
    code, out, _ = main(capsys, *args)
    assert code == 0
    resident = json.loads(out)
    code, out, _ = main(capsys, *args, "--disk-offload", "--offload-dir", tmp_path / "nvme")
    assert code == 0
    streamed = json.loads(out)
    layers = hf.config.num_hidden_layers
    # the same work; streamed units are read whole, 256-byte aligned tensors in 4 KiB pages
    assert 0 <= streamed["decode_bytes_per_step"] - resident["decode_bytes_per_step"] <= layers * 4096 * 2
    assert streamed["prefill_flops"] == resident["prefill_flops"]
    assert streamed["decode_tflops"] > 0
    # packed int4 codes are half a byte a weight: flops count the weights, resident or streamed
    quant = ["--quant-bits", "4", "--quant-group-size", "16"]
    for where in ([], ["--disk-offload", "--offload-dir", tmp_path / "nvme4"]):
        code, out, _ = main(capsys, *args, *quant, *where)
        assert code == 0
        assert json.loads(out)["prefill_flops"] == resident["prefill_flops"], where


def test_auto_output_file_writes_seed_log_in_cwd(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = main(capsys, "bench", "--model", tiny[0], *SMALL, "--verbose", 1)
    assert code == 0
    log = tmp_path / "ds-tiny-llama-bs2-prompt8-gen4-n1x1-gpu.log"
    lines = log.read_text().splitlines()
    number = r"\d+\.\d{3}"
    patterns = [
        rf"model size: {number} GB\tcache size: {number} GB\thidden size \(p\): {number} GB",
        rf"peak gpu mem: {number} GB\tprefill latency: {number} s\tprefill throughput: {number} token/s",
        rf"decode latency: {number} s\tdecode throughput: {number} token/s",
        rf"total latency: {number} s\ttotal throughput: {number} token/s",
    ]
    assert len(lines) == 4 and all(re.fullmatch(pat, line) for pat, line in zip(patterns, lines))
    assert "\n".join(lines) in out  # verbose 1 prints the record
    assert "Outputs:" not in out  # the generated text is verbose 2 only


def test_verbose_2_prints_generated_text(tiny, tmp_path, capsys):
    args = ["--batch-size", 3, "--prompt-len", 8, "--gen-len", 4, "--loops", 1, "--output-file", tmp_path / "x.log"]
    code, out, _ = main(capsys, "bench", "--model", tiny[0], *args)
    assert code == 0
    # the seed: rows 0, (n-1)//2, n-1, each followed by 70 dashes, then print's blank line, then the log record;
    # the word tokenizer knows none of the prompt's words, so the prompt is synthetic ids: words w3..w210
    row = r"w\d+( w\d+)+\n-{70}\n"
    assert re.search(rf"^Outputs:\n-{{70}}\n0: {row}1: {row}2: {row}\nmodel size: ", out, re.M)


class NoTokenizer:
    tokenizer = None


@pytest.mark.parametrize("n, rows", [(1, [0, 0, 0]), (2, [0, 0, 1]), (5, [0, 2, 4])])
def test_verbose_2_rows_are_the_seeds_list(n, rows, capsys):
    # the seed's [0, (n-1)//2, n-1] is a list: small batches repeat rows, as its output does
    completions = [SimpleNamespace(token_ids=[i]) for i in range(n)]
    assert run._show_outputs(NoTokenizer(), [[]] * n, completions, sys.stdout) == [f"[{i}]" for i in rows]
    rule = "-" * 70
    assert capsys.readouterr().out == "\n".join(["Outputs:", rule, *(f"{i}: [{i}]\n{rule}" for i in rows), "", ""])


# --- flags ----------------------------------------------------------------------------------------------

DASH = ["--batch-size", "4", "--prompt-len", "8", "--gen-len", "2", "--cpu-offload", "--offload-dir", "/x",
        "--num-nodes", "1", "--num-gpus-per-node", "2", "--output-file", "f.log", "--kv-offload", "--quant-bits", "4",
        "--quant-group-size", "32", "--quant-lm-head", "--pin-kv-cache", "--async-kv-offload", "--pin-memory", "0",
        "--no-compile"]


def test_underscore_aliases_parse_like_dash_flags():
    parser = cli.build_parser()
    dash = parser.parse_args(["bench", *DASH])
    underscore = parser.parse_args(["bench", *["--" + a[2:].replace("-", "_") if a.startswith("--") else a
                                               for a in DASH]])
    assert vars(dash) == vars(underscore)
    assert parser.parse_args(["bench", "--log_file", "f.log"]).output_file == "f.log"  # the seed's own name
    config = bench_config(dash)
    assert config == BenchConfig(batch_size=4, prompt_len=8, gen_len=2, cpu_offload=True, offload_dir="/x",
                                 num_gpus_per_node=2, output_file="f.log", kv_offload=True, quant_bits=4,
                                 quant_group_size=32, quant_lm_head=True, pin_kv_cache=True,
                                 async_kv_offload=True)
    with pytest.raises(InputError, match="quant_lm_head .* needs quant_bits 4 or 8"):
        bench_config(parser.parse_args(["bench", "--quant-lm-head"]))
    assert bench_config(parser.parse_args(["bench", "--offload", "nvme"])).disk_offload


def test_flags_map_to_engine_options():
    cpu = run.engine_options(BenchConfig(cpu_offload=True, kv_offload=True, quant_bits=4, num_nodes=2,
                                         num_gpus_per_node=4, pin_kv_cache=True), pin_memory=False)
    assert cpu == dict(offload="cpu", pin_memory=False, quant_bits=4, quant_group_size=64, quant_lm_head=False,
                       kv_offload=True, pin_kv_cache=True, async_kv_offload=False, tp=8)
    disk = run.engine_options(BenchConfig(disk_offload=True, offload_dir="~/nvme"))
    assert disk["offload"] == "nvme" and disk["offload_dir"] == os.path.expanduser("~/nvme")
    assert "offload" not in run.engine_options(BenchConfig())
    # DeepSpeed users' hub ids name the built-in shape when the weights are dummy
    assert run.model_name(BenchConfig(model="facebook/opt-66b", dummy=True)) == "opt-66b"
    assert run.model_name(BenchConfig(model="facebook/opt-66b")) == "facebook/opt-66b"


@pytest.mark.parametrize("argv, message", [
    (["--quant-bits", "3"], "argument --quant-bits/--quant_bits: invalid choice: 3"),
    (["--batch-size", "0"], "argument --batch-size/--batch_size: must be >= 1, got 0"),
    (["--cpu-offload", "--disk-offload"], "not allowed with argument --cpu-offload/--cpu_offload"),
    (["--verbose", "3"], "argument --verbose: invalid choice: 3"),
    (["--sweep", "model=1,2"], "FIELD one of batch_size, prompt_len"),
    (["--sweep", "batch_size=1,x"], "sweep values must be integers, got '1,x'"),
    (["--sweep", "batch_size=1,0", "--model", "MODEL"], "BenchConfig.batch_size must be a positive int, got 0"),
    (["--prompt-len", "120", "--gen-len", "20", "--model", "MODEL"],
     "prompt_len 120 + gen_len 20 needs 139 positions, more than the model's context of 128"),
    # tensor parallelism: refused until it lands, and then only under torchrun; either way a user error
    (["--num-gpus-per-node", "2", "--model", "MODEL"], "tp"),
])
def test_bad_flags_exit_2_with_message(argv, message, tiny, capsys):
    argv = [str(tiny[0]) if a == "MODEL" else a for a in argv]
    code, out, err = main(capsys, "bench", *argv)
    assert code == 2, err
    assert err.startswith("zinfer: error: ") and message in err and "Traceback" not in err


# --- sweep ----------------------------------------------------------------------------------------------

def test_sweep_prints_table_and_writes_png(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = main(capsys, "bench", "--model", tiny[0], *SMALL, "--verbose", 0, "--sweep", "batch_size=1,3")
    assert code == 0
    assert (tmp_path / "sweep-batch_size.png").read_bytes()[:8] == PNG_SIGNATURE
    table = out[out.index("batch_size  "):].splitlines()
    assert table[0].split()[:3] == ["batch_size", "prefill_latency", "prefill_throughput"]
    assert [row.split()[0] for row in table[2:4]] == ["1", "3"]
    assert out.rstrip().endswith("plot: sweep-batch_size.png")
    assert {p.name for p in tmp_path.glob("*.log")} == {"ds-tiny-llama-bs1-prompt8-gen4-n1x1-gpu.log",
                                                        "ds-tiny-llama-bs3-prompt8-gen4-n1x1-gpu.log"}


def test_sweep_json_with_plot_file(tiny, tmp_path, capsys):
    png = tmp_path / "gen.png"
    code, out, _ = main(capsys, "bench", "--model", tiny[0], *SMALL, "--sweep", "gen-len=2,5", "--plot", png,
                        "--output-file", tmp_path / "x.log", "--json")
    assert code == 0
    report = json.loads(out)  # human output went to stderr: stdout is one JSON object
    assert (report["sweep"], report["values"], report["plot"]) == ("gen_len", [2, 5], str(png))
    assert [r["gen_len"] for r in report["rows"]] == [2, 5] and all(SEED_METRICS <= set(r) for r in report["rows"])
    assert png.read_bytes()[:8] == PNG_SIGNATURE


def test_sweep_plot_draws_each_throughputs_ceiling(monkeypatch):
    pytest.importorskip("matplotlib")
    figures = []
    monkeypatch.setattr(bench_cli, "plot_sweep",
                        lambda rows, x, y, out_png, **kw: figures.append(sweep_figure(rows, x, y, **kw)) or out_png)
    rows = [dict(batch_size=b, model="m", device="cuda", dtype="float16", decode_bound=bound,
                 decode_throughput=10.0 * b, decode_throughput_ceiling=40.0 * b,
                 total_throughput=8.0 * b, total_throughput_ceiling=30.0 * b)
            for b, bound in ((1, "hbm"), (4, "pcie"))]
    assert bench_cli.plot_throughput(rows, "batch_size", "p.png") == "p.png"
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in figures[0].axes[0].lines}
    assert lines == {"series=decode_throughput": ([1, 4], [10.0, 40.0]),
                     "ceiling: series=decode_throughput (decode bound: hbm, pcie)": ([1, 4], [40.0, 160.0]),
                     "series=total_throughput": ([1, 4], [8.0, 32.0]),
                     "ceiling: series=total_throughput (decode bound: hbm, pcie)": ([1, 4], [30.0, 120.0])}


# --- compare --------------------------------------------------------------------------------------------

def test_compare_runs_zinfer_and_transformers_and_skips_the_rest(tiny, capsys):
    code, out, _ = main(capsys, "compare", "--model", tiny[0], *SMALL, "--json")
    assert code == 0
    report = json.loads(out)
    rows = {r["system"]: r for r in report["rows"]}
    assert list(rows) == ["zinfer", "transformers", "accelerate", "deepspeed"]
    assert rows["zinfer"]["status"] == rows["transformers"]["status"] == "ok"
    for system in ("zinfer", "transformers"):
        assert SEED_METRICS <= set(rows[system])
    ours, theirs = rows["zinfer"], rows["transformers"]
    assert theirs["zinfer_decode_ratio"] == pytest.approx(ours["decode_throughput"] / theirs["decode_throughput"])
    assert theirs["zinfer_total_ratio"] == pytest.approx(ours["total_throughput"] / theirs["total_throughput"])
    assert ours["zinfer_decode_ratio"] == 1.0
    assert rows["accelerate"]["status"] == "skipped" and "GPU" in rows["accelerate"]["note"]
    assert rows["deepspeed"]["status"] == "skipped"
    if sys.modules.get("deepspeed") is None:
        assert "cannot import deepspeed" in rows["deepspeed"]["note"]
    assert report["workload"] == dict(model=str(tiny[0]), batch_size=2, prompt_len=8, gen_len=4, loops=1,
                                      dtype="float32", device="cpu", offload="none", kv_offload=False,
                                      quant_bits=16, dummy=False)


def test_compare_table_with_dummy_weights(tiny, capsys):
    code, out, _ = main(capsys, "compare", "--model", tiny[0], *SMALL, "--dummy")
    assert code == 0
    lines = out.splitlines()
    header = lines[1].split()
    assert header == ["system", "status", "prefill_latency", "decode_throughput", "total_throughput",
                      "zinfer_decode_ratio", "zinfer_total_ratio"]
    assert [line.split()[:2] for line in lines[3:7]] == [["zinfer", "ok"], ["transformers", "ok"],
                                                         ["accelerate", "skipped"], ["deepspeed", "skipped"]]
    assert re.fullmatch(r"transformers\s+ok(\s+[\d.,]+){5}", lines[4])  # figures and both ratios
    assert "accelerate: skipped: accelerate offload streams weights to a GPU" in out
    assert "deepspeed: skipped: " in out
    assert "dummy weights: each system draws its own random values" in out


def test_compare_runs_only_the_peers_named(tiny, capsys):
    code, out, _ = main(capsys, "compare", "--model", tiny[0], *SMALL, "--peers", "transformers", "--json")
    assert code == 0
    assert [r["system"] for r in json.loads(out)["rows"]] == ["zinfer", "transformers"]
    code, _, err = main(capsys, "compare", "--model", tiny[0], "--peers", "transformers,vllm")
    assert code == 2 and "unknown peer vllm; choose from transformers, accelerate, deepspeed" in err


class FakePeer:
    """A peer that times nothing real: `fail` names the step that raises."""

    note = "fake"

    def __init__(self, name, fail=None):
        self.name, self.fail = name, fail

    def _step(self, step):
        if self.fail == step:
            raise KeyError(f"{self.name} broke in {step}")  # not an error a peer is known to raise

    def available(self):
        self._step("available")
        return True, ""

    def load(self, config, source, dtype, device):
        self._step("load")

    def generate(self, input_ids, attention_mask, gen_len):
        self._step("generate")
        return PeerTimings(0.1, 0.5)

    def unload(self):
        pass


def test_a_peer_that_raises_is_a_failed_row_and_the_others_run(tiny, capsys, monkeypatch):
    peers = [FakePeer("a", "available"), FakePeer("b", "generate"), FakePeer("c")]
    monkeypatch.setattr(bench_cli, "select_peers", lambda names, pin_memory=True: peers)
    code, out, _ = main(capsys, "compare", "--model", tiny[0], *SMALL)
    assert code == 0
    assert "a: failed: KeyError: 'a broke in available'" in out and "b: failed: KeyError: 'b broke in generate'" in out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[3:7]}
    assert rows == {"zinfer": "ok", "a": "failed", "b": "failed", "c": "ok"}


def test_zinfer_out_of_memory_is_one_line_naming_the_workload(tiny, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")

    monkeypatch.setattr(compare, "run_generation", out_of_memory)
    code, out, err = main(capsys, "compare", "--model", tiny[0], *SMALL, "--peers", "transformers", "--json")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (  # the last line: transformers' loading bar goes to stderr before it
        f"zinfer: error: zinfer failed on the workload model={tiny[0]}, batch_size=2, prompt_len=8, gen_len=4, "
        "loops=1, dtype=float32, device=cpu, offload=none, kv_offload=False, quant_bits=16, dummy=False: "
        "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB.")
    rows = json.loads(out)["rows"]  # the peers still ran
    assert [(r["system"], r["status"]) for r in rows] == [("zinfer", "failed"), ("transformers", "ok")]


def test_a_bug_in_zinfer_propagates_naming_the_workload(tiny, monkeypatch):
    monkeypatch.setattr(compare, "run_generation", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError) as info:
        compare.compare(BenchConfig(model=str(tiny[0]), batch_size=2, prompt_len=8, gen_len=4), "cpu", peers=[])
    assert info.value.__notes__ == [f"zinfer compare workload: model={tiny[0]}, batch_size=2, prompt_len=8, "
                                    "gen_len=4, loops=3, dtype=float32, device=cpu, offload=none, kv_offload=False, "
                                    "quant_bits=16, dummy=False"]


def test_select_peers_refuses_unknown_names():
    from zinfer.bench.peers import select_peers

    assert [p.name for p in select_peers(["deepspeed", "transformers"])] == ["transformers", "deepspeed"]
    with pytest.raises(ValueError, match=r"unknown peer vllm; choose from transformers, accelerate, deepspeed"):
        select_peers(["transformers", "vllm"])


def test_compare_benchmark_writes_one_json_per_case(tiny, tmp_path, monkeypatch, capsys):
    # benchmarks/compare.py on the CPU: its cases shrunk to the tiny model's size
    spec = importlib.util.spec_from_file_location("compare_bench", ROOT / "benchmarks" / "compare.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CASES", {
        "tiny": dict(config=dict(batch_size=2, prompt_len=8, gen_len=4), dtype="auto", flags="--batch-size 2"),
        "tiny-offload": dict(config=dict(cpu_offload=True, batch_size=1, prompt_len=8, gen_len=2), dtype="auto",
                             flags="--cpu-offload")})
    monkeypatch.setenv("OUT", str(tmp_path))
    code = bench.main(["--model", str(tiny[0]), "--peers", "transformers", "--loops", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "compare_tiny.json").read_text())
    assert report["case"] == "tiny" and report["command"] == f"zinfer compare --model {tiny[0]} --dummy --batch-size 2"
    assert [r["system"] for r in report["rows"]] == ["zinfer", "transformers"]
    assert all(r["status"] == "ok" and r["zinfer_total_ratio"] > 0 for r in report["rows"])
    assert json.loads((tmp_path / "compare_tiny-offload.json").read_text())["workload"]["offload"] == "cpu"
    with pytest.raises(SystemExit):
        bench.main(["--cases", "tiny,huge"])
    assert "unknown case huge; choose from tiny, tiny-offload" in capsys.readouterr().err


def test_peer_times_prefill_and_total_in_one_generate(tiny):
    # prefill ends at the first forward's logits of the same call: decode = total - prefill cannot come out
    # negative or near zero from two separate runs' noise (it did on tiny models: a 60e9 tokens/s "decode")
    from zinfer.bench.peers import TransformersPeer

    peer = TransformersPeer()
    peer.model, peer.device = tiny[1].eval(), torch.device("cpu")
    ids = torch.randint(5, 100, (2, 8))
    t = peer.generate(ids, torch.ones_like(ids), gen_len=6)
    assert 0 < t.prefill < t.total
    original = peer.model.generate
    peer.model.generate = lambda **kw: original(**{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    try:  # the fixture's model is shared: put its generate back
        with pytest.raises(RuntimeError, match="asked for 6 new tokens, got 2"):
            peer.generate(ids, torch.ones_like(ids), gen_len=6)
    finally:
        del peer.model.generate


def test_deepspeed_config_is_get_ds_models():
    h = 64
    cpu = ds_zero3_config(BenchConfig(cpu_offload=True, batch_size=8, quant_bits=4), h, torch.float16)
    assert cpu["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 2 * h * h,
                                        "stage3_param_persistence_threshold": h,
                                        "stage3_max_live_parameters": 2 * h * h,
                                        "offload_param": {"device": "cpu", "pin_memory": True}}
    assert cpu["fp16"] == {"enabled": True} and cpu["bf16"] == {"enabled": False} and cpu["train_batch_size"] == 8
    assert cpu["weight_quantization"]["quantized_initialization"] == {"num_bits": 4, "group_size": 64,
                                                                      "group_dim": 1, "symmetric": False}
    nvme = ds_zero3_config(BenchConfig(disk_offload=True, offload_dir="/nvme"), h, torch.bfloat16, pin_memory=False)
    assert nvme["zero_optimization"]["offload_param"] == {"device": "nvme", "nvme_path": "/nvme", "pin_memory": False,
                                                          "buffer_count": 5, "buffer_size": 2 << 30}
    assert nvme["aio"]["block_size"] == 16 << 20 and "weight_quantization" not in nvme


# --- workload -------------------------------------------------------------------------------------------

class PromptTokenizer:
    """Knows the prompt's words: BOS 2, then Paris=10 ... of=15."""

    all_special_ids = [0, 1, 2]

    def __call__(self, text, add_special_tokens=True):
        ids = [10 + i for i, _ in enumerate(text.split())]
        return {"input_ids": ([2] if add_special_tokens else []) + ids}


def test_prompt_is_repeated_and_truncated_to_prompt_len():
    rows = run.prompt_ids(PromptTokenizer(), 15, 3, vocab_size=100)
    assert rows == [[2, 10, 11, 12, 13, 14, 15, 10, 11, 12, 13, 14, 15, 10, 11]] * 3
    assert run.prompt_ids(PromptTokenizer(), 4, 1, vocab_size=100) == [[2, 10, 11, 12]]
    synthetic = run.prompt_ids(None, 40, 2, vocab_size=50)
    assert len(synthetic[0]) == 40 and synthetic[0] == synthetic[1] and all(3 <= t < 50 for t in synthetic[0])
    # ids the model cannot embed (a built-in config read with another model's tokenizer): synthetic instead
    assert run.prompt_ids(PromptTokenizer(), 8, 1, vocab_size=12) == [run.synthetic_ids(8, 12)]


# --- the real command line ------------------------------------------------------------------------------

def test_python_m_zinfer_bench_json(tiny, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", ZINFER_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "zinfer", "bench", "--model", str(tiny[0]), *SMALL, "--json",
                           "--output-file", str(tmp_path / "run.log")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert SEED_METRICS <= set(result) and set(BenchConfig.__dataclass_fields__) <= set(result)
    assert result["decode_bound"] == "cpu_memory" and result["decode_gb_s"] > 0 and result["prefill_tflops"] > 0
    assert 0 < result["decode_ceiling_ratio"] and 0 < result["prefill_ceiling_ratio"]
    assert list((tmp_path / "cache").glob("ceilings-*.json"))  # measured once, cached for the next run
    assert len((tmp_path / "run.log").read_text().splitlines()) == 4
