"""KV cache offload: tokens equal to the device-resident cache for both decode attention methods, with weights
in memory, on NVMe or quantized; the planner's method choice and batch sizing; option errors. On the CPU the
"device" is the CPU too: the host cache is a separate set of tensors and the same functions run without events.
GPU tests (`-m gpu`) check pinned/async copies and streamed weights against the GPU-resident cache."""

import logging

import pytest
import torch

import zinfer
from helpers import CONFIGS, PROMPTS, make_checkpoint
from zinfer.config import EngineConfig
from zinfer.errors import InputError
from zinfer.kv import cache_len
from zinfer.kv.host import HostArrays
from zinfer.kv.offloaded import HostAttentionKVCache, OffloadedKVCache, PrefetchKVCache, offloaded_cache
from zinfer.offload.plan import (
    Bandwidths,
    KVPolicy,
    KVShape,
    kv_attention_costs,
    kv_plan_text,
    kv_shape,
    max_batch,
    pick_kv_attention,
    split_cost,
)
from zinfer.runtime import decode
from zinfer.runtime.decode import DecodeState
from zinfer.runtime.generator import Generator
from zinfer.weights.loader import build_empty
from zinfer.weights.source import resolve

PARAMS = zinfer.SamplingParams(max_new_tokens=6, ignore_eos=True)
METHODS = ("gpu", "cpu", "split")
# parameter ids must not be "gpu": conftest skips every test with a "gpu" keyword on a machine without CUDA
ON = dict(ids=["attend-on-device", "attend-on-host", "attend-split"])
GiB = 2**30


