"""Calibrated quantization: each quantized layer's grids fitted to the inputs it sees on a sample text.

Quantizing at load (`quant_bits=4`) sees only the weights: each group's grid minimises the weights' own error,
every column counting the same. Here the dense model first reads a text (up to CALIBRATION_TOKENS of it, one
window), every quantizable Linear records E[x_k^2] of its input columns, and each is then packed with
`quantize(method="weighted")`: a group's error is weighed by how strongly its columns are driven, which also
lets a grid clip extremes that rarely meet a large input. SmolLM2-135M int4 g64 on the shipped sample text:
+13.5% perplexity over fp32 against +50% for the weights-only fit (BENCHMARKS.md).

    llm = zinfer.LLM(path)                                  # dense
    calibrate_quantize(llm, text, QuantSpec(bits=4))        # in place
    llm.save(out)                                           # loads quantized, without calibrating again

`zinfer perplexity --quant-bits 4 --calibration FILE` measures it. The model must be in memory (no offload, one
rank): calibrate once where it fits, save, and load the quantized checkpoint anywhere.
"""

import torch

from zinfer.api import LLM
from zinfer.errors import InputError
from zinfer.layers.linear import quantize_here
from zinfer.quant import QuantSpec
from zinfer.runtime.batch import PaddedBatch
from zinfer.weights.loader import merged_groups, quantizable_linears

CALIBRATION_TOKENS = 2048


def input_second_moments(llm: LLM, ids: list[int], linears) -> dict:
    """{linear: E[x_k^2] [in]} over the tokens of one forward pass of `ids`. Fused q/k/v and gate/up matmuls are
    unfused meanwhile, so that each member sees its input."""
    merged = merged_groups(llm.model)
    sums = {}

    def record(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
        total, count = sums.get(module, (0.0, 0))
        sums[module] = (total + x.square().sum(0), count + x.shape[0])

    hooks = [m.register_forward_pre_hook(record) for m in linears]
    for group in merged:
        group.unfuse()
    batch = PaddedBatch.from_prompts([ids], llm.pad_token_id, len(ids), llm.device)
    try:
        with torch.inference_mode():  # only the hooks matter: the last position's logits, not the text's
            llm.model(batch.tokens, llm.engine.new_cache(1, len(ids)), batch.prefill_inputs(llm.model.sliding_window))
    finally:
        for h in hooks:
            h.remove()
        for group in merged:
            group.fuse()
    return {m: total / count for m, (total, count) in sums.items()}


def fit_options(moments: torch.Tensor | None) -> dict:
    """quantize()'s method for a layer with these input moments: the weighted fit, where a column the text never
    drove (E[x^2] = 0: a unit that stayed off, a pad) weighs as a median column instead of nothing, since other
    text will drive it; the weights-only refit for a layer the text never reached (an MoE expert no token chose)."""
    if moments is None or not bool((moments > 0).any()):
        return dict(method="refit")
    h = torch.where(moments > 0, moments, moments[moments > 0].median())
    return dict(method="weighted", channel_weights=h)


def calibrate_quantize(llm: LLM, text: str | list[int], spec: QuantSpec, tokens: int = CALIBRATION_TOKENS) -> LLM:
    """Quantize `llm`'s dense decoder Linears in place, each by the weighted fit to its inputs over `text` (a
    string, or token ids)."""
    if llm.quant is not None:
        raise InputError(f"the model is already quantized ({llm.quant}): calibrate a dense model")
    if llm.streamer is not None or llm.tp.size > 1:
        raise InputError("calibrated quantization needs the whole model in memory on one process: load it without "
                         "offload and with tp=1, calibrate, save(), then load the quantized checkpoint as you like")
    ids = (llm.encode([text])[0] if isinstance(text, str) else list(text))[:min(tokens, llm.model.max_positions)]
    if len(ids) < 2:
        raise InputError("the calibration text needs at least two tokens")
    linears = quantizable_linears(llm.model)
    moments = input_second_moments(llm, ids, linears)
    # all of them before any is swapped in: a failure (inf weights, out of memory) leaves the model dense
    packed = [quantize_here(m.weight.detach(), spec, m.weight.dtype, m.weight.device, **fit_options(moments.get(m)))
              for m in linears]
    for m, qw in zip(linears, packed):
        m.set_packed(qw)
    for group in merged_groups(llm.model):  # q/k/v and gate/up fused again, over the packed members
        group.fuse()
    llm.quant = spec
    llm.engine.release()  # compiled steps and graphs were made for the dense weights
    return llm
