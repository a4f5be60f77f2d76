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
REPO = Path(__file__).resolve().parents[1]

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


def test_failed_eval_holds_no_inference_copies():
    # an eval() that fails midway (out of memory while gathering, say) must not leave the tensors it had made
    # alive while the trainer carries on
    model = with_lora(tiny("llama-gqa-tied"), "llama-gqa-tied")
    engine = HybridEngine(model)
    gather, calls = engine._gather, []

    def failing(p):
        calls.append(p)
        if len(calls) == 6:
            raise torch.OutOfMemoryError("simulated")
        return gather(p)

    engine._gather = failing
    with pytest.raises(torch.OutOfMemoryError):
        engine.eval()
    assert all(p.is_meta for p in engine.inference_model.parameters())
    engine.train()
    engine._gather = gather
    _, (ids, mask) = hf_greedy(model, PROMPTS[:1], 1)
    engine.eval()
    assert engine.generate(ids, attention_mask=mask, max_new_tokens=2).shape[1] == ids.shape[1] + 2


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


def test_kept_weights_are_never_written_into_training_weights():
    # without release_cache the inference model keeps its tensors; q_proj is first the training weight itself
    # (adapter disabled), then a fused one: the second load must re-point it, not copy into the training weight
    model = with_lora(tiny("opt"), "opt", target_modules=["q_proj"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = HybridEngine(model, release_cache=False)
    _, (ids, mask) = hf_greedy(model, PROMPTS, 1)
    with model.disable_adapter():
        engine_new_tokens(engine, ids, mask)
        engine.train()
    model.eval()
    expected, _ = hf_greedy(model, PROMPTS, NEW)
    assert engine_new_tokens(engine, ids, mask) == expected
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


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


def test_tensor_parallel_needs_a_distributed_job():
    with pytest.raises(InputError, match=r"inference_tp_size=2 splits the model over 2 processes of a "
                                         r"torch.distributed job, but torch.distributed is not initialised: start "
                                         r"the job with `torchrun --nproc-per-node 2` \(or a multiple of 2\)"):
        HybridEngine(tiny("opt"), inference_tp_size=2)
    with pytest.raises(InputError, match=r"inference_tp_size=0: the number of ranks must be at least 1"):
        HybridEngine(tiny("opt"), inference_tp_size=0)


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


def subprocess_env() -> dict:
    # this checkout's zinfer, not whichever one is installed
    return dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_processes_generate_what_one_does(tmp_path):
    script = tmp_path / "fsdp_hybrid.py"
    script.write_text(FSDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "tokens.json"
    env = subprocess_env()
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


# --- inference tensor parallelism over gloo processes ------------------------------------------------------------

# Rank r's own prompts in the data-parallel case: different counts and lengths on every rank.
RANK_PROMPTS = [PROMPTS[:2], [PROMPTS[2], [9, 4, 150, 33, 21, 8, 7, 60, 5]], [PROMPTS[1]], [[7, 7, 9], *PROMPTS]]
TP_KINDS = {"llama-same-prompts": "llama-gqa-tied", "opt-own-prompts": "opt", "bloom-own-prompts": "bloom"}

TP_SCRIPT = '''
import json, os, sys
import torch, torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, {tests!r})
from test_hybrid import NEW, PROMPTS, RANK_PROMPTS, TP_KINDS, tensor_count, rank_prompts, sgd_steps, tiny, with_lora
from helpers import left_padded
from zinfer.errors import InputError
from zinfer.hybrid import HybridEngine

TP = 2


def decoder_layers(base):
    return {{"llama": lambda: base.model.layers, "opt": lambda: base.model.decoder.layers,
            "bloom": lambda: base.transformer.h}}[base.config.model_type]()


def local(model):
    """This rank's training tensors (its FSDP2 shards), copied."""
    return {{n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone() for n, p in model.named_parameters()}}


def fsdp_case(case, rank):
    """Two RLHF iterations (SGD step on the FSDP2-sharded LoRA model -> eval -> generate), then four switch
    cycles without training: the training tensors must come out of them bitwise equal, memory flat."""
    kind = TP_KINDS[case]
    model = with_lora(tiny(kind), kind)
    for layer in decoder_layers(model.get_base_model()):
        fully_shard(layer)
    fully_shard(model)
    engine = HybridEngine(model, inference_tp_size=TP)
    ids, mask = left_padded(rank_prompts(case, rank))
    tokens = []
    for seed in (1, 2):
        engine.train()
        sgd_steps(model, steps=1, seed=seed)
        engine.eval()
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW)
        assert torch.equal(out[:, :ids.shape[1]], ids)
        tokens.append(out[:, ids.shape[1]:].tolist())
    engine.train()
    before, counts = local(model), []
    for _ in range(4):
        engine.eval()
        engine.generate(ids, attention_mask=mask, max_new_tokens=2)
        engine.train()
        counts.append(tensor_count())
    after = local(model)
    return dict(tokens=tokens, unchanged=all(torch.equal(after[n], t) for n, t in before.items()), counts=counts,
                released=all(p.is_meta for p in engine.inference_model.parameters()),
                gather_s=engine.timings["gather_s"])


def shared_case(rank):
    """A model every rank holds whole (no FSDP): blocks that are row slices of a training tensor are views of
    it, column blocks are copies, replicated tensors are the training tensors; generating through the views
    leaves the training tensors bitwise equal."""
    model = with_lora(tiny("opt"), "opt", target_modules=["q_proj"])
    before = local(model)
    engine = HybridEngine(model, inference_tp_size=TP).eval()
    live, ours = dict(model.get_base_model().named_parameters()), dict(engine.inference_model.named_parameters())
    fc1, fc1_bias = "model.decoder.layers.0.fc1.weight", "model.decoder.layers.0.fc1.bias"
    fc2, emb = "model.decoder.layers.1.fc2.weight", "model.decoder.embed_tokens.weight"
    q = "model.decoder.layers.0.self_attn.q_proj.weight"
    rows, cols = ours[fc1].shape[0], ours[fc2].shape[1]
    fc1_offset = rank * rows * live[fc1].stride(0) * live[fc1].element_size()
    ids, mask = left_padded(PROMPTS)
    torch.manual_seed(rank)  # the ranks' global generators differ: the group samples with rank 0's draw
    sampled = engine.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, temperature=0.8).tolist()
    found = {{}}
    # each rank its own count of new tokens (max_length over prompts of other widths does that too)
    found["own_counts"] = engine.generate(ids, attention_mask=mask, max_new_tokens=2 + rank)[:, ids.shape[1]:].tolist()
    # a request refused on one rank is refused on every rank of the group, and the group carries on in step
    for name, kwargs in (("mismatch", dict(repetition_penalty=1.0 + rank)),
                         ("refused", dict(do_sample=bool(rank), temperature=0.0))):
        try:
            engine.generate(ids, attention_mask=mask, max_new_tokens=2, **kwargs)
            found[name] = None
        except InputError as e:
            found[name] = str(e)
    empty = engine.generate(ids[:0] if rank else ids, attention_mask=mask[:0] if rank else mask, max_new_tokens=2)
    found["shapes"] = [list(empty.shape), list(ids.shape)]
    checks = dict(
        fc1_view=ours[fc1].data_ptr() == live[fc1].data_ptr() + fc1_offset
        and torch.equal(ours[fc1], live[fc1][rank * rows:(rank + 1) * rows]),
        fc1_bias_view=ours[fc1_bias].untyped_storage().data_ptr() == live[fc1_bias].untyped_storage().data_ptr(),
        fc2_copy=ours[fc2].untyped_storage().data_ptr() != live[fc2].untyped_storage().data_ptr()
        and torch.equal(ours[fc2], live[fc2][:, rank * cols:(rank + 1) * cols]),
        embedding_shared=ours[emb].data_ptr() == live[emb].data_ptr(),
        lora_block_owned=ours[q].untyped_storage().nbytes() == ours[q].nbytes)
    engine.train()
    after = local(model)
    checks["unchanged"] = all(torch.equal(after[n], t) for n, t in before.items())
    return dict(checks, sampled=sampled, **found)


def errors():
    found = []
    odd = transformers.LlamaConfig(vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=3,
                                   num_key_value_heads=3, intermediate_size=32)
    for make, size in ((lambda: tiny("opt"), 3), (lambda: transformers.LlamaForCausalLM(odd), TP)):
        try:
            HybridEngine(make(), inference_tp_size=size)
            found.append(None)
        except InputError as e:
            found.append(str(e))
    return found


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {{}}
    for case in sys.argv[2].split(","):
        if case == "groups":  # a second engine reuses the job's inference groups: no new communicators
            from torch.distributed.distributed_c10d import _world
            counts = []
            for _ in range(2):
                HybridEngine(with_lora(tiny("bloom"), "bloom"), inference_tp_size=TP)
                counts.append(len(_world.pg_names))
            result[case] = counts
        elif case == "shared":
            result[case] = shared_case(rank)
        elif case == "errors":
            result[case] = errors()
        else:
            result[case] = fsdp_case(case, rank)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()
    # FSDP2 over gloo now and then aborts in interpreter teardown ("terminate called without an active
    # exception", seen once in CI) after everything above finished: leave without the teardown
    sys.stdout.flush()
    os._exit(0)
'''


def rank_prompts(case: str, rank: int):
    return PROMPTS if case.startswith("llama-same") else RANK_PROMPTS[rank]


def launch_tp(tmp_path, nproc: int, cases: list[str]) -> list[dict]:
    """TP_SCRIPT over `nproc` gloo ranks; every rank's results."""
    script = tmp_path / "tp_hybrid.py"
    script.write_text(TP_SCRIPT.format(tests=str(Path(__file__).parent)))
    out = tmp_path / f"tp-{nproc}.json"
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(script), str(out), ",".join(cases)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    ranks = "\n".join(line for line in done.stderr.splitlines() if line.startswith("[rank"))  # their tracebacks
    assert done.returncode == 0, ranks[-6000:] or done.stderr[-3000:]
    return json.loads(out.read_text())


def expected_tokens(case: str, ranks: int) -> list:
    """[rank][iteration] new tokens of peft's generate on the unsharded model after each SGD step, checked
    against HybridEngine with inference_tp_size=1 on the same model."""
    kind = TP_KINDS[case]
    model = with_lora(tiny(kind), kind)
    engine = HybridEngine(model)
    want = [[] for _ in range(ranks)]
    for seed in (1, 2):
        engine.train()
        sgd_steps(model, steps=1, seed=seed)
        for rank in range(ranks):
            model.eval()
            tokens, (ids, mask) = hf_greedy(model, rank_prompts(case, rank), NEW)
            assert engine_new_tokens(engine, ids, mask) == tokens, (case, rank, seed)
            want[rank].append(tokens)
    return want


def check_fsdp_case(got: list[dict], case: str):
    want = expected_tokens(case, len(got))
    for rank, result in enumerate(got):
        r = result[case]
        assert r["tokens"] == want[rank], f"{case}: rank {rank}"
        assert r["unchanged"] and r["released"], (case, rank)
        # flat: a leak adds tensors every cycle, so the last two cycles would both end above the first two;
        # gloo/FSDP2 now and then hold a few tensors for one cycle ([470, 473, 470, 470] seen)
        assert min(r["counts"][-2:]) <= min(r["counts"][:2]), (case, rank, r["counts"])
        assert r["gather_s"] > 0


def test_inference_tp2_over_fsdp2_ranks_generates_what_peft_does(tmp_path):
    got = launch_tp(tmp_path, 2, ["llama-same-prompts", "opt-own-prompts", "shared", "errors"])
    for case in ("llama-same-prompts", "opt-own-prompts"):
        check_fsdp_case(got, case)
    assert got[0]["llama-same-prompts"]["tokens"] == got[1]["llama-same-prompts"]["tokens"]
    shared = [result.pop("shared") for result in got]
    assert shared[0]["sampled"] == shared[1]["sampled"]
    counts = [r.pop("own_counts") for r in shared]
    assert [len(row) for row in counts[0]] == [2] * len(PROMPTS) and [row[:2] for row in counts[1]] == counts[0]
    assert [len(row) for row in counts[1]] == [3] * len(PROMPTS)
    for rank, r in enumerate(shared):
        assert r.pop("mismatch").startswith(
            "the ranks of an inference tensor-parallel group must generate with the same settings (sampling, seed, "
            "eos/pad ids): group rank(s) [1] differ from rank 0: ({'temperature': 0.0")
        assert r.pop("refused") == ("generate() was refused on group rank(s) 1: InputError: do_sample=True needs "
                                    "temperature > 0, got 0.0")
        (out, prompts) = r.pop("shapes")
        assert out == ([0, prompts[1]] if rank else [prompts[0], prompts[1] + 2])
        r.pop("sampled")
        assert r == dict(fc1_view=True, fc1_bias_view=True, fc2_copy=True, embedding_shared=True,
                         lora_block_owned=True, unchanged=True), rank
    assert got[0]["errors"] == [
        "inference_tp_size=3 does not divide the job's 2 processes (it is split into groups of 3 ranks): "
        "inference_tp_size must divide 2",
        "inference_tp_size=2: attention heads (3) does not split evenly across tp=2 ranks: use a tp that divides 3"]


@pytest.mark.slow  # 4 processes start on a 2-core machine: ~35 s
def test_inference_tp2_groups_in_a_job_of_four(tmp_path):
    """Four ranks, FSDP2 over all four, two inference groups of two: each group generates its ranks' prompts."""
    got = launch_tp(tmp_path, 4, ["bloom-own-prompts", "groups"])
    check_fsdp_case(got, "bloom-own-prompts")
    assert [r["groups"][0] == r["groups"][1] for r in got] == [True] * 4, [r["groups"] for r in got]