def tokens(llm, prompts=PROMPTS, params=PARAMS):
    return [c.token_ids for c in llm.generate(prompts, params)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_checkpoint(request.param, directory)
    return directory


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-gqa")
    make_checkpoint("llama-gqa-tied", directory)
    return directory


# --- tokens equal to the device-resident cache ------------------------------------------------------------

def test_every_family_same_tokens_offloaded(ckpt):
    expected = tokens(zinfer.LLM(str(ckpt), device="cpu"))
    for method in METHODS:
        llm = zinfer.LLM(str(ckpt), device="cpu", kv_offload=True, kv_attention=method)
        assert tokens(llm) == expected, method
        cache = llm.engine.state.cache
        assert cache.offloaded and cache.method == method and cache.host_bytes > 0
        assert llm.engine.kv_choice.method == method


@pytest.mark.parametrize("method", METHODS, **ON)
def test_only_written_rows_are_read(llama, method, monkeypatch):
    """Host rows are never initialised: fill them with NaN, and the tokens must not notice."""
    expected = tokens(zinfer.LLM(str(llama), device="cpu"))
    init = OffloadedKVCache.__init__

    def poisoned(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for arrays in (self.keys, self.values):
            for t in arrays:
                t.fill_(float("nan"))

    monkeypatch.setattr(OffloadedKVCache, "__init__", poisoned)
    assert tokens(zinfer.LLM(str(llama), device="cpu", kv_offload=True, kv_attention=method)) == expected


@pytest.mark.parametrize("method", METHODS, **ON)
def test_reused_cache_one_token_prompts_and_window(llama, method):
    """A second request on the same cache (stale prefetches dropped), one-token prompts (a prefill that goes
    through attend), and a sliding window (the mask decides, the cache does not)."""
    ref = zinfer.LLM(str(llama), device="cpu")
    llm = zinfer.LLM(str(llama), device="cpu", kv_offload=True, kv_attention=method)
    other = [[9, 8, 7, 6], [40, 41, 42, 43, 44, 45, 46], [100]]
    assert tokens(llm) == tokens(ref)
    cache = llm.engine.state.cache
    assert tokens(llm, other) == tokens(ref, other)
    assert llm.engine.state.cache is cache  # same bucket: the host cache was reused
    assert tokens(llm, [[5]]) == tokens(ref, [[5]])
    ones = [[5], [6], [7]]  # one-token prompts in a batch a split cache takes: its prefill goes through attend
    assert tokens(llm, ones) == tokens(ref, ones)
    # the last step of a 7-token prompt + 3 tokens prefetches layer 0's rows [0, 9) for a next step; a 9-token
    # prompt in the same bucket starts decoding at slot 9: that prefetch is stale and must not be used
    three = zinfer.SamplingParams(max_new_tokens=3, ignore_eos=True)
    nine = [[11, 12, 13, 14, 15, 16, 17, 18, 19]] * 3
    assert tokens(llm, params=three) == tokens(ref, params=three)
    cache = llm.engine.state.cache
    assert tokens(llm, nine, three) == tokens(ref, nine, three) and llm.engine.state.cache is cache
    ref.model.sliding_window = llm.model.sliding_window = 3
    assert tokens(llm) == tokens(ref)


@pytest.mark.parametrize("method", METHODS, **ON)
def test_nvme_streamed_weights_with_offloaded_cache(llama, method, tmp_path):
    expected = tokens(zinfer.LLM(str(llama), device="cpu"))
    llm = zinfer.LLM(str(llama), device="cpu", offload="nvme", offload_dir=str(tmp_path), kv_offload=True,
                     kv_attention=method)
    assert llm.streamer is not None
    assert tokens(llm) == expected


@pytest.mark.parametrize("method", METHODS, **ON)
def test_quantized_weights_with_offloaded_cache(llama, method):
    expected = tokens(zinfer.LLM(str(llama), device="cpu", quant_bits=4))
    assert tokens(zinfer.LLM(str(llama), device="cpu", quant_bits=4, kv_offload=True,
                             kv_attention=method)) == expected


def test_auto_pick_is_logged(llama, caplog):
    llm = zinfer.LLM(str(llama), device="cpu", kv_offload=True)
    with caplog.at_level(logging.INFO, logger="zinfer.runtime.generator"):
        tokens(llm)
    assert llm.engine.kv_choice.reason.startswith("auto: ") and not llm.engine.kv.concurrent
    assert f"decode attention on {llm.engine.kv_choice.method}: auto: " in caplog.text
    assert "KV cache: offloaded to CPU memory, synchronous writes" in caplog.text


def test_offloaded_cache_never_graph_captured():
    model = build_empty(CONFIGS["llama"](), meta=False)
    cache = offloaded_cache("gpu", model.num_layers, 2, model.num_kv_heads, model.head_dim, 16, torch.float32, "cpu")
    state = DecodeState(model, 2, 16, torch.float32, "cpu", use_graph=True, fuse=True, cache=cache)
    assert not state.use_graph and state.forward == state._forward and state.cache is cache
    gen = Generator(model, torch.device("cpu"), torch.float32, compile=True, kv=KVPolicy(offload=True))
    assert not gen.use_graph and not gen.fuse


def test_cache_interface_errors():
    cache = offloaded_cache("cpu", 1, 1, 1, 4, 16, torch.float32, "cpu")
    assert isinstance(cache, HostAttentionKVCache)
    assert isinstance(offloaded_cache("gpu", 1, 1, 1, 4, 16, torch.float32, "cpu"), PrefetchKVCache)
    k = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="takes a whole prompt at once .* 2 new keys but kv_len=5"):
        cache.write(0, k, k, torch.arange(2), 5)
    one = torch.zeros(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match=r"needs begin_step\(slot\) first"):
        cache.attend_decode(0, one, one, one, None, None, None)
    with pytest.raises(ValueError, match="runs on 'gpu', 'cpu' or 'split'; got 'tpu'"):
        offloaded_cache("tpu", 1, 1, 1, 4, 16, torch.float32, "cpu")
    for rows in (0, 2):
        with pytest.raises(ValueError, match=f"a split KV cache needs 0 < gpu_rows < batch size \\(2\\); got {rows}"):
            offloaded_cache("split", 1, 2, 1, 4, 16, torch.float32, "cpu", gpu_rows=rows)


# --- the planner: method choice and batch sizing --------------------------------------------------------

SHAPE = KVShape(layers=64, heads=72, kv_heads=72, head_dim=128, hidden=9216, ffn=36864, vocab=50272, itemsize=2)


def test_costs_follow_the_formulas():
    bw = Bandwidths(pcie=25e9, host_memory=100e9, cpu_flops=1e12)
    gpu_s, cpu_s = kv_attention_costs(SHAPE, batch=8, length=1000, bw=bw)
    elements = 2 * 8 * 1000 * 72 * 128
    assert gpu_s == pytest.approx(64 * elements * 2 / 25e9)
    per_layer = max(4 * 8 * 72 * 1000 * 128 / 1e12, elements * (2 + 8) / (100e9 * 0.4)) + 30e-6
    assert cpu_s == pytest.approx(64 * per_layer)
    # streamed weights share PCIe with the gpu method; the cpu method overlaps them
    gpu_w, cpu_w = kv_attention_costs(SHAPE, 8, 1000, bw, streamed_bytes=25 * GiB)
    assert gpu_w == pytest.approx(gpu_s + 25 * GiB / 25e9)
    assert cpu_w == pytest.approx(max(cpu_s, 25 * GiB / 25e9))


def test_pick_by_bandwidth_batch_and_override():
    bw = Bandwidths(pcie=25e9, host_memory=600e9, cpu_flops=2e12, source="fake")
    # a large batch: PCIe and host memory both work when the batch is split between the methods
    auto = pick_kv_attention(SHAPE, 64, 540, bw, streamed_bytes=10 * GiB)
    assert auto.method == "split" and auto.split_s < min(auto.gpu_s, auto.cpu_s)
    assert str(auto).startswith("decode attention on split: auto: ") and "fake rates" in auto.reason
    assert f"split ({auto.gpu_rows} of 64 sequences on gpu)" in auto.reason
    # tiny batch: the CPU's per-layer round trip outweighs the few bytes the GPU would fetch; one row cannot split
    assert pick_kv_attention(SHAPE, 1, 16, bw).method == "gpu"
    # one side far slower than the other: the whole batch goes to the fast one
    assert pick_kv_attention(SHAPE, 64, 540, Bandwidths(pcie=100e9, host_memory=1e8, cpu_flops=1e11)).method == "gpu"
    assert pick_kv_attention(SHAPE, 64, 540, Bandwidths(pcie=1e6, host_memory=600e9, cpu_flops=2e12)).method == "cpu"
    forced = pick_kv_attention(SHAPE, 64, 540, bw, forced="gpu")
    assert forced.method == "gpu" and forced.reason.startswith("kv_attention='gpu' asked for") and forced.gpu_rows == 0
    split = pick_kv_attention(SHAPE, 8, 540, Bandwidths(pcie=1e6, host_memory=600e9), forced="split")
    assert (split.method, split.gpu_rows) == ("split", 1)  # at least one row each way, however lopsided
    one = pick_kv_attention(SHAPE, 1, 16, bw, forced="split")
    assert one.method == "gpu" and "a batch of one cannot be split: gpu" in one.reason
    assert KVPolicy(True, attention="cpu", bandwidths=bw).pick(SHAPE, 1, 16).method == "cpu"
    # a CPU compute device runs both shares on the same cores, one after the other: auto never splits there
    serial = KVPolicy(True, bandwidths=bw, streamed_bytes=10 * GiB, concurrent=False).pick(SHAPE, 64, 540)
    assert serial.method != "split" and serial.reason.endswith("(a CPU compute device or an unpinned cache)")
    assert KVPolicy(True, attention="split", bandwidths=bw, concurrent=False).pick(SHAPE, 64, 540).method == "split"


def test_split_balances_the_two_shares():
    """The split puts rows on the GPU until its PCIe share (weights + those rows' KV) meets the CPU's share."""
    bw = Bandwidths(pcie=50e9, host_memory=150e9, cpu_flops=1e12, host_read=75e9)
    streamed, batch, length = 34 * GiB, 63, 528
    rows, step = split_cost(SHAPE, batch, length, bw, streamed, host_compiled=True)
    row_bytes = 64 * 2 * length * 72 * 128 * 2  # one sequence's keys and values over all layers
    gpu_share = (streamed + rows * row_bytes) / 50e9
    cpu_share = 64 * ((batch - rows) * row_bytes / 64 / (75e9 * 0.4) + 30e-6)
    assert step == pytest.approx(max(gpu_share, cpu_share))
    # one row more on either side makes the longer share longer
    assert (streamed + (rows + 1) * row_bytes) / 50e9 > step - 1e-9
    assert 64 * ((batch - rows + 1) * row_bytes / 64 / (75e9 * 0.4) + 30e-6) > step - 1e-9
    gpu_s, cpu_s = kv_attention_costs(SHAPE, batch, length, bw, streamed, host_compiled=True)
    assert step < 0.7 * min(gpu_s, cpu_s)
    assert split_cost(SHAPE, 1, length, bw, streamed) == (0, float("inf"))


def test_max_batch_each_placement():
    model = build_empty(resolve("opt-66b").config)
    shape = kv_shape(model, torch.float16)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.ffn) == (64, 72, 128, 36864)
    seq, prompt = 544, 512
    gpu_free, host_free = 20 * GiB, 200 * GiB
    per_token = 2 * 64 * 72 * 128 * 2
    act = shape.prefill_bytes(prompt)
    t_dev, t_host = cache_len(seq), cache_len(seq, offloaded=True)
    assert (t_dev, t_host) == (640, 544)
    on_gpu = max_batch(model, torch.float16, seq, gpu_free, host_free, kv_offload=False, prompt_len=prompt)
    assert on_gpu == int(0.95 * gpu_free) // (per_token * t_dev + act + 9 * t_dev)
    cpu = max_batch(model, torch.float16, seq, gpu_free, host_free, True, "cpu", prompt)
    assert cpu == min(int(0.9 * (host_free - 4 * GiB)) // (per_token * t_host),
                      int(0.95 * gpu_free) // (act + 9 * t_host))
    gpu = max_batch(model, torch.float16, seq, gpu_free, host_free, True, "gpu", prompt)
    assert gpu <= cpu and cpu > on_gpu > 0
    # a small GPU: the double buffer of one layer's K/V bounds the prefetching method
    assert max_batch(model, torch.float16, seq, GiB, host_free, True, "gpu", prompt) < \
        max_batch(model, torch.float16, seq, GiB, host_free, True, "cpu", prompt)
    assert max_batch(model, torch.float16, seq, 0, host_free, False) == 0


def test_plan_text():
    model = build_empty(resolve("opt-66b").config)
    options = EngineConfig(offload="cpu", kv_offload=True, pin_kv_cache=True, async_kv_offload=True)
    text = kv_plan_text(model, torch.float16, options, 512, 32, 20 * GiB, 200 * GiB, batch=32,
                        bandwidths=Bandwidths(pcie=25e9, host_memory=100e9, cpu_flops=1e12))
    assert text.splitlines()[0] == ("KV cache: offloaded to pinned CPU memory, async device-to-host writes on a "
                                    "side stream; decode attention: auto (on the CPU: eager)")
    assert "batch 32 x 544 tokens: " in text and "decode attention on " in text
    assert "largest batch for 512+32 tokens: " in text and "offloaded (200.0 GiB host memory free" in text
    plain = kv_plan_text(model, torch.float16, EngineConfig(), 512, 32, 20 * GiB, 200 * GiB)
    assert plain.startswith("KV cache: on the compute device\nlargest batch")
    # a large batch splits over a pinned cache, as the runtime would; unpinned the runtime never splits: nor does plan
    bw = Bandwidths(pcie=50e9, host_memory=100e9, cpu_flops=1e12, host_read=80e9)
    pinned = kv_plan_text(model, torch.float16, options, 512, 32, 20 * GiB, 200 * GiB, batch=62, bandwidths=bw,
                          streamed_bytes=34 * GiB, host_compiled=True)
    assert "decode attention on split: auto: " in pinned
    unpinned = kv_plan_text(model, torch.float16, EngineConfig(offload="cpu", kv_offload=True), 512, 32, 20 * GiB,
                            200 * GiB, batch=62, bandwidths=bw, streamed_bytes=34 * GiB, host_compiled=True)
    assert "decode attention on split" not in unpinned and "(a CPU compute device or an unpinned cache)" in unpinned


# --- option and memory errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(pin_kv_cache=True), "pin_kv_cache=True pins the offloaded KV cache: it needs kv_offload=True"),
    (dict(async_kv_offload=True), "async_kv_offload=True copies keys/values to the offloaded cache: it needs "
                                  "kv_offload=True"),
    (dict(kv_attention="cpu"), "kv_attention='cpu' chooses where attention over an offloaded KV cache runs: "
                               "it needs kv_offload=True"),
    (dict(kv_offload=True, kv_attention="tpu"), "kv_attention must be auto, gpu, cpu or split; got 'tpu'"),
])
def test_option_errors(options, message):
    with pytest.raises(InputError) as err:
        EngineConfig(**options)
    assert str(err.value) == message


