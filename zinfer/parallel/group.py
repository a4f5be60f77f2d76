"""The tensor-parallel group a model runs in (this rank, the number of ranks), set up from torchrun's environment.

A model is built for one `TensorParallel` (`building(tp)` around its constructor, read with `current()`),
so model files can size their per-rank heads without any argument threaded through the constructors.
"""

import atexit
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.distributed_c10d import _resolve_process_group

from zinfer.errors import InputError

# How long a collective waits for the other ranks before failing: long enough for a slow rank to finish loading
# a large checkpoint, short enough that a rank lost without its launcher noticing cannot hang the rest forever.
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class TensorParallel:
    """`size` processes each holding 1/size of every split weight: every process of the job (the default
    group), or one block of consecutive ranks of a larger job (`within_job`); `rank` is this process's rank
    inside the group, `group_name` names it (for torch.compile, and to find the group at each collective).
    No ProcessGroup object is kept: a reference outliving `destroy_process_group` makes gloo abort the process
    at exit."""

    rank: int = 0
    size: int = 1
    group_name: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _group(self):
        return None if self.group_name is None else _resolve_process_group(self.group_name)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial `x`, in place. The result is the same on every rank (NCCL and gloo
        reduce each element once and share it), so replicated work after it (norms, LM head, sampling) agrees
        bitwise. CUDA graphs capture the NCCL call; torch.compile traces its functional form."""
        if torch.compiler.is_compiling():
            return funcol.all_reduce(x, "sum", self.group_name)
        # eager: the plain collective; with gloo the functional one now and then aborts at exit
        dist.all_reduce(x, group=self._group())
        return x

    def broadcast_object(self, obj):
        """The group's rank 0's `obj` on every rank of the group."""
        box, group = [obj], self._group()
        dist.broadcast_object_list(box, src=0 if group is None else dist.get_global_rank(group, 0), group=group)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in group-rank order, on every rank of the group."""
        values = [None] * self.size
        dist.all_gather_object(values, obj, group=self._group())
        return values

    def check_agree(self, value, what: str) -> None:
        """Fail on every rank if the ranks hold different `value`s (they must step in lockstep)."""
        values = self.all_gather_object(value)
        if any(v != values[0] for v in values):
            bad = [r for r, v in enumerate(values) if v != values[0]]
            raise RuntimeError(f"tensor-parallel ranks disagree on {what}: rank(s) {bad} differ from rank 0")


SINGLE = TensorParallel()
_BUILDING: ContextVar[TensorParallel] = ContextVar("zinfer_tensor_parallel", default=SINGLE)


@contextmanager
def building(tp: TensorParallel) -> Iterator[TensorParallel]:
    """Models constructed inside see `tp` through `current()` (like `torch.device('meta')` for devices)."""
    token = _BUILDING.set(tp)
    try:
        yield tp
    finally:
        _BUILDING.reset(token)


def current() -> TensorParallel:
    """The group the model under construction is built for (one process outside `building`)."""
    return _BUILDING.get()


def launched() -> bool:
    """True inside a process started by torchrun (or another launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device) -> torch.device:
    """The device this rank computes on: `cuda` without an index means cuda:LOCAL_RANK (one GPU per rank)."""
    if device.type != "cuda" or device.index is not None:
        return device
    if local_rank() >= torch.cuda.device_count():
        raise InputError(f"local rank {local_rank()} needs GPU {local_rank()}, but this machine has "
                         f"{torch.cuda.device_count()}: start at most that many processes per node")
    return torch.device("cuda", local_rank())


def setup(size: int, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> TensorParallel:
    """The group of `size` ranks for a model on `device`; initialises torch.distributed from the environment
    (NCCL on CUDA, gloo on CPU) when it is not initialised yet."""
    if size == 1:
        return SINGLE
    if not dist.is_initialized():
        if not launched():
            raise InputError(f"tp={size} runs one process per rank: start them with `torchrun --nproc-per-node "
                             f"{size} your_script.py` (Python) or `zinfer generate --nproc {size} ...` (command line)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        # left up at exit, gloo's threads can abort the process: tear it down if the script did not
        atexit.register(shutdown)
    world = dist.get_world_size()
    if world != size:
        raise InputError(f"tp={size}, but {world} processes were started: tensor parallelism uses every process "
                         f"of the job, start exactly {size} (torchrun --nproc-per-node {size})")
    return TensorParallel(dist.get_rank(), size, dist.group.WORLD.group_name)


def within_job(size: int, what: str = "tp") -> TensorParallel:
    """This rank's group of `size` ranks inside a torch.distributed job that is already running (a trainer's):
    the whole job when it has `size` processes, else the block of `size` consecutive ranks this rank is in,
    the job split into world / size groups. Every rank of the job must call it (new groups are collective).
    `what` names the option in messages."""
    if size < 1:
        raise InputError(f"{what}={size}: the number of ranks must be at least 1")
    if size == 1:
        return SINGLE
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(f"{what}={size} splits the model over {size} processes of a torch.distributed job, "
                         f"but torch.distributed is not initialised: start the job with `torchrun "
                         f"--nproc-per-node {size}` (or a multiple of {size}) and call "
                         "torch.distributed.init_process_group() first")
    world = dist.get_world_size()
    if world % size:
        raise InputError(f"{what}={size} does not divide the job's {world} processes (it is split into groups "
                         f"of {size} ranks): {what} must divide {world}")
    if world == size:
        return TensorParallel(dist.get_rank(), size, dist.group.WORLD.group_name)
    # Consecutive ranks, as torchrun numbers the processes of one node: a group's all-reduces stay on the
    # node's links (NVLink) when `size` divides the processes per node. Made once per job and size: every new
    # group is a new set of communicators (NCCL buffers on every GPU) that lives until the job tears down.
    # Every rank has made the same calls, so every rank finds (or misses) the cached group alike.
    rank_and_name = _subgroups.get((world, size))
    if rank_and_name is None or not _registered(rank_and_name[1]):
        group, _ = dist.new_subgroups(size)
        rank_and_name = _subgroups[(world, size)] = (dist.get_rank(group), group.group_name)
    return TensorParallel(rank_and_name[0], size, rank_and_name[1])


# (job size, group size) -> this rank's (rank in its group, group name); names only, no ProcessGroup objects
_subgroups: dict[tuple[int, int], tuple[int, str]] = {}


def _registered(name: str) -> bool:
    """Whether a group of this name is up (a torn-down and restarted job has none of the old ones)."""
    try:
        _resolve_process_group(name)
    except RuntimeError:
        return False
    return True


def shutdown() -> None:
    """Tear down torch.distributed if it is up: call it when a script's ranks are done (it also runs at exit
    when zinfer started torch.distributed). The barrier first, so no rank tears down its connections while
    another still uses them. Garbage collected first: a reference cycle still holding a group or a gloo work
    object would otherwise be freed in interpreter teardown, where gloo aborts the process."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
