"""Resolve what the user named (path, GGUF file, built-in config, hub id) into config + tokenizer + weights."""

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from zinfer.errors import ModelNotFoundError
from zinfer.models import model_class
from zinfer.weights.checkpoint import iter_checkpoint, scan_checkpoint

BUILTIN_DIR = Path(__file__).parent / "configs"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


@dataclass
class ModelSource:
    name: str
    config: object  # transformers PretrainedConfig
    directory: Path | None  # a Hugging Face-layout directory holding weights (None: dummy only)
    tokenizer_dir: Path | None

    def weight_files(self) -> list[Path]:
        if self.directory is None:
            raise ModelNotFoundError(f"{self.name!r} is a built-in config without weights: pass dummy=True "
                                     "(--dummy on the command line) or a checkpoint directory")
        return scan_checkpoint(self.directory)

    def weights(self):
        return iter_checkpoint(self.weight_files())

    def tokenizer(self):
        if self.tokenizer_dir is None:
            return None
        return _load_tokenizer(str(self.tokenizer_dir))


@cache
def _load_tokenizer(directory: str):
    tok = AutoTokenizer.from_pretrained(directory)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def config_from_dict(data: dict, origin: str):
    model_type = data.get("model_type")
    if model_type is None:
        raise ModelNotFoundError(f"{origin}: config has no 'model_type'")
    model_class(model_type)  # unknown families fail here, before anything is loaded
    data = {k: v for k, v in data.items() if k != "model_type"}
    return AutoConfig.for_model(model_type, **data)


def load_config(directory: Path):
    path = directory / "config.json"
    if not path.exists():
        raise ModelNotFoundError(f"{directory} has no config.json: not a Hugging Face model directory")
    return config_from_dict(json.loads(path.read_text()), str(path))


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _default_tokenizer_dir() -> Path | None:
    """The embedded model's tokenizer serves built-in configs (dummy weights) when it is installed."""
    from zinfer.weights.default_model import default_model_dir, find_default_gguf

    try:
        find_default_gguf()
    except FileNotFoundError:
        return None
    return default_model_dir()


def resolve(model: str | os.PathLike | None) -> ModelSource:
    from zinfer.weights.default_model import DEFAULT_MODEL_NAME, default_model_dir

    if model is None or str(model) == DEFAULT_MODEL_NAME:
        directory = default_model_dir()
        return ModelSource(DEFAULT_MODEL_NAME, load_config(directory), directory, directory)
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return ModelSource(text, load_config(path), path, path if _has_tokenizer(path) else None)
    if path.is_file() and path.suffix == ".gguf":
        from zinfer.weights.default_model import converted_gguf_dir

        directory = converted_gguf_dir(path)
        return ModelSource(text, load_config(directory), directory, directory)
    if text in builtin_names():
        data = json.loads((BUILTIN_DIR / f"{text}.json").read_text())
        return ModelSource(text, config_from_dict(data, text), None, _default_tokenizer_dir())
    if path.exists() or text.startswith((".", "/", "~")) or path.suffix in (".gguf", ".safetensors", ".json"):
        raise ModelNotFoundError(f"model path {text!r} does not exist" if not path.exists()
                                 else f"{text!r} is neither a model directory nor a .gguf file")
    return _resolve_hub(text)


def _resolve_hub(repo_id: str) -> ModelSource:
    hint = f"built-in configs (with dummy=True): {', '.join(builtin_names())}"
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelNotFoundError(f"model {repo_id!r} is not a local path; {hint}; to download hub models "
                                 "install huggingface_hub") from e
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                    "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated: all mean "not available here"
        raise ModelNotFoundError(f"model {repo_id!r} is not a local path and could not be fetched from the "
                                 f"Hugging Face Hub ({type(e).__name__}); {hint}") from e
    return ModelSource(repo_id, load_config(directory), directory, directory)
