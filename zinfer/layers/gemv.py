"""Decode-sized dense matmuls: x @ W.T (+ bias) with at most MAX_M rows of x on CUDA goes to the Triton kernels of
triton_gemv.py; with at most CPU_REDUCTION_ROWS rows of fp32 x on the CPU inside torch.compile, to the reduction
Inductor generates; everything else to F.linear.

At batch 1 a decode step is a stream of GEMVs over the weights; cuBLAS's M = 1 GEMV stopped at ~3.1 of the H200's
4.2 TB/s, the Triton kernels aim at the copy ceiling (benchmarks/gemv.py measures both).

Switch, read once at import: ZINFER_GEMV =
  auto       (default) each (M bucket, N, K) is timed on first use against its candidates and cuBLAS (one of
             several torch.distributed ranks takes the heuristic choice instead: ranks must agree bitwise);
  heuristic  the first candidate, no timing (the same kernels on every run and machine);
  off        always F.linear (the A/B baseline).
Dependent launch (programmatic dependent launch, sm_90+; triton_gemv.py says how the kernels use it), read once at
import: ZINFER_PDL =
  on         (default, or 1) our kernels and those torch.compile generates around them (`inductor_options`), where
             the GPU and Triton support it;
  kernels    ours only. A caveat of Inductor's scheme, which `on` accepts: its kernels wait for the kernel before
             only where they read what it wrote, so a kernel with no loads would not wait at all, and a kernel after
             it could start before the one before it ended. Our kernels wait before reading anything. The GPU
             tests (PDL on against off on a llama, graph against eager on every family) found no difference;
  off        (or 0) none: the A/B baseline.
The kernels run inside the custom op `torch.ops.zinfer.skinny_linear`: torch.compile keeps it as one opaque call
(the fake implementation gives its output), and a CUDA graph captured around it records the launches it makes.
"""

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

MAX_M = 16  # rows of x (tokens) up to which the skinny kernels run; above, the matmul is no longer a weight stream
MODES = ("auto", "heuristic", "off")
_ALIASES = {"1": "auto", "on": "auto", "0": "off"}


def parse_mode(value: str | None) -> str:
    mode = (value or "auto").strip().lower()
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"ZINFER_GEMV must be one of {', '.join(MODES)} (or 1 / 0), got {value!r}")
    return mode


MODE = parse_mode(os.environ.get("ZINFER_GEMV"))
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def parse_pdl(value: str | None) -> str:
    v = (value or "on").strip().lower()
    v = {"1": "on", "0": "off"}.get(v, v)
    if v not in ("on", "kernels", "off"):
        raise ValueError(f"ZINFER_PDL must be on / 1, kernels or off / 0, got {value!r}")
    return v


PDL_MODE = parse_pdl(os.environ.get("ZINFER_PDL"))
PDL_WANTED = PDL_MODE != "off"  # our kernels


@functools.cache
def pdl_supported(index: int) -> bool:
    """Whether CUDA device `index` (sm_90 or newer) and the installed Triton (3.3 or newer) do dependent launch."""
    if not HAVE_TRITON or torch.cuda.get_device_capability(index)[0] < 9:
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def inductor_options() -> dict:
    """torch.compile options under which its generated kernels take part in dependent launch, where ours do."""
    from torch._inductor import config

    on = PDL_MODE == "on" and torch.cuda.is_available() and pdl_supported(torch.cuda.current_device())
    return {"triton.enable_pdl": True} if on and hasattr(config.triton, "enable_pdl") else {}


@torch.library.custom_op("zinfer::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tune: bool) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N]; `tune`: time the candidates on a shape's first call."""
    from zinfer.layers import triton_gemv  # Triton is imported only when a kernel runs

    return triton_gemv.linear(x, weight, bias, tune)


@skinny_linear.register_fake
def _(x, weight, bias, tune):
    return x.new_empty(x.shape[0], weight.shape[0])


def uses_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` runs the Triton kernel for these operands (else F.linear)."""
    if MODE == "off" or not HAVE_TRITON or not x.is_cuda or weight.device != x.device:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype or weight.dim() != 2:
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.shape != weight.shape[:1]):
        return False
    (n, k), rows = weight.shape, x.numel() // max(x.shape[-1], 1)
    if x.shape[-1] != k or n == 0 or k == 0 or not 0 < rows <= MAX_M or weight.stride(-1) != 1:
        return False
    grads = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    return not (grads and torch.is_grad_enabled())  # the op has no backward: training goes through F.linear


CPU_REDUCTION_ROWS = 2  # rows of x up to which a compiled CPU matmul is a reduction (at 4 it reads W 4 times)


def traced_as_reduction(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` is written as a multiply-and-sum for torch.compile to generate: up to CPU_REDUCTION_ROWS
    rows of fp32 x on the CPU inside a compiled step (decode at small batches). Inductor makes it one vectorised
    pass over the weight: on the 2-core CI machine up to 1.9x MKL's rate at M = 1 and 2.1x at M = 2 on the large
    shapes (benchmarks/cpu_gemv.py, BENCHMARKS.md); at M = 4 each row rereads the weight and MKL is as fast.
    Eager, the product would be materialised: F.linear stays."""
    if not (torch.compiler.is_compiling() and x.device.type == "cpu" and weight.dim() == 2):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False  # training keeps F.linear's backward
    # the decode step compiles with static shapes (dynamic=False): rows is a plain number here
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.dtype == weight.dtype == torch.float32 and x.shape[-1] == weight.shape[1]
            and 0 < rows <= CPU_REDUCTION_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by the skinny Triton kernels where `uses_kernel` says so, or as the reduction
    torch.compile generates where `traced_as_reduction` says so."""
    if traced_as_reduction(x, weight):
        y = (weight * x.reshape(-1, 1, weight.shape[1])).sum(-1).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    if not uses_kernel(x, weight, bias):
        return F.linear(x, weight, bias)
    k, n = x.shape[-1], weight.shape[0]
    return skinny_linear(x.reshape(-1, k), weight, bias, MODE == "auto").view(*x.shape[:-1], n)
