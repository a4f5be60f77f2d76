"""Tensor parallelism with offloaded weights or KV cache, on the CPU: each gloo rank streams only its shard and
gets the greedy tokens of one process that offloads nothing.

The ranks start once (test_tp's script and launcher) and load every case in turn. On a CPU device offload='cpu'
plans nothing to stream (the weights already live in host memory) and offload='nvme' streams every layer from
the rank's own store; the GPU tests cover pinned host memory.
"""

import json

import pytest
import torch
from test_tp import SCRIPT, case, one_process, torchrun

import zinfer
from helpers import PROMPTS, make_checkpoint
from zinfer.config import EngineConfig
from zinfer.errors import InputError
from zinfer.offload import store_key
from zinfer.offload.plan import CPU, GPU, REST, make_plan, unit_bytes
from zinfer.parallel import TensorParallel
from zinfer.runtime import decode
from zinfer.weights.loader import build_empty
from zinfer.weights.source import resolve

FAMILIES = ("llama-gqa-tied", "opt", "bloom", "mixtral")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-offload")
    for name in FAMILIES:
        make_checkpoint(name, root / name)
    return {name: root / name for name in FAMILIES}


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-offload-script") / "tp_script.py"
    path.write_text(SCRIPT)
    return path


def without_offload(c: dict) -> dict:
    """The reference of a case: the same model, quantization and seed in one process, nothing offloaded."""
    kept = {k: v for k, v in c["options"].items() if k in ("dummy", "seed", "quant_bits", "quant_group_size")}
    return dict(c, options=kept)


def stores(offload_dir) -> dict:
    """Store directory name -> its manifest (key and units)."""
    return {p.name: json.loads((p / "manifest.json").read_text()) for p in sorted(offload_dir.glob("zinfer-*"))}


