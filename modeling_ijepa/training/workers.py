"""Process lifecycle: DataLoader workers never own a stop signal and never outlive their training process; ranks
started by a launcher never outlive it; a dead worker or a lost rank is named.

Who may receive which signal (docs/pretraining.md, "Preemption"): schedulers and terminals signal whole process
groups or sessions (`scancel` signals every process of the job step, Ctrl-C the terminal's foreground group, torch
elastic forwards its own SIGTERM/SIGINT to each rank's process group), so the DataLoader workers get them too. Torch's
worker only installs a C SIGTERM handler that exits the worker, and the training process then dies on torch's
"DataLoader worker ... is killed by signal" error before it could save. Here the workers ignore SIGTERM, SIGINT and
every --save_on_signal signal (set in `worker_init_fn`, which torch calls after installing its handler); the training
process alone decides, finishes its step, saves, and stops its workers. Linux's parent-death signal (`prctl
PR_SET_PDEATHSIG`) replaces what the ignored signals no longer do: a worker gets SIGKILL when its training process
dies, a rank gets SIGTERM (the graceful path) when its launcher dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Seconds a worker may take to leave after the DataLoader's own shutdown (which already waited for it) before SIGKILL.
WORKER_KILL_WAIT_SECONDS = 5.0
# Environment variables that the launchers we know set in the processes they start (torch elastic, behind
# `accelerate launch` and `torchrun`): only then is the parent a launcher whose death must end the rank. Under `srun`
# the parent is slurmstepd, which ends its tasks itself.
LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID",)


def set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send `signum` to this process when its parent dies; False on other systems (nothing to do)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    return True


class WorkerSignals:
    """`worker_init_fn` of the DataLoader: the worker ignores the stop signals (the training process decides) and is
    SIGKILLed by the kernel if the training process dies. Picklable, for workers started by spawn as well as fork."""

    def __init__(self, stop_signals: list[int]):
        self.stop_signals = sorted({int(s) for s in (signal.SIGTERM, signal.SIGINT, *stop_signals)})
        self.parent_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        for signum in self.stop_signals:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.stop_signals)  # blocked while the workers started
        if set_parent_death_signal(signal.SIGKILL) and os.getppid() != self.parent_pid:
            os._exit(1)  # the training process died before the request took effect: nobody will read our batches


@contextlib.contextmanager
def signals_blocked(signals: list[int]) -> Iterator[None]:
    """Hold `signals` in this thread while DataLoader workers are forked: a worker inherits the mask and ignores them
    before unblocking (`WorkerSignals`), so a signal in that window never reaches torch's own worker handler; here it
    is delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_workers(iterator) -> None:
    """Shut down a DataLoader iterator's workers: torch's own shutdown (done event, join), then SIGKILL for any worker
    still alive after `WORKER_KILL_WAIT_SECONDS` (torch's fallback is SIGTERM, which the workers ignore)."""
    processes = list(getattr(iterator, "_workers", []))
    shutdown = getattr(iterator, "_shutdown_workers", None)
    try:
        if shutdown is not None:
            shutdown()
    except RuntimeError as err:
        # Torch's SIGCHLD handler raising while it joins: a worker had died. The error that ends the run (the
        # DataWorkerError naming it, or whatever made the loop stop) is already on its way; torch's own `finally`
        # has unregistered the workers, so only the join below is left.
        if not is_worker_death(err):
            raise
        logger.warning("While stopping the DataLoader workers: %s", err)
    deadline = time.monotonic() + WORKER_KILL_WAIT_SECONDS
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            logger.warning("DataLoader worker (pid %d) did not stop; killing it.", process.pid)
            os.kill(process.pid, signal.SIGKILL)
            process.join(timeout=WORKER_KILL_WAIT_SECONDS)


_WORKER_DEATH = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)")


def is_worker_death(error: BaseException) -> bool:
    """Torch's SIGCHLD handler error ("DataLoader worker (pid(s) N) exited unexpectedly" / "is killed by signal"), or
    the DataLoader's timeout waiting for a stalled worker."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("DataLoader worker" in text or "DataLoader timed out" in text)


def worker_pids(iterator) -> list[int]:
    """The pids of a DataLoader iterator's workers, in worker-id order (empty without workers)."""
    return [process.pid for process in getattr(iterator, "_workers", [])]


