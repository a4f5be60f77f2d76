"""Weight offload on the CPU: the planner, NVMe-streamed generation equal to in-memory, store validation."""

import logging

import pytest
import torch

import zinfer
from helpers import CONFIGS, PROMPTS, make_checkpoint
from zinfer.config import EngineConfig
from zinfer.errors import InputError
from zinfer.offload.nvme import OffloadDirError
from zinfer.offload.plan import CPU, GPU, NVME, decoder_layers, make_plan
from zinfer.weights.loader import build_empty

PARAMS = zinfer.SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def ckpt(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    make_checkpoint(request.param, directory)
    return directory


def test_disk_offloaded_tokens_equal_in_memory(ckpt, tmp_path):
    expected = [c.token_ids for c in zinfer.LLM(str(ckpt), device="cpu").generate(PROMPTS, PARAMS)]
    llm = zinfer.LLM(str(ckpt), device="cpu", offload="nvme", offload_dir=str(tmp_path))
    assert [u.place for u in llm.plan.units][1:] == [NVME] * llm.model.num_layers
    assert [c.token_ids for c in llm.generate(PROMPTS, PARAMS)] == expected
    # the layers hold no weights between steps: they live only in the store
    assert all(p.numel() == 0 for p in decoder_layers(llm.model)[0].parameters())


def test_store_reused_then_rebuilt_when_corrupt(tmp_path):
    directory = tmp_path / "ckpt"
    make_checkpoint("llama", directory)
    offload = tmp_path / "offload"
    expected = [c.token_ids for c in zinfer.LLM(str(directory), device="cpu").generate(PROMPTS, PARAMS)]
    zinfer.LLM(str(directory), device="cpu", offload="nvme", offload_dir=str(offload))
    (store,) = [p for p in offload.iterdir() if p.is_dir()]
    data = next(store.glob("unit-*.bin"))
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    llm = zinfer.LLM(str(directory), device="cpu", offload="nvme", offload_dir=str(offload))
    assert [c.token_ids for c in llm.generate(PROMPTS, PARAMS)] == expected


def test_stale_store_for_other_dtype_not_reused(tmp_path):
    directory = tmp_path / "ckpt"
    make_checkpoint("opt", directory)
    offload = tmp_path / "offload"
    zinfer.LLM(str(directory), device="cpu", offload="nvme", offload_dir=str(offload))
    zinfer.LLM(str(directory), device="cpu", dtype="bfloat16", offload="nvme", offload_dir=str(offload))
    assert len([p for p in offload.iterdir() if p.is_dir()]) == 2  # keyed by dtype: two stores


def test_store_not_reused_for_other_weights_under_the_same_name(tmp_path):
    # a checkpoint saved again at the same path, or dummy weights of another seed, are other bytes
    directory, offload = tmp_path / "ckpt", str(tmp_path / "offload")
    make_checkpoint("llama", directory, seed=0)
    zinfer.LLM(str(directory), device="cpu", offload="nvme", offload_dir=offload)
    make_checkpoint("llama", directory, seed=1)
    expected = [c.token_ids for c in zinfer.LLM(str(directory), device="cpu").generate(PROMPTS, PARAMS)]
    llm = zinfer.LLM(str(directory), device="cpu", offload="nvme", offload_dir=offload)
    assert [c.token_ids for c in llm.generate(PROMPTS, PARAMS)] == expected
    # the new weights replace the old store in place: saving again and again must not fill the disk
    assert len([p for p in (tmp_path / "offload").iterdir() if p.is_dir()]) == 1
    ids = [[5, 6, 7, 8]]
    greedy = zinfer.SamplingParams(max_new_tokens=3, ignore_eos=True)
    for seed in (1, 2):
        want = zinfer.LLM("smollm2-135m", dummy=True, seed=seed, device="cpu").generate(ids, greedy)[0]
        got = zinfer.LLM("smollm2-135m", dummy=True, seed=seed, device="cpu", offload="nvme",
                         offload_dir=offload).generate(ids, greedy)[0]
        assert got.token_ids == want.token_ids, seed


def test_unwritable_offload_dir(tmp_path):
    directory = tmp_path / "ckpt"
    make_checkpoint("llama", directory)
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    with pytest.raises(OffloadDirError):
        zinfer.LLM(str(directory), device="cpu", offload="nvme", offload_dir=str(blocker / "sub"))


def test_disk_full_offload_dir(tmp_path, monkeypatch):
    import shutil

    directory = tmp_path / "ckpt"
    make_checkpoint("llama", directory)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OffloadDirError, match="free"):
        zinfer.LLM(str(directory), device="cpu", offload="nvme", offload_dir=str(tmp_path / "off"))
    assert not list((tmp_path / "off").glob("zinfer-*"))


