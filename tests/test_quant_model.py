"""Quantized models: the packed path computes the model on the dequantized weights, and stays invisible
to the model files; quantized checkpoints save/load; packed bytes are what is stored and streamed."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import zinfer
from helpers import CONFIGS, PROMPTS, make_checkpoint
from zinfer.layers.linear import Linear
from zinfer.quant import dequantize
from zinfer.runtime.batch import PaddedBatch

PARAMS = zinfer.SamplingParams(max_new_tokens=6, ignore_eos=True)


def last_logits(llm, prompts=PROMPTS):
    p = max(len(x) for x in prompts)
    batch = PaddedBatch.from_prompts(prompts, 0, p, "cpu")
    with torch.no_grad():
        return llm.model(batch.tokens, llm.engine.new_cache(len(prompts), p), batch.prefill_inputs())[:, -1]


def dense_twin(directory, quantized):
    """The dense model with every quantized Linear's weight replaced by its dequantized packed weight."""
    dense = zinfer.LLM(str(directory), device="cpu")
    qmods = dict(quantized.model.named_modules())
    with torch.no_grad():
        for name, m in dense.model.named_modules():
            q = qmods.get(name)
            if isinstance(m, Linear) and q is not None and q.qspec is not None:
                if m is dense.model.lm_head:  # its own tensor: a tied head's weight is the embedding's
                    m.weight = torch.nn.Parameter(dequantize(q.packed, torch.float32), requires_grad=False)
                else:
                    m.weight.copy_(dequantize(q.packed, torch.float32))
    return dense


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_checkpoint(request.param, directory)
    return request.param, directory


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_equals_dense_on_dequantized_weights(ckpt, bits):
    kind, directory = ckpt
    q = zinfer.LLM(str(directory), device="cpu", quant_bits=bits, quant_group_size=32)
    assert any(m.qspec is not None for m in q.model.modules() if isinstance(m, Linear))
    twin = dense_twin(directory, q)
    torch.testing.assert_close(last_logits(q), last_logits(twin), rtol=1e-4, atol=1e-4)
    assert [c.token_ids for c in q.generate(PROMPTS, PARAMS)] == [c.token_ids for c in twin.generate(PROMPTS, PARAMS)]


def test_embeddings_head_norms_router_stay_dense(tmp_path):
    make_checkpoint("mixtral", tmp_path)
    q = zinfer.LLM(str(tmp_path), device="cpu", quant_bits=4, quant_group_size=32)
    m = q.model
    assert m.lm_head.qspec is None and m.model.embed_tokens.weight.dtype == torch.float32
    layer = m.model.layers[0]
    assert layer.block_sparse_moe.gate.qspec is None
    assert layer.block_sparse_moe.experts[0].w1.qspec is not None and layer.self_attn.q_proj.qspec is not None


EMBEDDING = {"llama": "model.embed_tokens.weight", "llama-gqa-tied": "model.embed_tokens.weight",
             "opt": "model.decoder.embed_tokens.weight", "bloom": "transformer.word_embeddings.weight"}


@pytest.mark.parametrize("kind", sorted(EMBEDDING))  # untied; tied under each family's own names
def test_packed_lm_head_equals_dense_on_dequantized_weights(tmp_path, kind):
    make_checkpoint(kind, tmp_path)
    q = zinfer.LLM(str(tmp_path), device="cpu", quant_bits=4, quant_group_size=32, quant_lm_head=True)
    head, embed = q.model.lm_head, q.model.get_parameter(EMBEDDING[kind])
    assert head.qspec is not None and not hasattr(head, "weight") and q.model.tied_weights == {}
    state = load_file(tmp_path / "model.safetensors")
    torch.testing.assert_close(embed, state[EMBEDDING[kind]], rtol=0, atol=0)  # the embedding stays dense
    # the head is packed from its own checkpoint tensor, or from the embedding it is tied to
    source = state.get("lm_head.weight", state[EMBEDDING[kind]])
    assert (dequantize(head.packed, torch.float32) - source).abs().max() <= head.scale.max() / 2 + 1e-6
    twin = dense_twin(tmp_path, q)
    assert twin.model.lm_head.weight.data_ptr() != embed.data_ptr()
    torch.testing.assert_close(last_logits(q), last_logits(twin), rtol=1e-4, atol=1e-4)
    assert [c.token_ids for c in q.generate(PROMPTS, PARAMS)] == [c.token_ids for c in twin.generate(PROMPTS, PARAMS)]


def test_saved_packed_head_loads_as_saved(tmp_path, monkeypatch):
    make_checkpoint("llama-gqa-tied", tmp_path / "dense")
    q = zinfer.LLM(str(tmp_path / "dense"), device="cpu", quant_bits=8, quant_group_size=32, quant_lm_head=True)
    q.save(tmp_path / "q8")
    dense_head = zinfer.LLM(str(tmp_path / "dense"), device="cpu", quant_bits=8, quant_group_size=32)
    dense_head.save(tmp_path / "q8-dense-head")
    saved = load_file(tmp_path / "q8" / "model.safetensors")
    assert "lm_head.qweight" in saved and "lm_head.weight" not in saved and "model.embed_tokens.weight" in saved
    import zinfer.layers.linear as linear

    monkeypatch.setattr(linear, "quantize", lambda *a, **k: pytest.fail("re-quantized a quantized checkpoint"))
    again = zinfer.LLM(str(tmp_path / "q8"), device="cpu")
    assert again.quant_lm_head and again.model.lm_head.qspec is not None
    assert [c.token_ids for c in again.generate(PROMPTS, PARAMS)] == [c.token_ids for c in q.generate(PROMPTS, PARAMS)]
    # a dense head is not written down: versions without the option read the file as a bare QuantSpec
    assert "lm_head" not in json.loads((tmp_path / "q8-dense-head" / "quant_config.json").read_text())
    with pytest.raises(zinfer.ZinferError, match="LM head dense; it cannot be loaded as .*LM head packed"):
        zinfer.LLM(str(tmp_path / "q8-dense-head"), device="cpu", quant_lm_head=True)


