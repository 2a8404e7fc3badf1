"""Faults as a cluster delivers them to a 2-process CPU run (`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2`, one DataLoader worker per rank): a stop signal to every process of the job (as `scancel` and
SLURM's `--signal` do), to the launcher alone, Ctrl-C once and twice, SIGKILL of the launcher, of one rank (also
started the `srun` way, one task per rank) and of one DataLoader worker.

"Every process" is every descendant of the launcher, collected from /proc before the signal (the launcher starts each
rank in its own session, so a process-group signal would not reach them). Each rank prints one line with its exit
code (`pretrain.py: process R exits with code C`), since a launcher that got the signal itself does not report them.
Moments that polling cannot hit (inside a checkpoint write, while the DataLoader workers start) are made
deterministic by a wrapper that pauses there for a few seconds and leaves a marker file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_ijepa.training import checkpoints, loop  # noqa: E402
from modeling_ijepa.training.preemption import (  # noqa: E402
    ABANDONED_EXIT_CODE, PREEMPTED_EXIT_CODE, SAME_EVENT_SECONDS,
)

from test_faults import GRACE_SECONDS, same_weights, start_ranks, wait_all  # noqa: E402
from test_pretrain import ACCELERATE, REPO, SCRIPTS, e2e_args, free_port, make_mixed_image_folder, read_log  # noqa: E402

STEPS = 12
# Signals the launcher forwards to the ranks (torch elastic's default list plus SIGUSR1, as docs/pretraining.md says).
LAUNCHER_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
LOST_PROCESS_BOUND_SECONDS = 60  # the bound for every process of the job to be gone after a loss
# Runs through `python WRAPPER pretrain.py ARGS`. IJEPA_TEST_PAUSE=write:N pauses the write of checkpoint-N after the
# process files are in its temporary folder; =workers pauses each DataLoader worker before its `worker_init_fn` (the
# stop signals are still blocked there, inherited from the training process). Each leaves `paused-<what>` in the
# output folder and sleeps IJEPA_TEST_PAUSE_SECONDS.
WRAPPER = '''
import os, runpy, sys, time
from pathlib import Path
from modeling_ijepa.training import checkpoints, workers

what, _, step = os.environ.get("IJEPA_TEST_PAUSE", "").partition(":")
seconds = float(os.environ.get("IJEPA_TEST_PAUSE_SECONDS", "3"))
marker_dir = Path(os.environ["IJEPA_TEST_MARKERS"])

if what == "write":
    original_write = checkpoints.write_process_files

    def paused_write(accelerator, tmp, *args, **kwargs):
        error = original_write(accelerator, tmp, *args, **kwargs)
        if tmp.name == checkpoints.TMP_CHECKPOINT_PREFIX + step:
            (marker_dir / f"paused-write-{os.environ.get('RANK', '0')}").write_text(tmp.name)
            time.sleep(seconds)
        return error

    checkpoints.write_process_files = paused_write
elif what == "workers":
    original_init = workers.WorkerSignals.__call__

    def paused_init(self, worker_id):
        (marker_dir / f"paused-workers-{os.getpid()}").write_text(str(worker_id))
        time.sleep(seconds)
        original_init(self, worker_id)

    workers.WorkerSignals.__call__ = paused_init
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def environment(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_USE_CPU="1", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def run_args(data: Path, output: Path, *extra: str) -> list[str]:
    return e2e_args(data, output, STEPS, "--report_to", "none", "--dataloader_num_workers", "1", *extra)


class Job:
    """An `accelerate launch` of 2 CPU ranks in its own session, output in `log`."""

    def __init__(self, args: list[str], log: Path, wrapper: Path | None = None, **env: str):
        command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                   *([str(wrapper)] if wrapper else []), str(SCRIPTS / "pretrain.py"), *args]
        self.log = log
        self._log_file = log.open("w")
        self.launcher = subprocess.Popen(command, env=environment(**env), cwd=REPO, stdout=self._log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def processes(self) -> list[int]:
        """The launcher and every descendant (ranks, their DataLoader workers) alive now."""
        return [self.launcher.pid, *descendants(self.launcher.pid)]

    def ranks(self) -> list[int]:
        return children(self.launcher.pid)

    def wait(self, timeout: float) -> int:
        try:
            return self.launcher.wait(timeout=timeout)
        finally:
            self._log_file.close()

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        for pid in self.processes():
            signal_if_alive(pid, signal.SIGKILL)
        self.launcher.wait(timeout=30)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def signal_if_alive(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def wait_gone(pids: list[int], timeout: float) -> float:
    """Seconds until every pid has exited; fails after `timeout` naming the survivors."""
    start = time.monotonic()
    while any(alive(pid) for pid in pids):
        assert time.monotonic() - start < timeout, f"still alive after {timeout} s: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)
    return time.monotonic() - start


def wait_until(condition, job: Job, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.launcher.poll() is None, f"the job ended before {what}:\n{job.output()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{job.output()[-4000:]}"
        time.sleep(0.02)


def logged_steps(output: Path) -> int:
    path = output / loop.TRAIN_LOG_NAME
    return len(path.read_text().splitlines()) if path.exists() else 0


def exit_codes(output: str) -> dict[int, int]:
    """{rank: exit code} from the `pretrain.py: process R exits with code C` lines."""
    return {int(r): int(c) for r, c in re.findall(r"pretrain\.py: process (\d+) exits with code (\d+)", output)}


def stopped_step(output: str) -> int:
    match = re.search(r"Preempted by (\w+) after step (\d+): saved (\S+)\.", output)
    assert match, output[-4000:]
    return int(match.group(2))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_mixed_image_folder(tmp_path_factory.mktemp("signal_images") / "images", count=12, corrupt=False)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    """One uninterrupted 2-process run that every resume is compared with."""
    root = tmp_path_factory.mktemp("uninterrupted")
    job = Job(run_args(data, root / "run"), root / "launch.log")
    assert job.wait(timeout=400) == 0, job.output()[-4000:]
    return root / "run"


@pytest.fixture
def wrapper(tmp_path) -> Path:
    path = tmp_path / "pause.py"
    path.write_text(WRAPPER)
    return path


def resume_and_compare(data: Path, output: Path, reference: Path, log: Path) -> None:
    job = Job(run_args(data, output, "--resume_from_checkpoint", "latest"), log)
    assert job.wait(timeout=400) == 0, job.output()[-4000:]
    same_weights(output, reference)
    assert read_log(output) == read_log(reference)  # same losses, schedules and batches at every step


# ---------------------------------------------------------------------------------------------------------------------
# a stop signal to every process of the job, or to the launcher alone


def wait_for_moment(job: Job, output: Path, moment: str, markers: Path) -> None:
    if moment == "mid-step":
        wait_until(lambda: logged_steps(output) >= 3, job, "step 3")
    elif moment == "checkpoint-write":
        wait_until(lambda: any(markers.glob("paused-write-*")), job, "the write of checkpoint-4")
    else:  # workers starting: both ranks' workers are paused before their init function
        wait_until(lambda: len(list(markers.glob("paused-workers-*"))) >= 2, job, "the workers' start")


CASES = [  # (signal, who receives it, moment, extra arguments)
    pytest.param("SIGTERM", "job", "mid-step", [], id="SIGTERM-job-mid-step"),
    # Without SIGUSR1 in TORCHELASTIC_SIGNALS_TO_HANDLE (the documented launcher recipe) SIGUSR1 kills the launcher.
    pytest.param("SIGUSR1", "job", "mid-step", ["--save_on_signal", "SIGUSR1"], id="SIGUSR1-job-mid-step"),
    pytest.param("SIGINT", "job", "mid-step", [], id="SIGINT-job-mid-step"),
    pytest.param("SIGTERM", "launcher", "mid-step", [], id="SIGTERM-launcher-mid-step"),
    pytest.param("SIGTERM", "job", "checkpoint-write", ["--checkpointing_steps", "4"], id="SIGTERM-job-write",
                 marks=pytest.mark.slow),
    pytest.param("SIGTERM", "job", "workers-start", [], id="SIGTERM-job-workers-start", marks=pytest.mark.slow),
    pytest.param("SIGINT", "job", "workers-start", [], id="SIGINT-job-workers-start", marks=pytest.mark.slow),
    pytest.param("SIGTERM", "launcher", "checkpoint-write", ["--checkpointing_steps", "4"],
                 id="SIGTERM-launcher-write", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("signal_name, target, moment, extra", CASES)
def test_stop_signal__every_rank_saves_exits_75_no_process_left_and_the_resume_is_bitwise_exact(
        signal_name, target, moment, extra, data, uninterrupted, wrapper, tmp_path):
    output, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    pause = {"checkpoint-write": "write:4", "workers-start": "workers"}.get(moment, "")
    job = Job(run_args(data, output, *extra), tmp_path / "launch.log", wrapper=wrapper, IJEPA_TEST_PAUSE=pause,
              IJEPA_TEST_MARKERS=str(markers), TORCHELASTIC_SIGNALS_TO_HANDLE=LAUNCHER_SIGNALS)
    try:
        wait_for_moment(job, output, moment, markers)
        processes = job.processes()
        assert len(processes) == 5, processes  # launcher, 2 ranks, 1 worker each
        signum = getattr(signal, signal_name)
        for pid in processes if target == "job" else processes[:1]:
            signal_if_alive(pid, signum)
        job.wait(timeout=GRACE_SECONDS)
        wait_gone(processes, timeout=10)
    finally:
        if job.launcher.poll() is None:
            job.kill()
    text = job.output()
    assert exit_codes(text) == {0: PREEMPTED_EXIT_CODE, 1: PREEMPTED_EXIT_CODE}, text[-4000:]
    assert "exited unexpectedly" not in text and "killed by signal" not in text, text[-4000:]
    step = stopped_step(text)
    assert f"Preempted by {signal_name} after step {step}" in text, re.findall(r".*(?:Preempted|received).*", text)
    assert 1 <= step < STEPS
    assert checkpoints.checkpoint_problem(output / f"checkpoint-{step}", "full") is None
    assert json.loads((output / f"checkpoint-{step}" / checkpoints.TRAINER_STATE_NAME).read_text())["global_step"] == step
    assert not list(output.glob(".tmp-*"))
    if signal_name == "SIGINT":
        assert text.count("Ctrl-C (SIGINT): stopping after the current step to save a checkpoint") == 1
        assert "press Ctrl-C again to exit at once without saving" in text
    resume_and_compare(data, output, uninterrupted, tmp_path / "resume.log")


# ---------------------------------------------------------------------------------------------------------------------
# Ctrl-C twice


def test_double_ctrl_c__exits_at_once_with_130_and_the_previous_checkpoint_verifies(data, wrapper, tmp_path):
    """Ctrl-C reaches every process (the launcher forwards it to the ranks, which also get it directly); the second
    one, during the write of checkpoint-4 (paused there for a minute), ends every process within seconds."""
    output, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    job = Job(run_args(data, output, "--checkpointing_steps", "2"), tmp_path / "launch.log", wrapper=wrapper,
              IJEPA_TEST_PAUSE="write:4", IJEPA_TEST_PAUSE_SECONDS="60", IJEPA_TEST_MARKERS=str(markers))
    try:
        wait_until(lambda: any(markers.glob("paused-write-*")), job, "the write of checkpoint-4")
        processes = job.processes()
        for pid in processes:
            signal_if_alive(pid, signal.SIGINT)
        time.sleep(SAME_EVENT_SECONDS + 1.0)  # a second press, not the same one arriving twice
        for pid in processes:
            signal_if_alive(pid, signal.SIGINT)
        seconds = wait_gone(processes, timeout=15)  # the pause would hold a saving run for a minute
    finally:
        if job.launcher.poll() is None:
            job.kill()
    text = job.output()
    assert seconds < 15
    # One line per rank; the launcher, hit by the second Ctrl-C too, forwards SIGTERM, which may arrive first.
    abandoned = re.findall(r"Second interrupt \((SIGINT|SIGTERM)\): exiting now without saving; the previous checkpoint "
                           rf"is intact \(exit code {ABANDONED_EXIT_CODE}\)\.", text)
    assert len(abandoned) == 2, text[-4000:]
    assert "exits with code" not in text  # nothing went on to the save's end
    assert [p.name for p in checkpoints.list_checkpoints(output)] == ["checkpoint-2"]
    assert checkpoints.checkpoint_problem(output / "checkpoint-2", "full") is None


# ---------------------------------------------------------------------------------------------------------------------
# a lost launcher or rank: nothing runs on


def test_launcher_sigkill__ranks_follow_it_save_and_exit_75_no_orphan(data, tmp_path):
    """The ranks get SIGTERM from the kernel when the launcher dies (parent-death signal): the graceful path."""
    output = tmp_path / "run"
    job = Job(run_args(data, output, "--max_steps", "400"), tmp_path / "launch.log")
    try:
        wait_until(lambda: logged_steps(output) >= 3, job, "step 3")
        processes = job.processes()
        job.launcher.send_signal(signal.SIGKILL)
        wait_gone(processes, timeout=LOST_PROCESS_BOUND_SECONDS)
    finally:
        job.kill()
    text = job.output()
    assert exit_codes(text) == {0: PREEMPTED_EXIT_CODE, 1: PREEMPTED_EXIT_CODE}, text[-4000:]
    step = stopped_step(text)
    assert checkpoints.checkpoint_problem(output / f"checkpoint-{step}", "full") is None


def test_rank_sigkill_under_accelerate_launch__every_process_gone_within_the_bound(data, tmp_path):
    output = tmp_path / "run"
    job = Job(run_args(data, output, "--max_steps", "400"), tmp_path / "launch.log")
    try:
        wait_until(lambda: logged_steps(output) >= 3, job, "step 3")
        processes = job.processes()
        os.kill(job.ranks()[1], signal.SIGKILL)
        wait_gone(processes, timeout=LOST_PROCESS_BOUND_SECONDS)
    finally:
        job.kill()
    assert job.launcher.returncode != 0


@pytest.mark.parametrize("victim, how", [
    pytest.param(1, "SIGKILL", id="rank1-SIGKILL"),
    pytest.param(0, "SIGKILL", id="rank0-store-host-SIGKILL", marks=pytest.mark.slow),
    pytest.param(1, "SIGSTOP", id="rank1-hung-SIGSTOP", marks=pytest.mark.slow),
])
def test_lost_rank_srun_style__the_other_exits_1_naming_it_within_the_bound(data, tmp_path, victim, how):
    """One task per rank, no launcher in between (`srun`): nobody but the processes themselves notices a loss. A
    killed peer closes its connections (the collective fails at once); a hung one makes it wait
    --distributed_timeout_seconds."""
    output, logs = tmp_path / "run", tmp_path / "logs"
    ranks = start_ranks(run_args(data, output, "--max_steps", "400", "--distributed_timeout_seconds", "10"), logs)
    survivor = 1 - victim
    try:
        deadline = time.monotonic() + 240
        while logged_steps(output) < 3:
            assert all(r.poll() is None for r in ranks) and time.monotonic() < deadline, "no step 3"
            time.sleep(0.05)
        processes = [r.pid for r in ranks] + [pid for r in ranks for pid in descendants(r.pid)]
        os.kill(ranks[victim].pid, getattr(signal, how))
        code = ranks[survivor].wait(timeout=LOST_PROCESS_BOUND_SECONDS)
        if how == "SIGSTOP":
            os.kill(ranks[victim].pid, signal.SIGKILL)  # what the scheduler does to the rest of a failed step
        wait_all(ranks, 30)
        wait_gone(processes, timeout=15)
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
    text = (logs / f"rank{survivor}.log").read_text()
    assert code == 1, text[-4000:]
    assert f"pretrain.py: process {survivor} exits with code 1 (LostProcessError)" in text
    if victim == 0:
        assert "lost process 0 (which hosts the rendezvous store)" in text, text[-4000:]
    else:
        assert f"lost process(es) [{victim}] of 2" in text, text[-4000:]


# ---------------------------------------------------------------------------------------------------------------------
# a DataLoader worker killed on its own


def test_worker_sigkill__data_worker_error_names_that_worker_and_its_record(data, tmp_path):
    output = tmp_path / "run"
    env = environment()
    env.pop("ACCELERATE_USE_CPU")
    with (tmp_path / "run.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "pretrain.py"),
             *run_args(data, output, "--max_steps", "400", "--dataloader_num_workers", "2")],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while logged_steps(output) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "no step 2"
            time.sleep(0.05)
        workers = children(process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # forked in worker order: ascending pids
        code = process.wait(timeout=60)
        wait_gone(workers, timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    text = (tmp_path / "run.log").read_text()
    assert code == 1, text[-4000:]
    match = re.search(r"DataWorkerError: DataLoader worker 1 of process 0 failed; it was on record (\S+) \(epoch \d+, "
                      r"record \d+, batch (\d+)\)\. \(DataLoader worker \(pid\(?s?\)? (\d+)\)", text)
    assert match, text[-4000:]
    assert Path(match.group(1)).parent == data and int(match.group(2)) % 2 == 1  # worker 1 makes the odd batches
    assert int(match.group(3)) == workers[1]
    assert "pretrain.py: process 0 exits with code 1 (DataWorkerError)" in text


# ---------------------------------------------------------------------------------------------------------------------
# the pieces, in process


def test_guard__a_signal_arriving_twice_at_once_is_one_request_and_repeated_sigterm_never_abandons(monkeypatch):
    from modeling_ijepa.training import preemption

    with preemption.PreemptionGuard([]) as guard:
        os.kill(os.getpid(), signal.SIGINT)  # from the terminal ...
        os.kill(os.getpid(), signal.SIGINT)  # ... and forwarded by the launcher, within SAME_EVENT_SECONDS
        time.sleep(0.05)
    assert guard.received == signal.SIGINT  # still here: no second Ctrl-C was counted
    monkeypatch.setattr(preemption, "SAME_EVENT_SECONDS", 0.0)
    with preemption.PreemptionGuard([]) as guard:
        for _ in range(3):  # a scheduler repeating SIGTERM, a launcher forwarding it: the save goes on
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    assert guard.received == signal.SIGTERM


def test_guard__a_second_ctrl_c_in_one_process_raises_keyboard_interrupt(monkeypatch):
    """One process unwinds on the second Ctrl-C (its workers are stopped, a notebook keeps its kernel); several
    processes exit in the handler with 130 (tested end to end above)."""
    from modeling_ijepa.training import preemption

    monkeypatch.setattr(preemption, "SAME_EVENT_SECONDS", 0.0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(KeyboardInterrupt):
        with preemption.PreemptionGuard([]):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)


def test_worker_signals__a_worker_ignores_every_stop_signal(tmp_path):
    import multiprocessing

    from modeling_ijepa.training.workers import WorkerSignals

    def worker(init, ready):
        init(0)
        ready.set()
        time.sleep(60)

    context = multiprocessing.get_context("fork")
    ready = context.Event()
    process = context.Process(target=worker, args=(WorkerSignals([signal.SIGUSR1]), ready), daemon=True)
    process.start()
    try:
        assert ready.wait(30)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.kill(process.pid, signum)
        time.sleep(0.5)
        assert process.is_alive()
    finally:
        process.kill()
        process.join(10)