def test_host_memory_refused_with_numbers(llama, monkeypatch):
    monkeypatch.setattr("zinfer.offload.plan.free_host_bytes", lambda: 1000)
    llm = zinfer.LLM(str(llama), device="cpu", kv_offload=True)
    with pytest.raises(InputError, match=r"the offloaded KV cache needs 0.00 GiB of host memory but 0.00 GiB is "
                                         r"available; lower the batch size or max_new_tokens"):
        tokens(llm)
    assert decode.check_host_fits(0) is None


# --- on a CUDA device -------------------------------------------------------------------------------------

GPU_CASES = [dict(kv_attention="gpu"), dict(kv_attention="cpu"),
             dict(kv_attention="gpu", pin_kv_cache=True, async_kv_offload=True),
             dict(kv_attention="cpu", pin_kv_cache=True, async_kv_offload=True), dict(kv_attention="split"),
             dict(kv_attention="split", pin_kv_cache=True, async_kv_offload=True)]


@pytest.fixture(scope="module", params=["llama-gqa-tied", "opt", "bloom"])
def gpu_ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"gpu-{request.param}")
    make_checkpoint(request.param, directory)
    return directory


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gpu_offloaded_equals_resident(gpu_ckpt, case):
    params = zinfer.SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = tokens(zinfer.LLM(str(gpu_ckpt), dtype="float32", device="cuda"), params=params)
    llm = zinfer.LLM(str(gpu_ckpt), dtype="float32", device="cuda", kv_offload=True, **case)
    assert tokens(llm, params=params) == expected
    assert tokens(llm, [[7, 8, 9]], params) == tokens(zinfer.LLM(str(gpu_ckpt), dtype="float32", device="cuda"),
                                                      [[7, 8, 9]], params)
    state = llm.engine.state  # the batch-1 bucket: a split falls back to one method there
    assert state.graph is None and not state.use_graph
    assert tokens(llm, params=params) == expected  # the three prompts again: a bucket of 3, split 1:2 or 2:1
    cache = llm.engine.state.cache
    parts = (cache.on_device, cache.on_host) if case["kv_attention"] == "split" else (cache,)
    assert cache.method == case["kv_attention"] and (cache.method != "split" or 0 < cache.gpu_rows < len(PROMPTS))
    for part in parts:
        assert part.keys[0].device.type == "cpu"
        assert part.keys[0].is_pinned() == bool(case.get("pin_kv_cache"))


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS, **ON)
def test_gpu_offloaded_cache_with_cpu_streamed_weights(gpu_ckpt, method):
    expected = tokens(zinfer.LLM(str(gpu_ckpt), dtype="float32", device="cuda"))
    llm = zinfer.LLM(str(gpu_ckpt), dtype="float32", device="cuda", offload="cpu", kv_offload=True,
                     pin_kv_cache=True, async_kv_offload=True, kv_attention=method)
    assert tokens(llm) == expected
    assert llm.plan.streamed and llm.engine.kv_choice.method == method  # picked per bucket, at generation


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS, **ON)
def test_gpu_half_precision_logits_close(gpu_ckpt, method):
    """fp16: host attention upcasts to fp32, so only rounding differs from the resident cache's first step."""
    params = zinfer.SamplingParams(max_new_tokens=2, ignore_eos=True)
    ref = zinfer.LLM(str(gpu_ckpt), dtype="float16", device="cuda", compile=False)
    llm = zinfer.LLM(str(gpu_ckpt), dtype="float16", device="cuda", kv_offload=True, kv_attention=method,
                     pin_kv_cache=True, async_kv_offload=True)
    outs = []
    slot = max(len(p) for p in PROMPTS) + 1  # rows [0, slot) hold the prompt and the one token fed back
    for m in (ref, llm):
        m.generate(PROMPTS, params)
        with torch.inference_mode():  # the static buffers are inference tensors
            outs.append(m.engine.state.step(torch.tensor([3, 4, 5], device="cuda"), slot).float())
    assert ((outs[0] - outs[1]).norm() / outs[0].norm()).item() < 1e-2


