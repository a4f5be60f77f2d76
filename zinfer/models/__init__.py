"""Model families, one file each, and the registry `model_type -> class`."""

from zinfer.errors import UnsupportedModelError
from zinfer.models.bloom import BloomForCausalLM
from zinfer.models.llama import LlamaForCausalLM
from zinfer.models.mixtral import MixtralForCausalLM
from zinfer.models.opt import OPTForCausalLM

MODEL_REGISTRY = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "opt": OPTForCausalLM,
    "bloom": BloomForCausalLM,
    "mixtral": MixtralForCausalLM,
}


def model_class(model_type: str):
    """The class for a config's `model_type`; fails before anything is loaded for other types."""
    if model_type not in MODEL_REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[model_type]
