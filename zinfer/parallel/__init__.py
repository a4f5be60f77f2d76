"""Tensor parallelism: the process group (`group`), the sharding rules (`shard`), launching ranks (`launch`).

In a script started by `torchrun --nproc-per-node N script.py`:

    with zinfer.parallel.fail_fast():        # a failing rank ends the job with its rank in the message
        llm = zinfer.LLM(model, tp=N)         # torch.distributed starts here (NCCL on CUDA, gloo on CPU)
        out = llm.generate(prompts)           # every rank gets the same tokens; print on rank 0 only
    zinfer.parallel.shutdown()
"""

from zinfer.parallel.group import SINGLE, TensorParallel, building, setup, shutdown, within_job
from zinfer.parallel.group import current as current_tp
from zinfer.parallel.launch import fail_fast
from zinfer.parallel.shard import divide, kv_heads_per_rank

__all__ = ["SINGLE", "TensorParallel", "building", "current_tp", "divide", "fail_fast", "kv_heads_per_rank",
           "setup", "shutdown", "within_job"]