@pytest.mark.gpu
def test_gpu_large_host_arrays_registered_in_place():
    """Past REGISTER_MIN the cache is page-locked where it lies (no power-of-two rounding), and DMA works."""
    arrays = HostArrays(2, (40 << 20,), torch.float16, pin=True)  # 2 x 80 MiB
    assert arrays.nbytes == 160 << 20 and all(t.is_pinned() for t in arrays)
    src = torch.randn(40 << 20, device="cuda", dtype=torch.float16)
    arrays[1].copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(arrays[1].cuda(), src)
    del arrays  # unregisters first
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_cache_attends_on_host_in_fp32_chunks(llama, dtype, monkeypatch):
    # a half-precision cache attends on the CPU in fp32 through reused buffers, a few sequences a call: one sequence
    # per call gives the tokens of the whole batch at once (each sequence's math is the same), and the buffers stay
    import zinfer.kv.offloaded as offloaded

    made, init = [], HostAttentionKVCache.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(HostAttentionKVCache, "__init__", recorded)

    def run(chunk_bytes):
        monkeypatch.setattr(offloaded, "HOST_CHUNK_BYTES", chunk_bytes)
        return tokens(zinfer.LLM(str(llama), dtype=dtype, device="cpu", kv_offload=True, kv_attention="cpu"))

    whole = run(1 << 40)
    assert "k32" in made[-1].staging and made[-1].upcast_buffers()[0].shape[0] == len(PROMPTS)
    one_each = run(1)
    assert one_each == whole
    k32, v32 = made[-1].upcast_buffers()
    assert k32.shape[0] == 1 and k32.dtype == v32.dtype == torch.float32
    # the host memory they take is counted with the cache's own (the check before allocating counts it too)
    cache = made[-1]
    assert cache.host_bytes == cache.keys.nbytes + cache.values.nbytes + k32.nbytes + v32.nbytes
    t_max, b, h, d = cache.shape
    assert offloaded.host_attention_bytes(b, h, t_max, d, cache.dtype) == k32.nbytes + v32.nbytes


