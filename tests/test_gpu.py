"""On a CUDA device: parity with transformers in fp32 and bf16, and graph replay equal to eager."""

import pytest
import torch
from helpers import CONFIGS, PROMPTS, hf_greedy, make_checkpoint

import zinfer

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
    kind, ref, directory = ckpt
    ref = ref.to("cuda", torch.bfloat16)
    expected, (ids, mask) = hf_greedy(ref, PROMPTS, new_tokens=16, device="cuda")
    llm = zinfer.LLM(str(directory), dtype="bfloat16", device="cuda")
    got = [c.token_ids for c in llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=16, ignore_eos=True))]
    assert got == expected, kind
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    scores = llm.score([p + [3] for p in PROMPTS])
    for row in range(len(PROMPTS)):
        exp = torch.log_softmax(want[row], -1)[3].item()
        assert abs(scores[row][-1].item() - exp) < 0.05 * max(1.0, abs(exp)), (kind, row)


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
