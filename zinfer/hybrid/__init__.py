"""The RLHF hybrid engine: a training model switches into zinfer's generation path and back."""

from zinfer.hybrid.engine import HybridEngine

__all__ = ["HybridEngine"]