def dead_worker_ids(error: BaseException, pids: list[int]) -> list[int]:
    """Worker ids (0..W-1) of the pids named in torch's worker-death error; `pids` from `worker_pids` (kept by the
    stream: the error often reaches the loop after the iterator was closed)."""
    match = _WORKER_DEATH.search(str(error))
    if match is None:
        return []
    named = {int(p) for p in re.findall(r"\d+", match.group(1))}
    return [worker_id for worker_id, pid in enumerate(pids) if pid in named]


def launched_by_launcher() -> bool:
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def follow_launcher() -> bool:
    """A rank started by a launcher (torch elastic) gets SIGTERM when the launcher dies, so it stops through the
    graceful path (finish the step, save if the processes can still agree, exit) instead of running on as an orphan.
    Returns whether it was set. The launcher may already be gone: then the signal is sent to ourselves now."""
    if not launched_by_launcher():
        return False
    launcher = os.getppid()
    if not set_parent_death_signal(signal.SIGTERM):
        return False
    if os.getppid() != launcher:  # it died between the two calls: the kernel will not send the signal now
        os.kill(os.getpid(), signal.SIGTERM)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# lost ranks

# Seconds the survivors of a failed collective wait for each other in the rendezvous store before naming the missing.
ROLL_CALL_SECONDS = 5.0
_ROLL_CALL_KEY = "ijepa/alive/{rank}"
# What torch's gloo and NCCL backends say when a peer is gone or a collective timed out.
_COLLECTIVE_FAILURES = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout",
                        "broken pipe", "socket")


class LostProcessError(RuntimeError):
    """A process of the job is gone or hung: a collective failed or timed out. The message names it."""


def set_collective_timeout(seconds: int) -> None:
    """From now on a collective that waits `seconds` for a peer fails (torch's `set_timeout` of the default group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.set_timeout(timedelta(seconds=seconds))


def lost_process_error(error: BaseException, accelerator) -> LostProcessError | None:
    """For a failed collective of a multi-process run: which processes are lost (a roll call in the rendezvous store:
    every survivor writes its key and waits `ROLL_CALL_SECONDS` for the others); None for other errors."""
    import torch.distributed as dist

    text = str(error).lower()
    if (isinstance(error, LostProcessError) or accelerator.num_processes == 1 or not dist.is_initialized()
            or not (isinstance(error, dist.DistError) or any(word in text for word in _COLLECTIVE_FAILURES))):
        return None
    rank, world = accelerator.process_index, accelerator.num_processes
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        missing = roll_call(rank, world)
    except (RuntimeError, OSError) as store_error:  # the store's host is gone: rank 0 (srun, torchrun) or the launcher
        host = "the launcher" if launched_by_launcher() else "process 0"
        who = f"{host} (which hosts the rendezvous store)"
        return LostProcessError(
            f"Process {rank}: lost {who}: a collective failed ({first_line}) and the store is unreachable "
            f"({type(store_error).__name__}). Exiting; resume from the last checkpoint with --resume_from_checkpoint "
            "latest."
        )
    if not missing:
        return None  # everyone answered: not a lost process, the original error stands
    return LostProcessError(
        f"Process {rank}: lost process(es) {missing} of {world}: a collective failed ({first_line}) and they did not "
        f"answer within {ROLL_CALL_SECONDS:g} s (killed, crashed or hung; see their logs). Exiting; resume from the "
        "last checkpoint with --resume_from_checkpoint latest."
    )


def roll_call(rank: int, world: int) -> list[int]:
    """The ranks that did not write their key into the default group's store within `ROLL_CALL_SECONDS`."""
    from torch.distributed.distributed_c10d import _get_default_store

    store = _get_default_store()
    store.set_timeout(timedelta(seconds=ROLL_CALL_SECONDS))
    store.set(_ROLL_CALL_KEY.format(rank=rank), "1")
    keys = {other: _ROLL_CALL_KEY.format(rank=other) for other in range(world)}
    deadline = time.monotonic() + ROLL_CALL_SECONDS
    while True:
        missing = [other for other, key in keys.items() if not store.check([key])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)
