"""`zinfer perplexity` (sliding window over LLM.score) and `zinfer plan`."""

import json
import math

import pytest

import zinfer
from helpers import make_text_checkpoint
from zinfer.cli import main
from zinfer.perplexity import SAMPLE_TEXT, perplexity


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ppl")
    return make_text_checkpoint(directory)


TEXT = " ".join(f"w{3 + (i * 7) % 150}" for i in range(300))  # 300 tokens > the tiny context of 128


def test_single_window_equals_mean_score(tiny):
    llm = zinfer.LLM(str(tiny), device="cpu")
    text = " ".join(TEXT.split()[:100])
    expected = math.exp(-llm.score([llm.encode([text])[0]])[0].double().mean().item())
    got = perplexity(llm, text)
    assert got["tokens"] == 99 and got["perplexity"] == pytest.approx(expected, rel=1e-9)


def test_sliding_window_scores_every_token_once(tiny):
    llm = zinfer.LLM(str(tiny), device="cpu")
    a = perplexity(llm, TEXT, window=64, stride=16)
    b = perplexity(llm, TEXT, window=64, stride=64)
    assert a["tokens"] == b["tokens"] == 299
    assert math.isfinite(a["perplexity"]) and a["perplexity"] != b["perplexity"]


def test_perplexity_cli(tiny, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    assert main(["perplexity", str(f), "--model", str(tiny), "--device", "cpu", "--json", "--window", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 299 and out["window"] == 64
    assert main(["perplexity", str(tmp_path / "missing.txt"), "--model", str(tiny)]) == 2


def test_sample_text_is_long_enough():
    assert len(SAMPLE_TEXT.read_text().split()) > 1500


def test_plan_cli_prints_table(capsys):
    assert main(["plan", "--model", "llama-2-70b", "--gpu-memory", "24GiB", "--gpu-free", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "layers.79" in out and "PCIe floor per decode step" in out and "double buffer" in out


def test_plan_cli_sizes_the_kv_cache_each_way(capsys):
    # the ZeRO-Inference hard case: OPT-66B int4 streamed, a 24 GiB GPU, 100 GiB of host memory: the cache gets
    # what the weights leave on each side, and the largest batch is said for both placements
    argv = ["plan", "--model", "opt-66b", "--quant-bits", "4", "--offload", "cpu", "--gpu-memory", "3GiB",
            "--gpu-free", "24GiB", "--cpu-free", "100GiB", "--prompt-len", "512", "--gen-len", "32"]
    assert main(argv + ["--kv-offload", "--pin-kv-cache", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "KV cache: offloaded to pinned CPU memory" in out and "batch 32 x 544 tokens" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("largest batch for 512+32 tokens: "))
    on_gpu, offloaded = [int(w) for w in line.replace(",", " ").split() if w.isdigit()][-2:]
    assert "(65.8 GiB host memory free" in line and offloaded > on_gpu > 0  # 100 GiB less 34.19 streamed
    assert main(argv) == 0
    assert "KV cache: on the compute device" in capsys.readouterr().out
    assert main(argv + ["--pin-kv-cache"]) == 2
    assert "needs kv_offload=True" in capsys.readouterr().err


def test_plan_cli_packed_lm_head(capsys):
    argv = ["plan", "--model", "llama-3-8b", "--gpu-free", "24GiB"]
    assert main(argv + ["--quant-bits", "4", "--quant-lm-head"]) == 0
    out = capsys.readouterr().out
    assert "int4 g64 (LM head too)" in out and "rest             1283.8Mi" in out  # the 1002 MiB fp16 head packed
    assert main(argv + ["--quant-lm-head"]) == 2
    assert "--quant-lm-head packs the LM head like the layers: it needs --quant-bits 4 or 8" in capsys.readouterr().err


def test_plan_cli_impossible_budget(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--offload", "cpu", "--gpu-memory", "1GiB",
                 "--gpu-free", "80GiB"]) == 2
    assert "give at least" in capsys.readouterr().err