def test_tp2_offload_matches_one_process_without_offload(checkpoints, script, tmp_path):
    nvme = tmp_path / "nvme"
    # a one-process store of the same model already in the offload_dir: the ranks must neither reuse nor replace it
    zinfer.LLM(checkpoints["llama-gqa-tied"], device="cpu", offload="nvme", offload_dir=str(nvme))
    (single,) = stores(nvme).values()

    def at(name):
        return str(tmp_path / name)

    cases = [case("llama-gqa-tied nvme", checkpoints["llama-gqa-tied"], offload="nvme", offload_dir=str(nvme)),
             case("llama-gqa-tied cpu", checkpoints["llama-gqa-tied"], offload="cpu"),
             case("llama-gqa-tied auto", checkpoints["llama-gqa-tied"], offload="auto"),
             case("opt nvme", checkpoints["opt"], offload="nvme", offload_dir=at("opt")),
             case("mixtral nvme", checkpoints["mixtral"], offload="nvme", offload_dir=at("mixtral")),
             case("llama-gqa-tied dummy nvme", checkpoints["llama-gqa-tied"], dummy=True, seed=3, offload="nvme",
                  offload_dir=at("dummy")),
             # groups of 16 divide every rank's input features: each rank packs exactly one process's groups
             case("bloom int4 nvme", checkpoints["bloom"], quant_bits=4, quant_group_size=16, offload="nvme",
                  offload_dir=at("bloom")),
             case("mixtral int8 nvme", checkpoints["mixtral"], quant_bits=8, quant_group_size=16, offload="nvme",
                  offload_dir=at("mixtral-int8")),
             # each rank caches its own KV heads in host memory
             case("llama-gqa-tied kv gpu", checkpoints["llama-gqa-tied"], kv_offload=True, kv_attention="gpu"),
             case("opt kv cpu + nvme", checkpoints["opt"], kv_offload=True, kv_attention="cpu", offload="nvme",
                  offload_dir=at("opt-kv"))]
    proc, got, _ = torchrun(2, script, "parity", cases, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = one_process([without_offload(c) for c in cases])
    for name, tokens in want.items():
        assert got[name] == tokens, f"{name}: tp=2 offloaded {got[name]} != tp=1 {tokens}"

    # one store per rank beside the one-process store, which is left as it was
    found = stores(nvme)
    assert len(found) == 3 and single in found.values()
    ranks = [m for m in found.values() if m != single]
    assert sorted((m["key"]["tp_size"], m["key"]["tp_rank"]) for m in ranks) == [(2, 0), (2, 1)]
    # each holds only its rank's shard of every layer: about half of one process's bytes
    assert all([u["name"] for u in m["units"]] == [u["name"] for u in single["units"]] for m in ranks)
    one = sum(u["nbytes"] for u in single["units"])
    assert all(sum(u["nbytes"] for u in m["units"]) < 0.6 * one for m in ranks)


def test_plan_and_store_key_are_per_rank():
    config = resolve("llama-3-8b").config
    whole, half = build_empty(config), build_empty(config, tp=TensorParallel(1, 2))
    options = EngineConfig(offload="cpu")
    sizes, shard = unit_bytes(whole, torch.float16), unit_bytes(half, torch.float16)
    # every layer splits in two (8 KV heads: 4 a rank); embeddings, head and final norm are replicated
    assert shard["layers.0"] * 2 - sizes["layers.0"] == 2 * 2 * 4096  # the two norms, counted on both ranks
    assert shard[REST] == sizes[REST]
    # the budget is the rank's own GPU: every layer of the shard is streamed, with a double buffer of its size
    plan = make_plan(half, options, torch.device("cuda"), torch.float16, free_gpu=80 * 2**30)
    assert [u.place for u in plan.units] == [GPU] + [CPU] * 32
    assert plan.buffer_bytes == 2 * shard["layers.0"]
    assert plan.bytes_at(CPU) == 32 * shard["layers.0"]

    keys = [store_key(whole, "m", torch.float16, options, TensorParallel(r, 2)) for r in range(2)]
    single = store_key(whole, "m", torch.float16, options)
    assert keys[0] != keys[1] and "tp_rank" not in single
    assert {k: v for k, v in keys[1].items() if not k.startswith("tp_")} == single


class FakeGroup(TensorParallel):
    """Two ranks on one machine, answering the gather with the other rank's report made up."""

    def all_gather_object(self, obj):
        return [obj, obj]


def test_kv_host_memory_counts_every_rank_on_the_machine(monkeypatch):
    gib = 2**30
    monkeypatch.setattr("zinfer.offload.plan.free_host_bytes", lambda: 10 * gib)
    decode.check_host_fits(5 * gib)  # one process: 5 of 10 GiB
    with pytest.raises(InputError, match=r"the offloaded KV cache needs 10.00 GiB of host memory \(2 tensor-parallel "
                                         r"ranks on .*, each caching its heads\) but 10.00 GiB is available"):
        decode.check_host_fits(5 * gib, tp=FakeGroup(0, 2))
    decode.check_host_fits(5 * gib, releasable=gib, tp=FakeGroup(0, 2))  # each frees its old 1 GiB cache first


def test_offload_with_tp_outside_a_launcher_is_refused_like_tp(checkpoints, monkeypatch):
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InputError, match=r"tp=2 runs one process per rank: start them with `torchrun"):
        zinfer.LLM(checkpoints["opt"], device="cpu", tp=2, offload="nvme", offload_dir="/nonexistent")


# --- on two GPUs (NCCL): streamed from pinned host memory --------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_tp2_streamed_from_pinned_memory(checkpoints, tmp_path):
    script = tmp_path / "tp_gpu_script.py"
    on_gpu = SCRIPT.replace('device="cpu", tp=world', 'device="cuda", dtype="float32", tp=world')
    assert on_gpu != SCRIPT
    script.write_text(on_gpu)
    cases = [case("llama-gqa-tied cpu", checkpoints["llama-gqa-tied"], offload="cpu"),
             case("mixtral nvme", checkpoints["mixtral"], offload="nvme", offload_dir=str(tmp_path / "nvme")),
             case("bloom int4 cpu", checkpoints["bloom"], quant_bits=4, quant_group_size=16, offload="cpu"),
             case("opt cpu + kv cpu", checkpoints["opt"], offload="cpu", kv_offload=True, kv_attention="cpu"),
             case("opt cpu + kv gpu", checkpoints["opt"], offload="cpu", kv_offload=True, kv_attention="gpu",
                  pin_kv_cache=True, async_kv_offload=True)]
    proc, got, _ = torchrun(2, script, "parity", cases, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for c in map(without_offload, cases):
        llm = zinfer.LLM(c["dir"], device="cuda", dtype="float32", compile=False, **c["options"])
        want = [x.token_ids for x in llm.generate(PROMPTS, zinfer.SamplingParams(**c["params"]))]
        assert got[c["name"]] == want, f"{c['name']}: tp=2 offloaded {got[c['name']]} != tp=1 {want}"
