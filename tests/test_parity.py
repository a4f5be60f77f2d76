"""The backbone: zinfer's own model files equal transformers on tiny random checkpoints (fp32, CPU)."""

import pytest
import torch

import zinfer
from helpers import CONFIGS, PROMPTS, hf_greedy, make_checkpoint
from zinfer.runtime.batch import PaddedBatch

KINDS = sorted(CONFIGS)


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(request.param, directory)
    return request.param, ref, zinfer.LLM(str(directory), dtype="float32", device="cpu")


def test_greedy_tokens_equal_transformers(pair):
    kind, ref, llm = pair
    expected, _ = hf_greedy(ref, PROMPTS, new_tokens=8)
    params = zinfer.SamplingParams(max_new_tokens=8, ignore_eos=True)
    got = [c.token_ids for c in llm.generate(PROMPTS, params)]
    assert got == expected, kind


def test_batched_equals_alone(pair):
    _, _, llm = pair
    params = zinfer.SamplingParams(max_new_tokens=6, ignore_eos=True)
    batched = [c.token_ids for c in llm.generate(PROMPTS, params)]
    alone = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    assert batched == alone


def test_last_logits_close(pair):
    kind, ref, llm = pair
    _, (ids, mask) = hf_greedy(ref, PROMPTS, new_tokens=1)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits[:, -1]
    batch = PaddedBatch.from_prompts(PROMPTS, 0, ids.shape[1], "cpu")
    with torch.no_grad():
        got = llm.model(batch.tokens, llm.engine.new_cache(len(PROMPTS), ids.shape[1]),
                        batch.prefill_inputs(llm.model.sliding_window))[:, -1]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_score_equals_transformers_logsoftmax(pair):
    kind, ref, llm = pair
    for prompt in PROMPTS:
        with torch.no_grad():
            logits = ref(input_ids=torch.tensor([prompt])).logits[0]
        expected = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1)
        got = llm.score([prompt])[0]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    batched = llm.score(PROMPTS)
    for prompt, row in zip(PROMPTS, batched):
        assert row.shape == (len(prompt) - 1,)
        torch.testing.assert_close(row, llm.score([prompt])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "qwen2"])
def test_compiled_cpu_decode_equals_transformers(kind, tmp_path, monkeypatch):
    # compile=True on the CPU: decode matmuls of up to 2 rows become reductions Inductor generates
    # (gemv.traced_as_reduction; with bias: qwen2's q/k/v); batches of 1 and 2 take that path, 3 F.linear, and all
    # give transformers' tokens. Two families keep the compiles (one per batch size) within CI's time
    from zinfer.layers import gemv

    taken, decide = [], gemv.traced_as_reduction

    def spy(x, w):
        taken.append(decide(x, w))
        return taken[-1]

    monkeypatch.setattr(gemv, "traced_as_reduction", spy)
    torch._dynamo.reset()  # traced afresh (the spy's appends are replayed only by code traced with this spy)
    ref = make_checkpoint(kind, tmp_path)
    llm = zinfer.LLM(str(tmp_path), dtype="float32", device="cpu", compile=True)
    params = zinfer.SamplingParams(max_new_tokens=8, ignore_eos=True)
    expected, _ = hf_greedy(ref, PROMPTS, new_tokens=8)
    assert [c.token_ids for c in llm.generate(PROMPTS, params)] == expected, kind
    assert llm.generate(PROMPTS[:1], params)[0].token_ids == expected[0], kind
    assert [c.token_ids for c in llm.generate(PROMPTS[1:], params)] == expected[1:], kind
    assert any(taken), "no compiled matmul took the reduction"