def test_decode_attention_as_reduction_equals_matmuls():
    # the multiply-and-sum form a CPU-attended cache compiles is the matmul form's math: GQA, padding mask, ALiBi
    # bias; a half-precision cache is read as it lies with fp32 products
    from zinfer.layers.attention import decode_attention

    g = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 3, 4, 2, 7, 16
    q = torch.randn(b, h, 1, d, generator=g)
    keys, values = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    mask = torch.rand(b, 1, 1, t, generator=g) > 0.4
    mask[..., 0] = True
    bias = torch.randn(1, h, 1, t, generator=g)
    for m, bi in ((None, None), (mask, None), (mask, bias)):
        ref = decode_attention(q, keys, values, m, bi, d ** -0.5, hkv)
        red = decode_attention(q, keys, values, m, bi, d ** -0.5, hkv, reduce=True)
        assert red.dtype == torch.float32 and red.shape == ref.shape == (b, h, 1, d)
        torch.testing.assert_close(red, ref, rtol=1e-5, atol=1e-5)
    k16, v16 = keys.bfloat16(), values.bfloat16()
    torch.testing.assert_close(decode_attention(q.bfloat16(), k16, v16, mask, None, d ** -0.5, hkv, reduce=True),
                               decode_attention(q.bfloat16().float(), k16.float(), v16.float(), mask, None,
                                                d ** -0.5, hkv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "bloom"])
