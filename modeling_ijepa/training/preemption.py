"""Graceful preemption: on SIGTERM (or another `--save_on_signal`), finish the step, save, exit with code 75.

Schedulers warn before they kill: SLURM sends SIGTERM (or the signal of `--signal=USR1@120`) and SIGKILL after a grace
time, Kubernetes and the clouds' spot instances send SIGTERM. The handler only records the signal; the loop asks
`PreemptionGuard.should_stop` at the step boundary, where all processes take part in one tiny collective (a gather of
one number per process, every `--preemption_check_steps` steps): a signal that reached one process stops all of them
after the same step, so they save one consistent checkpoint. Against the step itself (a forward, a backward and the
gradient all-reduce of the whole model) this gather is cheap, but it is a host-device sync: by default it runs every
`--logging_steps`, when the loop syncs anyway. A single process needs no agreement and checks its flag every step.

Ctrl-C (SIGINT) takes the same path, like the tools people know: the first one stops after the current step with a
checkpoint (one line says so), a second one exits at once (`ABANDONED_EXIT_CODE`, 130 = 128 + SIGINT) without saving:
checkpoints are written to a temporary folder and renamed when complete, so the previous one stays intact. Under a
launcher one Ctrl-C may reach a rank twice (from the terminal or scheduler, and forwarded by the launcher to each
rank's process group), and a launcher hit by a second Ctrl-C forwards SIGTERM: a stop signal counts as the second
Ctrl-C when a SIGINT is involved and it comes more than `SAME_EVENT_SECONDS` after the first.

DataLoader workers ignore all these signals (`workers.WorkerSignals`): only the training process decides.

`PREEMPTED_EXIT_CODE` is 75 (`EX_TEMPFAIL` of sysexits.h, "try again later"): distinct from a crash (1), bad arguments
(2) and a kill by SIGTERM (143), so a requeue script can tell "checkpoint saved, resume me" from a failure.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from .validation import signal_names

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # os.EX_TEMPFAIL
ABANDONED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
# Two stop signals this close together are one event that reached the process twice (directly and through the
# launcher, which forwards within its 0.1 s monitor interval), not a second Ctrl-C.
SAME_EVENT_SECONDS = 2.0


def stop_signals(args) -> list[int]:
    """SIGTERM, SIGINT and the --save_on_signal signals: each stops the run after a step with a checkpoint."""
    names = signal_names(args.save_on_signal)
    return list(dict.fromkeys([signal.SIGTERM, signal.SIGINT, *(getattr(signal, name) for name in names)]))


class Preempted(RuntimeError):
    """A signal stopped the run after a step; the checkpoint is saved and the message says how to resume."""

    exit_code = PREEMPTED_EXIT_CODE


class PreemptionGuard:
    """Signal handlers that record a preemption request, and the step-boundary agreement between processes.

    Use as a context manager around training and the save after it (handlers are restored on exit; they are only
    installed in the main thread, where Python runs signal handlers)."""

    def __init__(self, signals: list[int], check_steps: int = 1):
        self.signals = list(dict.fromkeys([signal.SIGTERM, signal.SIGINT, *signals]))
        self.check_steps = check_steps
        self.received: int = 0  # the first signal this process got (0: none)
        self.agreed_signal: int = 0  # the signal all processes stopped for (0: not stopped)
        self.agreed_step: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, object] = {}

    @classmethod
    def from_arguments(cls, args) -> PreemptionGuard:
        check_steps = args.preemption_check_steps or args.logging_steps
        return cls(stop_signals(args), check_steps=check_steps)

    def _handle(self, signum, frame) -> None:
        # Only a flag: the step in flight (and its collectives) must finish on every process before anyone saves.
        if not self.received:
            self.received, self._received_at = signum, time.monotonic()
            if signum == signal.SIGINT:
                _say("Ctrl-C (SIGINT): stopping after the current step to save a checkpoint (exit code 75); press "
                     "Ctrl-C again to exit at once without saving (the previous checkpoint stays).")
            return
        second_interrupt = signal.SIGINT in (signum, self.received)
        if second_interrupt and time.monotonic() - self._received_at > SAME_EVENT_SECONDS:
            _say(f"Second interrupt ({signal.Signals(signum).name}): exiting now without saving; the previous "
                 f"checkpoint is intact (exit code {ABANDONED_EXIT_CODE}).", every_process=True)
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:
                raise KeyboardInterrupt  # one process unwinds (stops its workers; a notebook keeps its kernel)
            os._exit(ABANDONED_EXIT_CODE)  # no unwinding: it could wait on peers; workers die with us (pdeathsig)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
                signal.siginterrupt(signum, False)  # restart interrupted system calls (file writes, sockets)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def should_stop(self, accelerator, step: int, train_steps: int) -> bool:
        """At the boundary after `step` optimizer steps: did any process get a signal? The same answer on every
        process (a gather of one number each, every `check_steps` steps); never at the run's last step."""
        if step >= train_steps:
            return False
        if accelerator.num_processes == 1:  # nobody to agree with: a Python flag every step, no device round trip
            self.agreed_signal = int(self.received)
            if self.agreed_signal:
                self.agreed_step = step
                logger.warning("%s received: stopping after step %d to save a checkpoint.", self.signal_name, step)
            return bool(self.agreed_signal)
        if step % self.check_steps:
            return False
        received = accelerator.gather(torch.tensor([self.received], device=accelerator.device))
        self.agreed_signal = int(received.max().item())
        if not self.agreed_signal:
            return False
        self.agreed_step = step
        logger.warning("%s received (by process %s): stopping after step %d to save a checkpoint.",
                       self.signal_name, received.nonzero().flatten().tolist(), step)
        return True

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.agreed_signal).name if self.agreed_signal else "no signal"

    def stop_reason(self) -> str:
        return f"preempted by {self.signal_name} at step {self.agreed_step}"

    def message(self, checkpoint) -> str:
        return (
            f"Preempted by {self.signal_name} after step {self.agreed_step}: saved {checkpoint}. Resume with the same "
            f"command plus --resume_from_checkpoint latest (exit code {PREEMPTED_EXIT_CODE})."
        )


def _say(line: str, every_process: bool = False) -> None:
    """One line on stderr from a signal handler (a raw write: no logging locks), by default from rank 0 only."""
    if every_process or os.environ.get("RANK", "0") == "0":
        os.write(2, (line + "\n").encode())
