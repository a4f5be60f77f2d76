"""KV cache placements: on the compute device (`KVCache`) or in host memory (`offloaded_cache`)."""

DEVICE_BUCKET = 128  # device cache lengths round up to this, so nearby requests reuse one CUDA graph
HOST_BUCKET = 16  # an offloaded cache is never graph-captured: round less, host bytes decide the batch


def cache_len(n: int, offloaded: bool = False) -> int:
    """Slots allocated for a request needing `n`: what the runtime allocates and the planner sizes."""
    bucket = HOST_BUCKET if offloaded else DEVICE_BUCKET
    return -(-n // bucket) * bucket