def test_packed_lm_head_streamed_model_and_missing_head(tmp_path):
    make_checkpoint("opt", tmp_path / "ckpt")
    opts = dict(device="cpu", quant_bits=4, quant_group_size=32, quant_lm_head=True)
    resident = zinfer.LLM(str(tmp_path / "ckpt"), **opts)
    streamed = zinfer.LLM(str(tmp_path / "ckpt"), offload="nvme", offload_dir=str(tmp_path / "off"), **opts)
    assert streamed.model.lm_head.qspec is not None
    assert [c.token_ids for c in streamed.generate(PROMPTS, PARAMS)] == [
        c.token_ids for c in resident.generate(PROMPTS, PARAMS)]
    make_checkpoint("llama", tmp_path / "headless")
    state = load_file(tmp_path / "headless" / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "headless" / "model.safetensors")
    with pytest.raises(zinfer.ZinferError, match=r"missing 1 tensor\(s\): lm_head.weight \(or its packed qweight"):
        zinfer.LLM(str(tmp_path / "headless"), **opts)
    make_checkpoint("llama-gqa-tied", tmp_path / "no-embedding")  # the tied head's source is named, not the head
    state = load_file(tmp_path / "no-embedding" / "model.safetensors")
    del state["model.embed_tokens.weight"]
    save_file(state, tmp_path / "no-embedding" / "model.safetensors")
    with pytest.raises(zinfer.ZinferError, match=r"missing 1 tensor\(s\): model.embed_tokens.weight$"):
        zinfer.LLM(str(tmp_path / "no-embedding"), **opts)


def test_packed_lm_head_needs_quantized_layers(tmp_path):
    make_checkpoint("llama", tmp_path)
    with pytest.raises(zinfer.ZinferError, match="quant_lm_head .* needs quant_bits=4 or 8"):
        zinfer.LLM(str(tmp_path), device="cpu", quant_lm_head=True)


def test_saved_quantized_checkpoint_loads_without_requantizing(tmp_path, monkeypatch):
    make_checkpoint("llama-gqa-tied", tmp_path / "dense")
    q = zinfer.LLM(str(tmp_path / "dense"), device="cpu", quant_bits=4, quant_group_size=32)
    q.save(tmp_path / "q4")
    assert (tmp_path / "q4" / "quant_config.json").exists()
    import zinfer.layers.linear as linear

    monkeypatch.setattr(linear, "quantize", lambda *a, **k: pytest.fail("re-quantized a quantized checkpoint"))
    again = zinfer.LLM(str(tmp_path / "q4"), device="cpu")
    assert [c.token_ids for c in again.generate(PROMPTS, PARAMS)] == [c.token_ids for c in q.generate(PROMPTS, PARAMS)]
    with pytest.raises(zinfer.ZinferError, match="cannot be loaded as"):
        zinfer.LLM(str(tmp_path / "q4"), device="cpu", quant_bits=8)


def test_quantized_disk_offload_streams_packed_bytes(tmp_path):
    make_checkpoint("opt", tmp_path / "ckpt")
    resident = zinfer.LLM(str(tmp_path / "ckpt"), device="cpu", quant_bits=4, quant_group_size=32)
    streamed = zinfer.LLM(str(tmp_path / "ckpt"), device="cpu", quant_bits=4, quant_group_size=32,
                          offload="nvme", offload_dir=str(tmp_path / "off"))
    dense = zinfer.LLM(str(tmp_path / "ckpt"), device="cpu", offload="nvme", offload_dir=str(tmp_path / "off2"))
    assert [c.token_ids for c in streamed.generate(PROMPTS, PARAMS)] == [
        c.token_ids for c in resident.generate(PROMPTS, PARAMS)]
    q_bytes = sum(u.nbytes for u in streamed.plan.streamed)
    d_bytes = sum(u.nbytes for u in dense.plan.streamed)
    assert q_bytes < 0.3 * d_bytes  # fp32 -> int4 + fp32 scale/zero per 32 weights (~0.19x) + norms


def test_outliers_and_constant_groups_stay_finite(tmp_path):
    make_checkpoint("llama", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    w = state["model.layers.0.mlp.up_proj.weight"]
    w[0, 0] = 1e4  # an outlier that dominates its group's range
    w[1, :32] = 0.37  # an all-constant group
    w[2, :] = 0.0
    save_file(state, tmp_path / "model.safetensors")
    for bits in (4, 8):
        q = zinfer.LLM(str(tmp_path), device="cpu", quant_bits=bits, quant_group_size=32)
        logits = last_logits(q)
        assert torch.isfinite(logits).all()
        assert len(q.generate(PROMPTS, PARAMS)[0].token_ids) == 6


def test_dummy_quantized_model(tmp_path):
    q = zinfer.LLM("opt-125m", dummy=True, device="cpu", quant_bits=4)
    assert q.model.model.decoder.layers[0].fc1.qspec.bits == 4
    assert len(q.generate([[5, 6, 7]], zinfer.SamplingParams(max_new_tokens=2, ignore_eos=True))[0].token_ids) == 2
