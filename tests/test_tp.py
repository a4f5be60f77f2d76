"""Tensor parallelism on the CPU: gloo ranks started by torchrun must produce the tokens of one process.

Each launch is one `python -m torch.distributed.run` over a small script that loops over many models, so the
processes start once per world size. In-process tests check the sharding rules and the error messages.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import zinfer
from helpers import CONFIGS, PROMPTS, make_checkpoint, save_word_tokenizer
from zinfer import cli
from zinfer.errors import CheckpointError, InputError
from zinfer.layers.linear import Linear
from zinfer.layers.moe import SparseMoE
from zinfer.parallel import TensorParallel, divide, kv_heads_per_rank
from zinfer.quant import QuantSpec
from zinfer.weights.loader import build_empty, load_weights, quantize_shells
from zinfer.weights.source import load_config

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 6

# One script for every launch: `parity` generates each case and rank 0 writes the tokens (or the error);
# `fail` makes rank 1 raise while rank 0 waits in a collective; `stall` makes rank 1 hang past a 3 s timeout.
SCRIPT = """
import faulthandler, json, os, sys, time
import torch
import zinfer
from zinfer.parallel import setup
from zinfer.parallel.launch import exit_now, fail_fast

faulthandler.enable()  # an abort (gloo's threads) prints where every thread was

mode, spec_path, out_path = sys.argv[1:4]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
spec = json.loads(open(spec_path).read())


def run_case(case):
    try:
        llm = zinfer.LLM(case["dir"], device="cpu", tp=world, **case["options"])
    except zinfer.ZinferError as e:
        return str(e)
    if case["options"].get("quant_lm_head") and llm.model.lm_head.qspec is None:
        return "the LM head was asked packed and is not"  # a string never equals the reference's tokens
    return [c.token_ids for c in llm.generate(spec["prompts"], zinfer.SamplingParams(**case["params"]))]


with fail_fast():
    if mode == "parity":
        result = {case["name"]: run_case(case) for case in spec["cases"]}
        if rank == 0:
            open(out_path, "w").write(json.dumps(result))
        zinfer.parallel.shutdown()
        exit_now(0)  # as `zinfer` does on a rank: no interpreter teardown, where gloo now and then aborts
    elif mode == "refuse":  # rank 1 alone cannot fit the KV cache: both ranks must refuse, then go on together
        import zinfer.runtime.generator as generator
        llm = zinfer.LLM(spec["cases"][0]["dir"], device="cpu", tp=world)
        fits = generator.check_fits
        if rank == 1:
            def no_room(*args, **kwargs):
                raise zinfer.errors.InputError("the KV cache needs 9 GiB but 1 GiB is free")
            generator.check_fits = no_room
        result = {}
        try:
            llm.generate(spec["prompts"], zinfer.SamplingParams(max_new_tokens=4))
        except zinfer.errors.InputError as e:
            result["refused"] = str(e)
        generator.check_fits = fits
        result["tokens"] = [c.token_ids for c in llm.generate(spec["prompts"], zinfer.SamplingParams(max_new_tokens=4))]
        everyone = llm.tp.all_gather_object(result)
        if rank == 0:
            open(out_path, "w").write(json.dumps(everyone))
        zinfer.parallel.shutdown()
        exit_now(0)
    else:
        if mode == "stall":
            setup(world, torch.device("cpu"), timeout_s=3)  # LLM then joins this group
        llm = zinfer.LLM(spec["cases"][0]["dir"], device="cpu", tp=world)
        if rank == 1 and mode == "fail":
            raise RuntimeError("forced failure")
        if rank == 1 and mode == "stall":
            time.sleep(120)
        llm.generate(spec["prompts"], zinfer.SamplingParams(max_new_tokens=4))