def _meta(name="llama-3-8b"):
    from zinfer.weights.source import resolve

    return build_empty(resolve(name).config)


def test_plan_keeps_as_many_layers_resident_as_fit():
    model = _meta()
    gib = 2**30
    options = EngineConfig(offload="cpu", gpu_memory=10 * gib)
    plan = make_plan(model, options, torch.device("cuda"), torch.bfloat16, free_gpu=80 * gib)
    places = [u.place for u in plan.units]
    layer = plan.units[1].nbytes
    resident = places.count(GPU) - 1
    assert resident == (10 * gib - plan.units[0].nbytes - 2 * layer) // layer
    assert places.count(CPU) == 32 - resident
    assert "PCIe floor per decode step" in plan.table(55e9)


def test_plan_all_streamed_by_default_with_warning(caplog):
    model = _meta()
    with caplog.at_level(logging.WARNING):
        plan = make_plan(model, EngineConfig(offload="cpu"), torch.device("cuda"), torch.bfloat16,
                         free_gpu=80 * 2**30)
    assert [u.place for u in plan.units[1:]] == [CPU] * 32
    assert "fits in the" in caplog.text and "ms at PCIe speed" in caplog.text


def test_plan_auto_keeps_fitting_model_resident():
    plan = make_plan(_meta(), EngineConfig(offload="auto"), torch.device("cuda"), torch.bfloat16,
                     free_gpu=80 * 2**30)
    assert not plan.streamed


def test_impossible_budget_fails_before_loading():
    with pytest.raises(InputError, match=r"cannot hold the resident embeddings/head .* give at least"):
        make_plan(_meta(), EngineConfig(offload="cpu", gpu_memory="1GiB"), torch.device("cuda"), torch.bfloat16,
                  free_gpu=80 * 2**30)
    with pytest.raises(InputError, match="more than the"):
        make_plan(_meta(), EngineConfig(offload="cpu", gpu_memory="100GiB"), torch.device("cuda"),
                  torch.bfloat16, free_gpu=80 * 2**30)
    with pytest.raises(InputError, match="cpu_memory=1.00 GiB cannot hold"):
        make_plan(_meta(), EngineConfig(offload="cpu", cpu_memory="1GiB"), torch.device("cuda"), torch.bfloat16,
                  free_gpu=80 * 2**30)


def test_nvme_needs_offload_dir():
    with pytest.raises(InputError, match="offload='nvme' needs offload_dir"):
        EngineConfig(offload="nvme")


def test_deepspeed_config_mapping():
    ds = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "pin_memory": True,
                                                              "nvme_path": "/tmp/x", "buffer_count": 5}},
          "train_micro_batch_size_per_gpu": 1,
          "weight_quantization": {"quantized_initialization": {"num_bits": 4, "group_size": 64, "group_dim": 1,
                                                               "symmetric": False}}}
    options, ignored = EngineConfig.from_deepspeed(ds)
    assert options == {"offload": "nvme", "pin_memory": True, "offload_dir": "/tmp/x", "quant_bits": 4,
                       "quant_group_size": 64}
    assert ignored == ["train_micro_batch_size_per_gpu", "zero_optimization.offload_param.buffer_count",
                       "zero_optimization.stage"]


