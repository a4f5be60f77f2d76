"""On a CUDA device: parity with transformers in fp32 and bf16, and graph replay equal to eager."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zinfer
from helpers import CONFIGS, PROMPTS, hf_greedy, make_checkpoint
from zinfer.quant import dequantize
from zinfer.runtime.batch import PaddedBatch

pytestmark = pytest.mark.gpu
KINDS = sorted(CONFIGS)


@pytest.fixture(scope="module", params=KINDS)
def ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, make_checkpoint(request.param, directory), directory


def test_fp32_greedy_parity_on_gpu(ckpt):
    kind, ref, directory = ckpt
    ref = ref.to("cuda")
    expected, _ = hf_greedy(ref, PROMPTS, new_tokens=12, device="cuda")
    llm = zinfer.LLM(str(directory), dtype="float32", device="cuda")
    got = [c.token_ids for c in llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=12, ignore_eos=True))]
    assert got == expected, kind


def test_bf16_logits_close_and_first_tokens_equal(ckpt):
    """bf16: last-position logits within bf16 tolerance of transformers', and the same greedy tokens for 16
    positions, except where transformers' own logits make the two choices a bf16 near-tie."""
    kind, ref, directory = ckpt
    ref = ref.to("cuda", torch.bfloat16)
    expected, (ids, mask) = hf_greedy(ref, PROMPTS, new_tokens=16, device="cuda")
    llm = zinfer.LLM(str(directory), dtype="bfloat16", device="cuda")
    batch = PaddedBatch.from_prompts(PROMPTS, 0, ids.shape[1], "cuda")
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits[:, -1].float()
        got = llm.model(batch.tokens, llm.engine.new_cache(len(PROMPTS), ids.shape[1]),
                        batch.prefill_inputs(llm.model.sliding_window))[:, -1].float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2, kind
    out = llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=16, ignore_eos=True))
    for prompt, mine, theirs in zip(PROMPTS, [c.token_ids for c in out], expected):
        if mine == theirs:
            continue
        i = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        with torch.no_grad():  # transformers' logits after the shared prefix
            logits = ref(input_ids=torch.tensor([prompt + mine[:i]], device="cuda")).logits[0, -1].float()
        gap = (logits[theirs[i]] - logits[mine[i]]).item()
        assert gap <= 0.02 * logits.abs().max().item(), (kind, i, gap)


def test_graph_replay_equals_eager(ckpt):
    # fp32: the compiled step fuses element-wise ops, so only rounding differs from eager
    kind, _, directory = ckpt
    params = zinfer.SamplingParams(max_new_tokens=20, ignore_eos=True)
    graph = zinfer.LLM(str(directory), dtype="float32", device="cuda")
    eager = zinfer.LLM(str(directory), dtype="float32", device="cuda", compile=False)
    a = [c.token_ids for c in graph.generate(PROMPTS, params)]
    b = [c.token_ids for c in eager.generate(PROMPTS, params)]
    assert a == b, kind
    assert graph.engine.state.graph is not None and eager.engine.state.graph is None
    # a second request of the same bucket replays the captured graph
    assert [c.token_ids for c in graph.generate(PROMPTS, params)] == a


def test_sampling_on_gpu_reproducible(ckpt):
    kind, _, directory = ckpt
    llm = zinfer.LLM(str(directory), dtype="bfloat16", device="cuda")
    params = zinfer.SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7,
                                   ignore_eos=True)
    assert [c.token_ids for c in llm.generate(PROMPTS, params)] == [
        c.token_ids for c in llm.generate(PROMPTS, params)]


def test_kv_cache_too_big_is_refused():
    llm = zinfer.LLM("llama-2-7b", dummy=True, dtype="bfloat16", device="cuda")
    free = torch.cuda.mem_get_info()[0]
    with pytest.raises(zinfer.ZinferError, match="GiB of GPU memory is free; lower the batch size"):
        llm.generate([[5] * 4000] * int(free / (4000 * 512 * 1024) + 8),
                     zinfer.SamplingParams(max_new_tokens=8))


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_offloaded_generation_equals_resident(ckpt, offload, tmp_path):
    kind, _, directory = ckpt
    params = zinfer.SamplingParams(max_new_tokens=10, ignore_eos=True)
    resident = zinfer.LLM(str(directory), dtype="float32", device="cuda", compile=False)
    streamed = zinfer.LLM(str(directory), dtype="float32", device="cuda", offload=offload,
                          offload_dir=str(tmp_path))
    assert streamed.plan.streamed
    assert [c.token_ids for c in streamed.generate(PROMPTS, params)] == [
        c.token_ids for c in resident.generate(PROMPTS, params)], kind


