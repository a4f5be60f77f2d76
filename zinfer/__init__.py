"""zinfer: fast LLM text generation on the GPU you have."""

from zinfer.api import LLM, Completion
from zinfer.errors import ZinferError
from zinfer.hybrid import HybridEngine
from zinfer.pipeline import Performance, Pipeline
from zinfer.runtime.sampling import SamplingParams

__all__ = ["LLM", "Completion", "SamplingParams", "ZinferError", "Pipeline", "Performance", "HybridEngine"]
__version__ = "0.1.0"
