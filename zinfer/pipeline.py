"""`Pipeline`: a drop-in for DeepSpeed's `DSPipeline` (DeepSpeedExamples text-generation `utils.py`).

    pipe = Pipeline("meta-llama/Llama-3.1-8B", dtype=torch.bfloat16, device=0)
    pipe(["DeepSpeed is"], num_tokens=50)  # -> ["DeepSpeed is a ..."]: prompt + continuation

Same arguments and outputs as the seed: left padding with pad = eos when the tokenizer has none,
only `input_ids`/`attention_mask` reach generation (no `token_type_ids`), `device=-1` is the CPU,
`is_meta` builds on the meta device, and `checkpoint_path` gets a `checkpoints.json` manifest.
One deliberate difference: float16 on the CPU computes in float32 (with a warning), because CPU
float16 kernels are slow and some are missing.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from zinfer.api import LLM, resolve_device, resolve_dtype
from zinfer.bench.perf import Performance
from zinfer.errors import InputError, ModelNotFoundError
from zinfer.runtime.sampling import SamplingParams
from zinfer.weights.checkpoint import MANIFEST_NAMES, read_manifest, scan_checkpoint, write_manifest
from zinfer.weights.source import load_config

__all__ = ["Pipeline", "Performance", "checkpoint_manifest"]

# transformers' `generate(do_sample=True)` defaults, so sampled outputs are drawn the same way
HF_SAMPLING = dict(temperature=1.0, top_k=50)


def checkpoint_manifest(directory: Path, model_type: str) -> Path | None:
    """The DeepSpeed `{"type", "checkpoints", "version"}` manifest of `directory`: read if present,
    else written as `checkpoints.json` from the weight files found there (None if it cannot be)."""
    for name in MANIFEST_NAMES:
        if (directory / name).exists():
            read_manifest(directory)  # fails now, with the file's name, if the manifest is malformed
            return directory / name
    files = scan_checkpoint(directory)
    try:
        return write_manifest(directory, files, model_type)
    except OSError as e:  # a read-only checkpoint still loads: the loader scans the same files
        warnings.warn(f"could not write {directory / 'checkpoints.json'} ({e}); loading the weight files "
                      "found in the directory", UserWarning, stacklevel=3)
        return None


def compute_dtype(dtype, device: torch.device):
    """The dtype to compute in; float16 on the CPU becomes float32, said once per call site."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = resolve_dtype(dtype, None, device)
    if device.type == "cpu" and dtype == torch.float16:
        warnings.warn("Pipeline: float16 on the CPU is slow and partly unsupported; computing in float32 "
                      "(pass dtype=torch.float32 to silence this, or use a GPU device for float16)",
                      UserWarning, stacklevel=3)
        return torch.float32
    return dtype


class Pipeline:
    """Load a causal LM and generate like DSPipeline. `model_name`: a hub id, a local directory, a
    .gguf file or a built-in name; None is the embedded SmolLM2-135M-Instruct. `checkpoint_path`, a
    local Hugging Face directory, takes precedence over `model_name` for config, tokenizer and weights.
    `trust_remote_code` is accepted for compatibility: zinfer runs its own model code, never a hub's."""

    def __init__(self, model_name=None, dtype=torch.float16, is_meta=True, device=-1, checkpoint_path=None,
                 trust_remote_code=False):
        self.model_name = model_name
        self.is_meta = is_meta
        self.trust_remote_code = trust_remote_code
        self.device = resolve_device(device)
        self.dtype = compute_dtype(dtype, self.device)
        self.repo_root, self.checkpoints_json = None, None
        if checkpoint_path is not None:  # the manifest comes first, so the load below reads it
            self.repo_root = self._checkpoint_dir(checkpoint_path)
            model_type = load_config(self.repo_root).model_type
            self.checkpoints_json = checkpoint_manifest(self.repo_root, model_type)
        self.llm = LLM(self.repo_root or model_name, dtype=self.dtype, device=self.device, meta=is_meta)
        self.dtype = self.llm.dtype  # "auto" resolved
        self.model = self.llm.model
        self.tokenizer = self._setup_tokenizer(self.llm.tokenizer)

    @staticmethod
    def _checkpoint_dir(checkpoint_path) -> Path:
        path = Path(checkpoint_path).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(f"checkpoint_path {str(checkpoint_path)!r} is not a directory")
        return path

    def _setup_tokenizer(self, tokenizer):
        if tokenizer is None:
            raise InputError(f"{self.llm.source.name!r} has no tokenizer; Pipeline takes text, so the model "
                             "directory needs tokenizer files")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def __call__(self, inputs: Sequence[str] | str = ("test",), num_tokens: int = 100,
                 do_sample: bool = False) -> list[str]:
        return self.generate_outputs(inputs, num_tokens=num_tokens, do_sample=do_sample)

    def tokenize(self, inputs: Sequence[str] | str) -> dict[str, torch.Tensor]:
        """Left-padded `input_ids` and `attention_mask`, [B, P]; other tokenizer outputs are dropped
        (Llama tokenizers return `token_type_ids`, which generation must not see)."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts:
            raise InputError("no inputs given: pass a list of prompt strings")
        batch = self.tokenizer(texts, return_tensors="pt", padding=True)
        return {k: batch[k] for k in ("input_ids", "attention_mask")}

    def generate_outputs(self, inputs: Sequence[str] | str = ("test",), num_tokens: int = 100,
                         do_sample: bool = False) -> list[str]:
        """Prompt + continuation per input, decoded with special tokens skipped (as DSPipeline)."""
        batch = self.tokenize(inputs)
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        params = SamplingParams(max_new_tokens=num_tokens, **(HF_SAMPLING if do_sample else {}))
        done = self.llm.generate(prompts, params)
        return [self.tokenizer.decode(p + c.token_ids, skip_special_tokens=True) for p, c in zip(prompts, done)]
