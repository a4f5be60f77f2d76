"""HybridEngine: a live (peft LoRA, FSDP2) transformers model generates through zinfer and trains on, untouched."""

import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from helpers import CONFIGS, PROMPTS, hf_greedy
from zinfer.errors import InputError, UnsupportedModelError
from zinfer.hybrid import HybridEngine

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {  # config kind -> LoraConfig keywords: every projection type peft targets in the family
    "llama-gqa-tied": dict(target_modules=LLAMA_TARGETS),
    "opt": dict(target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    "bloom": dict(target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    # transformers >= 5 stacks Mixtral's experts in 3D parameters: peft targets them as parameters
    "mixtral": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}
NEW = 6


def tiny(kind: str, seed: int = 0):
    """A random fp32 transformers model (the init of helpers.make_checkpoint, not saved)."""
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, 2
    config.initializer_range = config.init_std = 0.2
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def with_lora(model, kind: str, **extra):
    # init_lora_weights=False: B random too (peft zeroes it), so the adapter matters from the start
    options = dict(r=4, lora_alpha=8, init_lora_weights=False, **LORA[kind])
    return peft.get_peft_model(model, peft.LoraConfig(**dict(options, **extra)))


def sgd_steps(model, steps: int = 2, lr: float = 0.5, seed: int = 1) -> None:
    """Plain SGD on a random LM loss over the trainable parameters (LoRA's only, under peft)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    device = next(model.parameters()).device
    for _ in range(steps):
        x = torch.randint(3, 211, (4, 12), generator=g).to(device)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def engine_new_tokens(engine, ids, mask, new=NEW):
    engine.eval()
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
    assert out.shape == (len(ids), ids.shape[1] + new) and out.dtype == torch.long
    assert torch.equal(out[:, :ids.shape[1]], ids)  # the prompts as given, padding included
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", sorted(LORA))
def test_lora_after_training_equals_peft_generate(kind):
    model = with_lora(tiny(kind), kind)
    sgd_steps(model)
    engine = HybridEngine(model)
    model.eval()
    expected, (ids, mask) = hf_greedy(model, PROMPTS, NEW)
    with model.disable_adapter():
        base_only, _ = hf_greedy(model, PROMPTS, NEW)
    assert expected != base_only, "the adapter must change the output for this test to mean something"
    assert engine_new_tokens(engine, ids, mask) == expected


def test_full_finetune_reloads_new_weights_each_eval():
    model = tiny("llama-gqa-tied")
    engine = HybridEngine(model)
    for seed in (1, 2):  # train, switch, compare; twice: the second eval() must see the new weights
        engine.train()
        sgd_steps(model, steps=1, lr=0.05, seed=seed)
        model.eval()
        expected, (ids, mask) = hf_greedy(model, PROMPTS, NEW)
        assert engine_new_tokens(engine, ids, mask) == expected


def test_untouched_parameters_share_storage_with_training():
    model = with_lora(tiny("llama-gqa-tied"), "llama-gqa-tied", target_modules=["q_proj", "v_proj"])
    engine = HybridEngine(model).eval()
    live = dict(model.get_base_model().named_parameters())
    ours = dict(engine.inference_model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert ours[name].data_ptr() == live[name].data_ptr(), name
    assert engine.inference_model.lm_head.weight.data_ptr() == live["model.embed_tokens.weight"].data_ptr()
    # q/k/v live in zinfer's fused buffer; q (and v) also carry the LoRA delta
    q_base = live["model.layers.0.self_attn.q_proj.base_layer.weight"]
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert q.data_ptr() != q_base.data_ptr() and not torch.equal(q, q_base)
    k = ours["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(k, live["model.layers.0.self_attn.k_proj.weight"])


def test_bloom_unadapted_fused_qkv_is_shared():
    model = with_lora(tiny("bloom"), "bloom", target_modules=["dense"])
    engine = HybridEngine(model).eval()
    name = "transformer.h.1.self_attention.query_key_value.weight"
    live = dict(model.get_base_model().named_parameters())[name]
    assert dict(engine.inference_model.named_parameters())[name].data_ptr() == live.data_ptr()


def tensor_count() -> int:
    gc.collect()
    # type(), not isinstance(): a lazy module proxy among gc's objects warns when asked for its __class__
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def test_ten_cycles_leave_weights_bitwise_equal_and_memory_flat():
    model = with_lora(tiny("llama-gqa-tied"), "llama-gqa-tied")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = HybridEngine(model)
    _, (ids, mask) = hf_greedy(model, PROMPTS[:1], 1)
    counts = []
    for _ in range(10):
        engine.eval()
        engine.generate(ids, attention_mask=mask, max_new_tokens=4)
        engine.train()
        counts.append(tensor_count())
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert counts[-1] == counts[2], counts  # the first cycles build the meta model and generator once
    # nothing of the inference weights stays alive during training
    assert all(p.is_meta for p in engine.inference_model.parameters())
    assert engine.generator.state is None
    assert engine.timings["iteration"] == 9 and engine.timings["samples"] == 1
    assert engine.timings["generate_s"] > 0 and engine.timings["training_s"] >= 0


def test_kept_cache_is_reused_and_weights_follow_training():
    model = tiny("opt")
    engine = HybridEngine(model, release_cache=False)
    _, (ids, mask) = hf_greedy(model, PROMPTS, 1)
    engine_new_tokens(engine, ids, mask)
    state = engine.generator.state
    engine.train()
    sgd_steps(model, steps=1, lr=0.05)
    model.eval()
    expected, _ = hf_greedy(model, PROMPTS, NEW)
    assert engine_new_tokens(engine, ids, mask) == expected
    assert engine.generator.state is state  # OPT has no fused buffers: every weight stayed in place


def test_disabled_merged_and_switched_adapters_follow_peft():
    model = with_lora(tiny("opt"), "opt")
    model.add_adapter("other", peft.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "fc2"]))
    engine = HybridEngine(model)
    for setup in ("default", "other", "disabled", "merged"):
        model.eval()  # the reference too: OPT's dropout would change transformers' tokens
        model.set_adapter("other" if setup == "other" else "default")
        if setup == "merged":
            model.merge_adapter()
        if setup == "disabled":
            with model.disable_adapter():
                expected, (ids, mask) = hf_greedy(model, PROMPTS, NEW)
                got = engine_new_tokens(engine, ids, mask)
        else:
            expected, (ids, mask) = hf_greedy(model, PROMPTS, NEW)
            got = engine_new_tokens(engine, ids, mask)
        assert got == expected, setup
        engine.train()


def test_modules_to_save_copy_is_used():
    model = with_lora(tiny("llama"), "llama-gqa-tied", target_modules=["q_proj"], modules_to_save=["lm_head"])
    sgd_steps(model)  # trains q's LoRA and peft's own copy of lm_head
    copy = model.get_base_model().lm_head.modules_to_save["default"].weight
    assert not torch.equal(copy, model.get_base_model().lm_head.original_module.weight)
    model.eval()
    expected, (ids, mask) = hf_greedy(model, PROMPTS, NEW)
    engine = HybridEngine(model)
    assert engine_new_tokens(engine, ids, mask) == expected
    assert engine.inference_model.lm_head.weight.data_ptr() == copy.data_ptr()


@pytest.mark.gpu
def test_gpu_cycles_capture_release_and_match_peft():
    """CUDA graphs + torch.compile: fp32 parity with peft's generate, and train() gives the memory back."""
    model = with_lora(tiny("llama-gqa-tied"), "llama-gqa-tied").cuda()
    engine = HybridEngine(model)
    for seed in (1, 2):
        engine.train()
        sgd_steps(model, steps=1, seed=seed)
        torch.cuda.synchronize()
        training_bytes = torch.cuda.memory_allocated()
        model.eval()
        expected, (ids, mask) = hf_greedy(model, PROMPTS, NEW, device="cuda")
        assert engine_new_tokens(engine, ids, mask) == expected
        assert engine.generator.state is not None and engine.generator.state.graph is not None
        engine.train()
        left = torch.cuda.memory_allocated() - training_bytes  # only the small prompt tensors made since
        assert left < 2**20, f"{left} bytes still allocated after train()"


def test_rows_that_stop_early_are_padded_like_transformers():
    model = tiny("llama-gqa-tied").eval()
    _, (ids, mask) = hf_greedy(model, PROMPTS, 1)
    free, _ = hf_greedy(model, PROMPTS, 8)
    eos = free[1][2]  # row 1 stops at its third token; other rows keep going (or stop on it too)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = model.generate(input_ids=ids, **kw)
    got = HybridEngine(model).eval().generate(ids, **kw)
    assert torch.equal(got, expected)
    assert got[1, ids.shape[1] + 2] == eos and (got[1, ids.shape[1] + 3:] == 0).all()


def test_sampling_is_seeded_by_torch_global_generator():
    model = tiny("opt")
    engine = HybridEngine(model).eval()
    _, (ids, mask) = hf_greedy(model, PROMPTS, 1)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(engine.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=0.8,
                                    top_p=0.9, top_k=20))
    assert torch.equal(runs[0], runs[1])


def test_unsupported_family_is_refused_at_construction():
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    with pytest.raises(UnsupportedModelError, match=r"HybridEngine cannot generate for GPT2LMHeadModel: "
                                                    r"model_type 'gpt2' is not supported; supported: bloom"):
        HybridEngine(transformers.GPT2LMHeadModel(config))
    with pytest.raises(UnsupportedModelError, match="Linear has no `config.model_type`"):
        HybridEngine(torch.nn.Linear(2, 2))


def test_non_lora_adapters_and_dora_are_refused():
    ia3 = peft.get_peft_model(tiny("opt"), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(UnsupportedModelError, match="peft adapter 'default' is IA3: HybridEngine fuses LoRA"):
        HybridEngine(ia3)
    dora = peft.get_peft_model(tiny("opt"), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(UnsupportedModelError, match=r"adapter 'default' is a LoRA variant \(DoraLinearVariant"):
        HybridEngine(dora)


def test_tensor_parallel_inference_is_refused():
    with pytest.raises(NotImplementedError, match=r"inference_tp_size=2: tensor-parallel generation is not "
                                                  r"implemented in zinfer yet \(it comes with the tensor parallelism"):
        HybridEngine(tiny("opt"), inference_tp_size=2)


def test_generate_errors():
    model = tiny("opt")
    engine = HybridEngine(model)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(InputError, match=r"needs inference mode: call engine.eval\(\) first"):
        engine.generate(ids)
    engine.eval()
    with pytest.raises(InputError, match="num_beams=4"):
        engine.generate(ids, num_beams=4)
    with pytest.raises(InputError, match="unsupported argument.*: foo"):
        engine.generate(ids, foo=1)
    with pytest.raises(InputError, match=r"input_ids must be \[batch, length\], got shape \(3,\)"):
        engine.generate(ids[0])
    with pytest.raises(InputError, match="do_sample=True needs temperature > 0, got 0"):
        engine.generate(ids, do_sample=True, temperature=0)
    with pytest.raises(InputError, match="prompt 0 is empty"):
        engine.generate(ids, attention_mask=torch.zeros_like(ids))


# --- FSDP2 over two gloo processes -----------------------------------------------------------------------------

FSDP_SCRIPT = '''
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_hybrid import NEW, hf_greedy, sgd_steps, tiny, with_lora, PROMPTS
from zinfer.hybrid import HybridEngine


def build():
    return with_lora(tiny("llama-gqa-tied"), "llama-gqa-tied")


def run(model):
    """Two iterations of train step -> eval -> generate: the second reloads the updated (sharded) LoRA."""
    engine = HybridEngine(model)
    _, (ids, mask) = hf_greedy(tiny("llama-gqa-tied"), PROMPTS, 1)
    tokens = []
    for seed in (1, 2):
        engine.train()
        sgd_steps(model, steps=1, seed=seed)
        engine.eval()
        tokens.append(engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW).tolist())
    engine.train()
    return tokens, engine.timings


if __name__ == "__main__":
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    model = build()
    for layer in model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(model)
    tokens, timings = run(model)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(dict(tokens=tokens, timings=timings), f)
    dist.destroy_process_group()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_processes_generate_what_one_does(tmp_path):
    script = tmp_path / "fsdp_hybrid.py"
    script.write_text(FSDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "tokens.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads(out.read_text())
    spec = importlib.util.spec_from_file_location("fsdp_hybrid", script)
    single = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(single)
    tokens, _ = single.run(single.build())
    assert sharded["tokens"] == tokens
    assert sharded["timings"]["gather_s"] > 0  # the shards were gathered, and timed