def test_compiled_host_attention_same_tokens(kind, tmp_path, monkeypatch):
    # compile=True on a CPU compiles attention over the host cache (the default when computing on a GPU): the
    # tokens of the eager path, no fp32 upcast buffers, and the compiled form is what ran
    import zinfer.layers.attention as attention

    make_checkpoint(kind, tmp_path)
    eager = zinfer.LLM(str(tmp_path), dtype="bfloat16", device="cpu", kv_offload=True, kv_attention="cpu")
    expected = tokens(eager)
    assert not eager.engine.kv.host_compiled
    torch._dynamo.reset()
    compiled_calls, compiled = [], attention._compiled_decode

    def spy():
        compiled_calls.append(1)
        return compiled()

    monkeypatch.setattr(attention, "_compiled_decode", spy)
    llm = zinfer.LLM(str(tmp_path), dtype="bfloat16", device="cpu", kv_offload=True, kv_attention="cpu",
                     compile=True)
    assert tokens(llm) == expected
    cache = llm.engine.state.cache
    assert llm.engine.kv.host_compiled and cache.compiled and "k32" not in cache.staging
    assert len(compiled_calls) == llm.model.num_layers * (PARAMS.max_new_tokens - 1)
    m = llm.model
    assert zinfer.kv.offloaded.host_attention_bytes(3, m.num_kv_heads, 64, m.head_dim, torch.bfloat16,
                                                    compiled=True) == 0