@pytest.mark.parametrize("quant_bits", [16, 4])
def test_dummy_weights_are_the_same_resident_or_streamed(quant_bits, tmp_path):
    # dummy weights are drawn on the GPU whether the model stays there or is streamed from host memory: the
    # same seed is the same model, and a large dummy model does not wait on CPU random numbers
    params = zinfer.SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10]]
    options = dict(dummy=True, seed=5, dtype="float32", device="cuda", compile=False, quant_bits=quant_bits,
                   quant_group_size=32)
    resident = [c.token_ids for c in zinfer.LLM("smollm2-135m", **options).generate(prompts, params)]
    streamed = zinfer.LLM("smollm2-135m", offload="cpu", **options)
    assert streamed.plan.streamed
    assert [c.token_ids for c in streamed.generate(prompts, params)] == resident


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_partly_resident_model_equals_resident(offload, tmp_path):
    # a budget for 3 resident layers: those are read straight to the GPU, the rest into host memory (or the
    # NVMe store) and streamed; tokens as with every layer resident
    params = zinfer.SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [9, 10]]
    options = dict(dummy=True, seed=3, dtype="float32", device="cuda", compile=False)
    resident = [c.token_ids for c in zinfer.LLM("smollm2-135m", **options).generate(prompts, params)]
    from zinfer.offload.plan import unit_bytes
    from zinfer.weights.loader import build_empty
    from zinfer.weights.source import resolve

    sizes = unit_bytes(build_empty(resolve("smollm2-135m").config), torch.float32)  # from shapes, no load
    layer = sizes["layers.0"]
    budget = sizes["rest"] + 2 * layer + 3 * layer + layer // 2
    mixed = zinfer.LLM("smollm2-135m", offload=offload, offload_dir=str(tmp_path), gpu_memory=budget, **options)
    places = {u.name: u.place for u in mixed.plan.units}
    assert list(places.values()).count("gpu") == 1 + 3
    for i, layer in enumerate(mixed.model.decoder_layers()):  # resident layers hold their weights on the GPU;
        tensors = list(layer.parameters())  # streamed ones hold empty tensors between uses
        on_gpu = places[f"layers.{i}"] == "gpu"
        assert all(t.is_cuda and t.numel() > 0 for t in tensors) if on_gpu else all(t.numel() == 0 for t in tensors)
    if offload == "cpu":
        assert sorted(mixed.streamer.host) == sorted(n for n, p in places.items() if p == "cpu")
    assert [c.token_ids for c in mixed.generate(prompts, params)] == resident


def test_packed_lm_head_on_gpu(tmp_path):
    # the head of a tied model packed (its own copy of the embedding), run by the fused kernels in the captured step;
    # the reference is the same model with that head as a dense matmul of its dequantized weight
    make_checkpoint("llama-gqa-tied", tmp_path)
    opts = dict(dtype="bfloat16", device="cuda", quant_bits=4, quant_group_size=32, quant_lm_head=True)
    packed, dense = zinfer.LLM(str(tmp_path), **opts), zinfer.LLM(str(tmp_path), **opts)
    head = dense.model.lm_head
    head.weight = torch.nn.Parameter(dequantize(head.packed, torch.bfloat16), requires_grad=False)
    head.qspec = None
    assert packed.model.lm_head.qspec is not None
    p = max(map(len, PROMPTS))
    batch = PaddedBatch.from_prompts(PROMPTS, 0, p, "cuda")
    got, want = [llm.model(batch.tokens, llm.engine.new_cache(len(PROMPTS), p),
                           batch.prefill_inputs(llm.model.sliding_window))[:, -1].float() for llm in (packed, dense)]
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    out = packed.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert packed.engine.state.graph is not None and all(len(c.token_ids) == 8 for c in out)


_PDL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import zinfer
    from zinfer.layers import gemv, triton_gemv
    x = torch.zeros(1, device="cuda")
    if sys.argv[2] == "1" and not triton_gemv.pdl(x):
        print("no dependent launch on this GPU / Triton"); sys.exit(3)
    out = {}
    for bits in (16, 8, 4):
        quant = {} if bits == 16 else dict(quant_bits=bits, quant_group_size=32, quant_lm_head=True)
        llm = zinfer.LLM(sys.argv[1], dtype="bfloat16", device="cuda", **quant)
        for prompts in ([[5, 6, 7, 8], [9, 10]], [[11, 12, 13]]):  # batch 2, and 1 (the dense M = 1 kernel)
            res = llm.generate(prompts, zinfer.SamplingParams(max_new_tokens=12, ignore_eos=True))
            out[f"{bits}-{len(prompts)}"] = [[c.token_ids for c in res], llm.engine.state.logits.float().cpu().tolist()]
    print(json.dumps({"pdl": triton_gemv.pdl(x), "options": gemv.inductor_options(), "out": out}))
    """
)


def test_dependent_launch_changes_no_bit(tmp_path):
    # ZINFER_PDL=1 (our GEMVs and torch.compile's kernels launched dependently, captured in the decode graph) and =0:
    # the same kernels doing the same arithmetic, so the same tokens and bitwise the same logits, dense and packed.
    # ZINFER_GEMV=heuristic: both runs pick the same kernel for each shape (timing could pick differently)
    make_checkpoint("llama-gqa-tied", tmp_path)
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for flag in ("0", "1"):
        env = {**os.environ, "ZINFER_PDL": flag, "ZINFER_GEMV": "heuristic",
               "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
        r = subprocess.run([sys.executable, "-c", _PDL_SCRIPT, str(tmp_path), flag], env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
        if r.returncode == 3:
            pytest.skip(r.stdout.strip())
        assert r.returncode == 0, r.stdout + r.stderr
        runs[flag] = json.loads(r.stdout.strip().splitlines()[-1])
    assert runs["1"]["pdl"] and not runs["0"]["pdl"] and runs["0"]["options"] == {}
    assert runs["0"]["out"] == runs["1"]["out"]
