"""Starting tensor-parallel ranks, and what a rank does with its output and its errors.

`torchrun --nproc-per-node N -m zinfer generate --tp N ...` starts the ranks by hand; `launch_local` does the
same from inside `zinfer generate --nproc N`. Either way only rank 0 prints results, and a rank that fails
exits at once with a message naming it: the launcher then stops the others, which would otherwise wait in
their next collective until its timeout.
"""

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from zinfer.errors import ZinferError
from zinfer.parallel.group import launched


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) in a process started alone."""
    if not launched():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def rank_label() -> str:
    """'rank R: ' in a multi-process job (for messages), '' otherwise."""
    rank, world = rank_and_world()
    return f"rank {rank}: " if world > 1 else ""


def exit_now(code: int) -> None:
    """End this rank without tearing down torch.distributed, which could wait on ranks that will not come."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextmanager
def fail_fast() -> Iterator[None]:
    """Around a rank's work in a script started by torchrun: an exception ends this process at once with
    'zinfer: error: rank R of N failed: ...' (and the traceback of anything but a zinfer error), so the launcher
    stops the other ranks instead of them hanging in a collective."""
    try:
        yield
    except Exception as e:
        rank, world = rank_and_world()
        if not isinstance(e, ZinferError):
            traceback.print_exc()
        print(f"zinfer: error: rank {rank} of {world} failed: {type(e).__name__}: {e}", file=sys.stderr)
        exit_now(1)


@contextmanager
def rank_zero_stdout() -> Iterator[None]:
    """Inside: only rank 0's stdout is shown (results are printed once); other ranks write to /dev/null.
    Their stderr (errors) is kept, labelled by rank where zinfer prints it."""
    rank, world = rank_and_world()
    if rank == 0:
        yield
        return
    saved = sys.stdout
    with open(os.devnull, "w") as devnull:
        sys.stdout = devnull
        try:
            yield
        finally:
            sys.stdout = saved


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run `python -m zinfer ARGV` in `nproc` local processes with torch's elastic launcher (torchrun's engine,
    a free port picked for the rendezvous), wait for all of them, and return 0 or the first failure's exit
    code. When one rank fails the launcher stops the others."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # share the cores between the ranks (torchrun would set 1 thread each, with a warning banner)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "zinfer"])
    args.training_script_args = argv  # set, not parsed: torchrun's parser would take --nproc for its own flag
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        # a negative exit code is a signal (a rank killed, e.g. out of memory)
        code = failure.exitcode if failure.exitcode > 0 else 1
        print(f"zinfer: error: rank {rank} of {nproc} failed (exit code {failure.exitcode}); the launcher "
              "stopped the other ranks", file=sys.stderr)
        return code
    return 0