def test_host_check_counts_the_upcast_buffers(llama, monkeypatch):
    # attention on the CPU over a bf16 cache also needs its fp32 buffers: a host with room for the cache alone
    # but not for them is refused before anything is allocated, with the numbers; an fp32 cache needs none
    from zinfer.kv.offloaded import host_attention_bytes
    from zinfer.offload.plan import HOST_FILL

    def llm(dtype):
        return zinfer.LLM(str(llama), dtype=dtype, device="cpu", kv_offload=True, kv_attention="cpu")

    probe = llm("bfloat16")
    tokens(probe, prompts=PROMPTS[:1])
    m, cache = probe.model, probe.engine.state.cache
    extra = host_attention_bytes(cache.batch_size, m.num_kv_heads, cache.max_len, m.head_dim, torch.bfloat16)
    arrays = cache.keys.nbytes + cache.values.nbytes
    assert extra > 0 and host_attention_bytes(1, 2, 8, 16, torch.float32) == 0
    free = int((arrays + extra // 2) / HOST_FILL)  # room for the arrays and half the buffers
    monkeypatch.setattr("zinfer.offload.plan.free_host_bytes", lambda: free)
    with pytest.raises(InputError, match=r"the offloaded KV cache needs [\d.]+ GiB of host memory but"):
        tokens(llm("bfloat16"), prompts=PROMPTS[:1])
    monkeypatch.setattr("zinfer.offload.plan.free_host_bytes", lambda: int((arrays + extra) / HOST_FILL) + 64)
    tokens(llm("bfloat16"), prompts=PROMPTS[:1])  # room for both: runs