def test_deepspeed_config_drives_llm(tmp_path):
    directory = tmp_path / "ckpt"
    make_checkpoint("bloom", directory)
    ds = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path / "o")}}}
    llm = zinfer.LLM(str(directory), device="cpu", deepspeed_config=ds)
    assert llm.plan is not None and llm.plan.streamed


@pytest.mark.parametrize("kind", ["llama", "mixtral", "opt-post-ln-proj", "bloom"])
@pytest.mark.parametrize("bits", [16, 4])
def test_resident_units_load_on_the_device_streamed_ones_in_host_memory(kind, bits):
    # The GPU is played by the meta device: every parameter of a resident unit (the rest, layer 0) must be
    # read straight there, every parameter of a streamed one (layer 1) into host memory, never both.
    from zinfer.offload.plan import REST, Plan, UnitPlan, load_devices
    from zinfer.quant import QuantSpec
    from zinfer.weights.dummy import iter_dummy
    from zinfer.weights.loader import load_weights, quantize_shells

    model = build_empty(CONFIGS[kind]())
    if bits < 16:
        quantize_shells(model, QuantSpec(bits=bits, group_size=16), torch.float32)
    plan = Plan((UnitPlan(REST, 0, GPU), UnitPlan("layers.0", 0, GPU), UnitPlan("layers.1", 0, CPU)),
                "cuda", None, 0)
    meta = torch.device("meta")
    weights = iter_dummy(model, torch.float32, "cpu")
    load_weights(model, weights, meta, torch.float32, place=load_devices(model, plan, meta))
    layers = decoder_layers(model)
    in_layers = {id(p) for p in layers.parameters()}
    rest = [p for p in model.parameters() if id(p) not in in_layers]
    assert rest and all(p.is_meta for p in rest)
    assert all(p.is_meta for p in layers[0].parameters())
    streamed = list(layers[1].parameters())
    assert streamed and all(p.device.type == "cpu" for p in streamed)
    if bits < 16:
        assert any(p.dtype == torch.uint8 for p in streamed)  # quantized where they were read, kept packed


@pytest.mark.parametrize("layers", [1, 3, 4])
def test_no_prefetch_into_the_slot_of_the_running_unit(layers, tmp_path, monkeypatch):
    # with an odd count of streamed units (or one) the unit after the last is the next step's first, in the same
    # slot: its copy (or NVMe read into that staging buffer) must wait until the last unit has run, not start as
    # it starts. Watched from hooks around each layer's compute; tokens as in memory.
    import transformers

    from helpers import LLAMA
    from zinfer.offload.streamer import WeightStreamer

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(LLAMA, num_hidden_layers=layers),
                                                           initializer_range=0.2)).save_pretrained(tmp_path / "m")
    expected = [c.token_ids for c in zinfer.LLM(str(tmp_path / "m"), device="cpu").generate(PROMPTS, PARAMS)]
    llm = zinfer.LLM(str(tmp_path / "m"), device="cpu", offload="nvme", offload_dir=str(tmp_path / "store"))
    streamer, running, clashes = llm.streamer, [], []
    assert len(streamer.streamed) == layers
    prefetch = WeightStreamer._prefetch

    def watched(self, j):
        if running and j % 2 == self.index[running[0]] % 2:
            clashes.append((running[0], j))
        prefetch(self, j)

    monkeypatch.setattr(WeightStreamer, "_prefetch", watched)
    for i, layer in enumerate(decoder_layers(llm.model)):  # prepended: around the streamer's own hooks' work
        layer.register_forward_pre_hook(lambda m, a, name=f"layers.{i}": running.append(name), prepend=True)
        layer.register_forward_hook(lambda m, a, out: running.clear(), prepend=True)
    assert [c.token_ids for c in llm.generate(PROMPTS, PARAMS)] == expected
    assert not clashes