"""

GREEDY = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}
SAMPLED = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True, "temperature": 0.8, "top_p": 0.9, "seed": 7}

# tp=8 needs 8 heads: GQA with 2 KV heads (each replicated on 4 ranks) and MHA families
WIDE = {
    "llama-8-heads": lambda: transformers.LlamaConfig(vocab_size=211, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=8, num_key_value_heads=2,
                                                      intermediate_size=96, max_position_embeddings=128),
    "opt-8-heads": lambda: transformers.OPTConfig(vocab_size=211, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=8, ffn_dim=96, max_position_embeddings=128,
                                                  word_embed_proj_dim=64),
    "bloom-8-heads": lambda: transformers.BloomConfig(vocab_size=211, hidden_size=64, n_layer=2, n_head=8),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    with pytest.MonkeyPatch.context() as mp:
        for name, make in WIDE.items():
            mp.setitem(CONFIGS, name, make)  # make_checkpoint reads CONFIGS
        dirs = {name: root / name for name in CONFIGS}
        for name, directory in dirs.items():
            make_checkpoint(name, directory)
    save_word_tokenizer(dirs["llama-gqa-tied"])
    return dirs


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp-script") / "tp_script.py"
    path.write_text(SCRIPT)
    return path


def case(name, directory, params=None, **options) -> dict:
    return {"name": name, "dir": str(directory), "params": params or GREEDY, "options": options}


def one_process(cases) -> dict:
    """The reference: every case in this process (tp=1)."""
    result = {}
    for c in cases:
        llm = zinfer.LLM(c["dir"], device="cpu", **c["options"])
        result[c["name"]] = [x.token_ids for x in llm.generate(PROMPTS, zinfer.SamplingParams(**c["params"]))]
    return result


def torchrun(nproc: int, script: Path, mode: str, cases: list, tmp_path: Path, timeout: float = 300):
    """Launch `script` in `nproc` gloo ranks; returns (completed process, rank 0's result or None, seconds)."""
    spec, out = tmp_path / f"spec-{mode}-{nproc}.json", tmp_path / f"out-{mode}-{nproc}.json"
    spec.write_text(json.dumps({"cases": cases, "prompts": PROMPTS}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                                          os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), mode, str(spec), str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    seconds = time.perf_counter() - start
    return proc, (json.loads(out.read_text()) if out.exists() else None), seconds


def ranks_stderr(stderr: str) -> str:
    """What the ranks wrote to stderr, without the launcher's report that follows it (for failure messages)."""
    ranks = stderr.split("torch/distributed/elastic/multiprocessing", 1)[0]
    return ranks[-4000:] if ranks.strip() else stderr[-3000:]


def check_parity(nproc, script, cases, tmp_path):
    proc, got, _ = torchrun(nproc, script, "parity", cases, tmp_path)
    assert proc.returncode == 0, ranks_stderr(proc.stderr)
    want = one_process([c for c in cases if not isinstance(got[c["name"]], str)])
    for name, tokens in want.items():
        assert got[name] == tokens, f"{name}: tp={nproc} {got[name]} != tp=1 {tokens}"
    return got


# --- sharding rules, in one process ----------------------------------------------------------------------

def test_divide_and_kv_heads_per_rank():
    assert divide(96, 4) == 24
    with pytest.raises(InputError) as err:
        divide(6, 4, "attention heads")
    assert str(err.value) == "attention heads (6) does not split evenly across tp=4 ranks: use a tp that divides 6"
    assert [kv_heads_per_rank(8, 4), kv_heads_per_rank(2, 4), kv_heads_per_rank(1, 8)] == [2, 1, 1]
    with pytest.raises(InputError, match=r"2 key/value heads cannot be shared by tp=3 ranks"):
        kv_heads_per_rank(2, 3)
    with pytest.raises(InputError, match=r"key/value heads \(6\) does not split evenly across tp=4 ranks"):
        kv_heads_per_rank(6, 4)


def test_build_refuses_heads_that_do_not_split(checkpoints):
    config = load_config(checkpoints["bloom-6-heads"])
    with pytest.raises(InputError, match=r"attention heads \(6\) does not split evenly across tp=4 ranks"):
        build_empty(config, tp=TensorParallel(0, 4))


def rank_model(directory, rank, size):
    model = build_empty(load_config(directory), tp=TensorParallel(rank, size))
    return load_weights(model, load_file(directory / "model.safetensors").items(), "cpu", torch.float32)


@pytest.mark.parametrize("rank", range(4))
def test_rank_holds_its_blocks_for_tp4(checkpoints, rank):
    # llama-gqa-tied: 4 query heads, 2 KV heads of 16 dims: at tp=4 rank r keeps KV head r // 2
    full = load_file(checkpoints["llama-gqa-tied"] / "model.safetensors")
    model = rank_model(checkpoints["llama-gqa-tied"], rank, 4)
    attn, p = model.model.layers[0].self_attn, "model.layers.0."
    assert (attn.num_heads, attn.num_kv_heads, model.num_kv_heads) == (1, 1, 1)
    assert torch.equal(attn.q_proj.weight, full[p + "self_attn.q_proj.weight"][16 * rank:16 * (rank + 1)])
    kv = rank // 2
    assert torch.equal(attn.k_proj.weight, full[p + "self_attn.k_proj.weight"][16 * kv:16 * (kv + 1)])
    assert torch.equal(attn.o_proj.weight, full[p + "self_attn.o_proj.weight"][:, 16 * rank:16 * (rank + 1)])
    down = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(down, full[p + "mlp.down_proj.weight"][:, 24 * rank:24 * (rank + 1)])
    assert attn.o_proj.tp is not None and attn.q_proj.tp is None  # row-parallel layers reduce, columns do not
    assert torch.equal(model.lm_head.weight, full["model.embed_tokens.weight"])  # replicated (and tied)


@pytest.mark.parametrize("rank", range(4))
def test_bloom_fused_qkv_splits_by_head(checkpoints, rank):
    # query_key_value rows are [head, (q, k, v), head_dim]: a rank holds whole heads, each with its q, k and v
    name = "transformer.h.0.self_attention.query_key_value.weight"
    full = load_file(checkpoints["bloom"] / "model.safetensors")[name]
    model = rank_model(checkpoints["bloom"], rank, 4)
    mine = model.transformer.h[0].self_attention.query_key_value.weight
    assert torch.equal(mine.view(1, 3, 16, 64), full.view(4, 3, 16, 64)[rank:rank + 1])
    assert torch.allclose(model.slopes, zinfer.models.bloom.alibi_slopes(4)[rank:rank + 1])


def test_moe_splits_inside_each_expert_and_reduces_once(checkpoints):
    model = rank_model(checkpoints["mixtral"], 1, 2)
    moe = model.model.layers[0].block_sparse_moe
    assert isinstance(moe, SparseMoE) and moe.tp is not None and moe.gate.tp is None
    for expert in moe.experts:
        assert (expert.w1.out_features, expert.w2.in_features) == (48, 48)
        assert expert.w2.tp is not None and not expert.w2.reduce_output  # summed over experts, reduced once
    rows = [m for m in model.modules() if isinstance(m, Linear) and m.tp is not None and m.reduce_output]
    assert len(rows) == 2  # the two o_proj; MoE layers reduce in SparseMoE


def test_misshaped_checkpoint_tensor_names_the_full_shape(checkpoints):
    model = build_empty(load_config(checkpoints["llama"]), tp=TensorParallel(0, 2))
    weights = dict(load_file(checkpoints["llama"] / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(32, 64\), "
                                              r"the model expects \(64, 64\) \(split over tp=2 ranks\)"):
        load_weights(model, weights.items(), "cpu", torch.float32)


def test_quantized_checkpoint_splits_only_at_whole_groups(checkpoints, tmp_path):
    # down_proj has 96 input features: 48 a rank at tp=2, not a whole number of groups of 64
    saved = zinfer.LLM(checkpoints["llama"], device="cpu", quant_bits=8, quant_group_size=64).save(tmp_path / "q8")
    model = build_empty(load_config(saved), tp=TensorParallel(0, 2))
    quantize_shells(model, QuantSpec(bits=8, group_size=64), torch.float32)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.down_proj' is quantized in groups of 64 input "
                                              r"features, but a rank holds 48 of them: load the dense checkpoint"):
        load_weights(model, load_file(saved / "model.safetensors").items(), "cpu", torch.float32)


def test_tp_outside_a_launcher_is_refused(checkpoints, monkeypatch):
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InputError, match=r"tp=2 runs one process per rank: start them with `torchrun "
                                         r"--nproc-per-node 2 your_script.py` .* `zinfer generate --nproc 2"):
        zinfer.LLM(checkpoints["llama"], device="cpu", tp=2)


def test_cli_tp_and_nproc_must_agree(capsys):
    code = cli.main(["generate", "--tp", "2", "--nproc", "4", "hello"])
    assert code == 2
    assert capsys.readouterr().err == "zinfer: error: --tp 2 and --nproc 4 disagree: give one of them\n"


# --- gloo ranks -------------------------------------------------------------------------------------------

def test_tp2_matches_one_process_for_every_family(checkpoints, script, tmp_path):
    cases = [case(name, checkpoints[name]) for name in CONFIGS]
    cases += [case("llama-gqa-tied dummy", checkpoints["llama-gqa-tied"], dummy=True, seed=3),
              case("mixtral dummy", checkpoints["mixtral"], dummy=True, seed=3),
              case("llama sampled", checkpoints["llama"], SAMPLED),
              # groups of 16 divide every rank's input features: each rank packs exactly one process's groups
              case("bloom int4", checkpoints["bloom"], quant_bits=4, quant_group_size=16),
              case("mixtral int8", checkpoints["mixtral"], quant_bits=8, quant_group_size=16),
              # the replicated head packed from the tied embedding on every rank
              case("llama-gqa-tied int4 head", checkpoints["llama-gqa-tied"], quant_bits=4, quant_group_size=16,
                   quant_lm_head=True)]
    got = check_parity(2, script, cases, tmp_path)
    assert [name for name, tokens in got.items() if isinstance(tokens, str)] == []  # every case ran at tp=2


def test_tp4_matches_one_process(checkpoints, script, tmp_path):
    # GQA families have 2 KV heads: each is replicated on 2 ranks; bloom-6-heads cannot split over 4
    cases = [case(name, checkpoints[name]) for name in CONFIGS]
    got = check_parity(4, script, cases, tmp_path)
    assert got["bloom-6-heads"] == "attention heads (6) does not split evenly across tp=4 ranks: use a tp that " \
                                   "divides 6"


@pytest.mark.slow  # 8 processes start on a 2-core machine: ~25 s
def test_tp8_matches_one_process(checkpoints, script, tmp_path):
    check_parity(8, script, [case(name, checkpoints[name]) for name in WIDE], tmp_path)


def test_a_rank_refusing_the_cache_is_a_refusal_on_every_rank(checkpoints, script, tmp_path):
    proc, got, _ = torchrun(2, script, "refuse", [case("llama", checkpoints["llama"])], tmp_path)
    assert proc.returncode == 0, ranks_stderr(proc.stderr)
    assert got[0]["refused"] == "tensor-parallel rank 1: the KV cache needs 9 GiB but 1 GiB is free"
    assert got[1]["refused"] == "the KV cache needs 9 GiB but 1 GiB is free"
    assert got[0]["tokens"] == got[1]["tokens"] and len(got[0]["tokens"]) == len(PROMPTS)


def test_failing_rank_stops_every_rank(checkpoints, script, tmp_path):
    proc, _, seconds = torchrun(2, script, "fail", [case("llama", checkpoints["llama"])], tmp_path, timeout=180)
    assert proc.returncode != 0 and seconds < 100  # not waiting for the 600 s collective timeout
    assert "zinfer: error: rank 1 of 2 failed: RuntimeError: forced failure" in proc.stderr


def test_stalled_rank_times_out_with_a_message(checkpoints, script, tmp_path):
    # rank 1 hangs: rank 0's collective fails after the 3 s timeout instead of waiting forever, and it exits
    proc, _, seconds = torchrun(2, script, "stall", [case("llama", checkpoints["llama"])], tmp_path, timeout=180)
    assert proc.returncode != 0 and seconds < 100
    assert "zinfer: error: rank 0 of 2 failed: RuntimeError:" in proc.stderr and "Timed out" in proc.stderr


def test_cli_nproc_2_prints_once_what_one_process_prints(checkpoints, capsys):
    argv = ["generate", "--model", checkpoints["llama-gqa-tied"], "--device", "cpu", "-n", "5", "w5 w6 w7", "w9"]
    assert cli.main([str(a) for a in argv]) == 0
    want = capsys.readouterr().out
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "zinfer", *map(str, argv), "--nproc", "2"], capture_output=True,
                          text=True, env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 0, ranks_stderr(proc.stderr)
    assert proc.stdout == want
