"""Tiny random checkpoints of every family, made with transformers and saved as safetensors; running a script of
Triton kernels under Triton's interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str) -> str:
    """Run `script` in a fresh interpreter with TRITON_INTERPRET=1 (the kernels on the CPU) and this checkout first
    on the path; its stdout. Exit status 3 means the interpreter itself is broken here (the script's probe): skip."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    if r.returncode == 3:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout

TINY = dict(vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)

LLAMA = dict(TINY, intermediate_size=96, num_key_value_heads=4)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA),
    "llama-gqa-tied": lambda: transformers.LlamaConfig(**dict(LLAMA, num_key_value_heads=2),
                                                       tie_word_embeddings=True),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **dict(LLAMA, num_key_value_heads=2),
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}),
    "llama-bias": lambda: transformers.LlamaConfig(**LLAMA, attention_bias=True, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**dict(LLAMA, num_key_value_heads=2), sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**dict(LLAMA, num_key_value_heads=2)),
    "opt": lambda: transformers.OPTConfig(vocab_size=211, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, ffn_dim=96, max_position_embeddings=128,
                                          word_embed_proj_dim=64),
    "opt-post-ln-proj": lambda: transformers.OPTConfig(
        vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
        max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False),
    "bloom": lambda: transformers.BloomConfig(vocab_size=211, hidden_size=64, n_layer=2, n_head=4),
    "bloom-6-heads": lambda: transformers.BloomConfig(vocab_size=211, hidden_size=96, n_layer=2, n_head=6),
    "mixtral": lambda: transformers.MixtralConfig(**dict(LLAMA, num_key_value_heads=2), num_local_experts=4,
                                                  num_experts_per_tok=2),
}

PROMPTS = [[5, 17, 33, 2 + 40, 61, 7, 99], [12, 8], [150, 3, 77, 19]]


def make_checkpoint(kind: str, directory, seed: int = 0):
    """Save a random `kind` model; returns the transformers model (fp32, eval) for reference."""
    torch.manual_seed(seed)
    config = CONFIGS[kind]()
    config.pad_token_id = 0
    config.eos_token_id = 1
    config.bos_token_id = 2
    # a wider init than the default 0.02 makes greedy outputs vary, so token parity means something
    config.initializer_range = config.init_std = 0.2
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # randomise norms/biases too: default inits (ones, zeros) hide mistakes
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def left_padded(prompts, pad_id: int = 0, device="cpu"):
    """Token lists -> ([B, P] ids, [B, P] mask of real tokens), padded on the left as for generation."""
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id)
    mask = torch.zeros(len(prompts), p, dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x)
        mask[i, p - len(x):] = 1
    return ids.to(device), mask.to(device)


def hf_greedy(model, prompts, new_tokens: int, pad_id: int = 0, device="cpu"):
    """transformers' greedy `generate` on a left-padded batch; returns the new tokens per row."""
    ids, mask = left_padded(prompts, pad_id, device)
    p = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id)
    return out[:, p:].tolist(), (ids, mask)


def save_word_tokenizer(directory, vocab_size: int = 211):
    """A word-level tokenizer over `w3 ... wN` so tiny models can take and return text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    fast.save_pretrained(directory)
    return fast


def make_text_checkpoint(directory, kind: str = "llama"):
    """A tiny random checkpoint with the word-level tokenizer, so it takes and returns text."""
    make_checkpoint(kind, directory)
    save_word_tokenizer(directory)
    return directory


def with_tokenizer_config(src, dst, edit):
    """A copy of checkpoint `src` in `dst` whose tokenizer_config.json went through `edit(dict)`."""
    import json
    import shutil

    shutil.copytree(src, dst, dirs_exist_ok=True)
    path = dst / "tokenizer_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return dst
