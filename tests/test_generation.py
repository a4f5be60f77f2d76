"""Generation behaviour: sampling, stopping, streaming, batching and the text API on a tiny model."""

import pytest
import torch

import zinfer
from helpers import PROMPTS, make_checkpoint, save_word_tokenizer


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-text")
    make_checkpoint("llama-gqa-tied", directory)
    save_word_tokenizer(directory)
    return zinfer.LLM(str(directory), device="cpu")


def test_text_prompts_round_trip(llm):
    out = llm.generate(["w5 w17 w33", "w12"], zinfer.SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert [len(c.token_ids) for c in out] == [5, 5]
    assert out[0].prompt_token_ids == [5, 17, 33]
    assert out[0].text.strip() == llm.decode(out[0].token_ids)
    assert all(w.startswith("w") for w in out[0].text.split())


def test_seeded_sampling_is_reproducible_and_varies(llm):
    params = dict(max_new_tokens=12, temperature=1.5, ignore_eos=True)
    a = [c.token_ids for c in llm.generate(PROMPTS, zinfer.SamplingParams(seed=1, **params))]
    b = [c.token_ids for c in llm.generate(PROMPTS, zinfer.SamplingParams(seed=1, **params))]
    c = [c.token_ids for c in llm.generate(PROMPTS, zinfer.SamplingParams(seed=2, **params))]
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(llm):
    greedy = llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=6, ignore_eos=True))
    topk = llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=6, temperature=0.7, top_k=1, seed=3,
                                                       ignore_eos=True))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in topk]


def test_tiny_top_p_is_greedy(llm):
    greedy = llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=6, ignore_eos=True))
    topp = llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=3,
                                                       ignore_eos=True))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in topp]


def test_repetition_penalty_changes_repeats(llm):
    plain = llm.generate([[5, 6]], zinfer.SamplingParams(max_new_tokens=24, ignore_eos=True))[0].token_ids
    penalised = llm.generate([[5, 6]], zinfer.SamplingParams(max_new_tokens=24, repetition_penalty=50.0,
                                                             ignore_eos=True))[0].token_ids
    # a huge penalty forbids any token already seen while unseen ones remain
    assert len(set(penalised)) == len(penalised) and not {5, 6} & set(penalised)
    assert len(set(plain)) < len(plain)


def test_eos_stops_per_sequence(llm):
    params = zinfer.SamplingParams(max_new_tokens=8, ignore_eos=True)
    free = [c.token_ids for c in llm.generate(PROMPTS, params)]
    eos = free[1][2]  # pretend the third token of row 1 is EOS
    stopped = llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=8, stop_token_ids=(eos,)))
    for row, c in zip(free, stopped):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert c.token_ids == row[:cut]
        assert c.finish_reason == ("stop" if eos in row else "length")


def test_min_new_tokens_suppresses_stop(llm):
    free = llm.generate([PROMPTS[1]], zinfer.SamplingParams(max_new_tokens=8, ignore_eos=True))[0].token_ids
    eos = free[0]
    out = llm.generate([PROMPTS[1]], zinfer.SamplingParams(max_new_tokens=8, min_new_tokens=3,
                                                           stop_token_ids=(eos,)))[0]
    assert len(out.token_ids) >= 3 and eos not in out.token_ids[:3]


