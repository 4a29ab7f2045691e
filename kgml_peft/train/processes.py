"""Which process this is under ``accelerate launch`` or ``torchrun``, and the few collective steps
the commands need: sharding work, gathering summaries, and failing together.

Pretraining is data-parallel (DDP through Accelerate, see :mod:`kgml_peft.train.loop`). Many-site
calibration is sharded instead: each process calibrates its own units from start to end and writes
their files; the main process gathers the summaries. In a single process every helper here is a
no-op.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from kgml_peft.errors import KgmlPeftError

T = TypeVar("T")
R = TypeVar("R")


def launched() -> bool:
    """Whether this process was started by a multi-process launcher (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (0 when not launched). Read from the launcher's environment, so that
    asking does not start a process group (e.g. while printing an error)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0, or the only process."""
    return rank() == 0


def use_cpu(cpu: bool) -> bool:
    """Whether Accelerate must be told to use the CPU: asked for, or launched on a machine without
    a GPU (Accelerate would otherwise treat each launched CPU process as a run of its own)."""
    import torch

    return cpu or (launched() and not torch.cuda.is_available())


def process_state(cpu: bool = False):
    """Accelerate's process state (initialises the process group when launched: gloo on CPU,
    nccl on GPUs)."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu(cpu))


def map_sharded(items: Sequence[T], work: Callable[[T], R], cpu: bool = False) -> list[R]:
    """Run ``work`` on this process's share of ``items`` (every N-th, from its rank) and return
    every process's results, in ``items`` order, in every process.

    A :class:`KgmlPeftError` in any process is raised in all of them after the others finished
    their share (so that no process waits forever for one that stopped)."""
    if not launched():
        return [work(item) for item in items]
    from accelerate.utils import gather_object

    state = process_state(cpu)
    rank, world = state.process_index, state.num_processes
    if world < 2:  # launched, yet Accelerate sees one process: each would do all the work
        raise KgmlPeftError(f"launched as {os.environ.get('WORLD_SIZE')} processes, but Accelerate "
                            "set up no process group; check the launcher's settings")
    mine: list[tuple[int, R | None, str | None]] = []
    for index in range(rank, len(items), world):
        try:
            mine.append((index, work(items[index]), None))
        except KgmlPeftError as exc:
            mine.append((index, None, str(exc)))
            break
    gathered = gather_object([mine])  # one list per process
    flat = sorted((entry for part in gathered for entry in part), key=lambda e: e[0])
    errors = [error for _, _, error in flat if error is not None]
    if errors:
        raise KgmlPeftError(errors[0])
    return [result for _, result, _ in flat]


def wait_for_everyone() -> None:
    """A barrier when launched; nothing otherwise."""
    if launched():
        process_state().wait_for_everyone()


def close_process_group() -> None:
    """Destroy the process group, if this process started one, before the interpreter shuts down.

    Left to interpreter finalization, gloo's worker threads can still hold tensors, and a process
    whose work is done aborts with SIGABRT ("terminate called without an active exception";
    pytorch/pytorch#190489), which the launcher reports as a failed run. Local: no collective, so
    it cannot wait for another process."""
    if not launched():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_launched(code: object) -> None:
    """End a launched process at once with exit status ``code`` (a :class:`SystemExit`'s code:
    None is 0, a message is printed and is 1): stdio and logging flushed, then ``os._exit``.

    Destroying the process group is not always enough: under load a worker whose work was done
    still aborted now and then in interpreter finalization (gloo, the same SIGABRT as above), and
    the launcher then fails the whole run. Leaving without finalization cannot abort; everything
    the commands write is already closed and renamed into place (atomic writes)."""
    import logging

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    status = 0 if code is None else code if isinstance(code, int) else 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            pass
    _main_reports_first(status)
    os._exit(status)


#: how long a failing process waits for the main process to say its last word
REPORT_WAIT_S = 20.0


def _main_reports_first(status: int) -> None:
    """Let the main process print before any other process of a launched run ends with an error.

    Only the main process prints a user error (every process fails alike); the launcher stops every
    worker as soon as one ends with a non-zero status, so a worker that failed first would cut the
    main process off before its ``error:`` line. The main process marks its end in the launcher's
    key-value store (torchrun's agent hosts one for every run); another process that fails waits for
    that mark, at most :data:`REPORT_WAIT_S` seconds (the main process may itself be stuck waiting
    for the failed one). No process group is needed: most user errors come before one exists.
    Without the agent's store (another launcher) nothing waits."""
    if status == 0 and not is_main_process():
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from datetime import timedelta

    from torch.distributed import TCPStore

    key = (f"kgml-peft/main-ended/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
           f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    try:
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=REPORT_WAIT_S))
        if is_main_process():
            store.set(key, str(status))
        else:
            store.wait([key])
    except (KeyError, ValueError, RuntimeError):  # no address, no store, or the wait timed out
        pass