def test_stop_string_cuts_text(llm):
    full = llm.generate(["w5 w6"], zinfer.SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    words = full.text.split()
    stop = words[2]
    out = llm.generate(["w5 w6"], zinfer.SamplingParams(max_new_tokens=8, stop=stop, ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and full.text.startswith(out.text.strip())
    assert len(out.token_ids) <= words.index(stop) + 1


def test_stream_pieces_join_to_text(llm):
    params = zinfer.SamplingParams(max_new_tokens=7, ignore_eos=True)
    pieces = list(llm.stream("w9 w10", params))
    assert len(pieces) > 1
    assert "".join(pieces) == llm.generate(["w9 w10"], params)[0].text


def test_stop_string_of_several_tokens(llm):
    full = llm.generate(["w5 w6"], zinfer.SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    words = full.text.split()
    stop = f"{words[3]} {words[4]}"  # spans two tokens
    out = llm.generate(["w5 w6"], zinfer.SamplingParams(max_new_tokens=10, stop=stop, ignore_eos=True))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == full.text[:full.text.index(stop)].count("w") + 2
    assert out.text == full.text[:full.text.index(stop)]
    streamed = "".join(llm.stream("w5 w6", zinfer.SamplingParams(max_new_tokens=10, stop=stop, ignore_eos=True)))
    assert streamed == out.text


def test_stop_strings_and_stream_decode_a_tail_not_everything(llm, monkeypatch):
    # per step, host work must not grow with the text: only the tail of the tokens is decoded (once a
    # request, at the end, the whole continuation is)
    lengths = []
    decode = llm.tokenizer.decode
    monkeypatch.setattr(llm.tokenizer, "decode", lambda ids, **kw: lengths.append(len(ids)) or decode(ids, **kw))
    params = zinfer.SamplingParams(max_new_tokens=80, stop="never-said", ignore_eos=True)
    out = llm.generate(["w5 w6"], params)[0]
    assert len(out.token_ids) == 80 and out.finish_reason == "length"
    assert sum(n > 40 for n in lengths) <= 2, lengths
    lengths.clear()
    assert "".join(llm.stream("w5 w6", params)) == out.text
    assert sum(n > 40 for n in lengths) <= 2, lengths


def test_eos_from_config(llm):
    assert 1 in llm.eos_token_ids
    assert llm.pad_token_id == 0


def test_meta_and_eager_build_agree(tmp_path):
    make_checkpoint("opt", tmp_path)
    params = zinfer.SamplingParams(max_new_tokens=5, ignore_eos=True)
    a = zinfer.LLM(str(tmp_path), device="cpu", meta=True).generate(PROMPTS, params)
    b = zinfer.LLM(str(tmp_path), device="cpu", meta=False).generate(PROMPTS, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_dummy_weights_seeded_random(tmp_path):
    a = zinfer.LLM("opt-125m", dummy=True, device="cpu", seed=3)
    w = a.model.model.decoder.layers[0].fc1.weight
    assert w.std() > 0.01 and not torch.all(w == 0)
    b = zinfer.LLM("opt-125m", dummy=True, device="cpu", seed=3)
    assert torch.equal(w, b.model.model.decoder.layers[0].fc1.weight)
    c = zinfer.LLM("opt-125m", dummy=True, device="cpu", seed=4)
    assert not torch.equal(w, c.model.model.decoder.layers[0].fc1.weight)
    out = a.generate([[5, 6, 7]], zinfer.SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3


def test_bin_checkpoint_and_manifest(tmp_path):
    from zinfer.weights.checkpoint import scan_checkpoint, write_manifest

    ref = make_checkpoint("llama", tmp_path / "st")
    (tmp_path / "bin").mkdir()
    ref.config.save_pretrained(tmp_path / "bin")
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    params = zinfer.SamplingParams(max_new_tokens=5, ignore_eos=True)
    a = zinfer.LLM(str(tmp_path / "st"), device="cpu").generate(PROMPTS, params)
    b = zinfer.LLM(str(tmp_path / "bin"), device="cpu").generate(PROMPTS, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    files = scan_checkpoint(tmp_path / "bin")
    write_manifest(tmp_path / "bin", files, "llama")
    assert scan_checkpoint(tmp_path / "bin") == files


def test_sharded_safetensors_with_prefixless_names(tmp_path):
    from safetensors.torch import save_file

    ref = make_checkpoint("opt", tmp_path / "ref")
    out = tmp_path / "sharded"
    out.mkdir()
    ref.config.save_pretrained(out)
    state = {k.removeprefix("model."): v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, out / fname)
        weight_map.update({k: fname for k in part})
    import json

    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    params = zinfer.SamplingParams(max_new_tokens=5, ignore_eos=True)
    a = zinfer.LLM(str(tmp_path / "ref"), device="cpu").generate(PROMPTS, params)
    b = zinfer.LLM(str(out), device="cpu").generate(PROMPTS, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_one_token_prompt(llm):
    out = llm.generate([[7]], zinfer.SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
    assert out.token_ids == llm.generate([[7], [5, 6, 9]], zinfer.SamplingParams(max_new_tokens=3,
                                                                                 ignore_eos=True))[0].token_ids


def test_continuation_keeps_leading_space(llm):
    out = llm.generate(["w5 w17"], zinfer.SamplingParams(max_new_tokens=2, ignore_eos=True))[0]
    assert out.text.startswith(" w") and len(out.text.split()) == 2


def test_cuda_device_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from zinfer.api import resolve_device

    with pytest.raises(zinfer.ZinferError, match="no CUDA GPU"):
        resolve_device(0)


def test_unseeded_sampling_leaves_global_rng_alone(llm):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    llm.generate(PROMPTS, zinfer.SamplingParams(max_new_tokens=3, temperature=1.0, ignore_eos=True))
    assert torch.equal(torch.rand(3), expected)
