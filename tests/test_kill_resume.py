"""Real kills: a 1-process `scripts/pretrain.py` run killed with SIGKILL, resumed with `--resume_from_checkpoint latest`,
ends bitwise equal (every tensor of model.safetensors) to an uninterrupted run and saw the same batches.

* at a "random" step (drawn from a fixed-seed generator, so the test is reproducible), found by polling
  train_log.jsonl (written at every step with `--logging_steps 1`);
* during a checkpoint write: the run is started through a small wrapper that makes the write of one checkpoint pause
  after accelerate has saved its state into `.tmp-checkpoint-<step>` and before the checkpoint is sealed and renamed
  (polling alone cannot hit a write of a tiny model, which takes milliseconds); the test kills the process when that
  temporary folder appears, so the kill lands inside the write, deterministically;
* both kills happen to one run (killed in the write, resumed, killed at the random step, resumed to the end): every
  launch costs ~20 s of start-up on 2 shared cores, so the two kills share their resumes;
* with `--gradient_accumulation_steps` 1 and 2.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "scripts" / "pretrain.py"
TRAIN_LOG = "train_log.jsonl"
MAX_STEPS = 10
CHECKPOINTING_STEPS = 2
# The "random" kill steps come from generators seeded with this: reproducible, and not chosen by hand.
KILL_SEED = 20240610
TIMEOUT_S = 240

# Run through `python WRAPPER pretrain.py ARGS`: pauses the write of checkpoint-$IJEPA_TEST_PAUSE_AT_STEP after the
# process files are in the temporary folder (the test kills it there), then runs the script as `python pretrain.py`.
WRAPPER = '''
import os, runpy, sys, time
from modeling_ijepa.training import checkpoints

pause_at = int(os.environ["IJEPA_TEST_PAUSE_AT_STEP"])
original = checkpoints.write_process_files

def paused_write(accelerator, tmp, *args, **kwargs):
    error = original(accelerator, tmp, *args, **kwargs)
    if tmp.name == checkpoints.TMP_CHECKPOINT_PREFIX + str(pause_at):
        (tmp.parent / "paused-in-write").write_text(tmp.name)
        time.sleep(600)
    return error

checkpoints.write_process_files = paused_write
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


def make_image_folder(root: Path, count: int = 10) -> Path:
    """Images of several modes and sizes, no corrupt file (tests/test_pretrain.py's helper)."""
    from test_pretrain import make_mixed_image_folder  # tests/ is on sys.path under pytest

    return make_mixed_image_folder(root, count=count, corrupt=False)


def run_args(data_dir: Path, output_dir: Path, accumulation: int, *extra: str) -> list[str]:
    return [
        "--dataset_name", str(data_dir), "--streaming", "true", "--config_name", "tiny-cpu",
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "2", "--max_steps", str(MAX_STEPS),
        "--gradient_accumulation_steps", str(accumulation),
        "--num_train_epochs", "2", "--warmup_epochs", "1", "--learning_rate", "0.001",
        "--logging_steps", "1", "--checkpointing_steps", str(CHECKPOINTING_STEPS), "--shuffle_buffer_size", "8",
        "--log_batch_fingerprints", "true", "--report_to", "none", "--dataloader_num_workers", "0", *extra,
    ]


def environment(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    for name in ("ACCELERATE_USE_CPU", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def run_to_end(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(PRETRAIN), *args], env=environment(), capture_output=True,
                            text=True, timeout=TIMEOUT_S, cwd=REPO)
    assert result.returncode == 0, f"run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / TRAIN_LOG
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return steps


def kill_when(command: list[str], env: dict, ready, what: str) -> None:
    """Start `command`, poll `ready()` every few milliseconds, SIGKILL the process the moment it holds."""
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"the run ended ({process.returncode}) before {what}:\n{process.stdout.read()[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def read_log(output_dir: Path) -> dict[int, dict]:
    """train_log.jsonl keyed by step (the resumed run appends; the last record of a step wins)."""
    records = {}
    for line in (output_dir / TRAIN_LOG).read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def assert_same_end(full: Path, resumed: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:5]}"
    full_log, resumed_log = read_log(full), read_log(resumed)
    assert sorted(resumed_log) == sorted(full_log) == list(range(MAX_STEPS))
    for step in full_log:
        assert resumed_log[step]["batch_fingerprint"] == full_log[step]["batch_fingerprint"], step
        for key in ("lr", "weight_decay", "momentum", "loss"):
            assert resumed_log[step][key] == full_log[step][key], (step, key)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("kill_images"))


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The uninterrupted run per accumulation setting, made on first use."""
    root, runs = tmp_path_factory.mktemp("uninterrupted"), {}

    def get(accumulation: int) -> Path:
        if accumulation not in runs:
            output = root / f"ga{accumulation}"
            run_to_end(run_args(data, output, accumulation))
            runs[accumulation] = output
        return runs[accumulation]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_sigkill_during_a_write_then_at_a_random_step__resume_latest_ends_bitwise_equal(accumulation, data,
                                                                                         uninterrupted, tmp_path):
    """One run killed twice (each launch costs ~20 s of start-up on 2 cores, so both kills share the resumes):
    inside the write of checkpoint-4, then, resumed, at a random later step; the last resume runs to the end."""
    output = tmp_path / "killed"
    args = run_args(data, output, accumulation)

    # 1. SIGKILL inside the write of the second checkpoint.
    pause_at = 2 * CHECKPOINTING_STEPS
    wrapper = tmp_path / "pause_checkpoint_write.py"
    wrapper.write_text(WRAPPER)
    tmp_folder = output / f".tmp-checkpoint-{pause_at}"
    kill_when([sys.executable, str(wrapper), str(PRETRAIN), *args],
              environment(IJEPA_TEST_PAUSE_AT_STEP=str(pause_at)),
              lambda: (output / "paused-in-write").exists(), f"the write of checkpoint-{pause_at}")
    # Killed inside the write: the temporary folder holds accelerate's state but was never sealed or renamed.
    assert tmp_folder.is_dir() and not (output / f"checkpoint-{pause_at}").exists()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == [f"checkpoint-{CHECKPOINTING_STEPS}"]
    (output / "paused-in-write").unlink()

    # 2. Resumed from checkpoint-2, SIGKILL once `kill_after` steps are logged (a step past the half-written one).
    kill_after = random.Random(KILL_SEED + accumulation).randint(pause_at + 1, MAX_STEPS - 1)
    resume = run_args(data, output, accumulation, "--resume_from_checkpoint", "latest")
    kill_when([sys.executable, str(PRETRAIN), *resume], environment(),
              lambda: len(set(logged_steps(output))) >= kill_after, f"step {kill_after} in the log")
    assert not tmp_folder.exists()  # the rewrite of the same step replaced the half-written folder
    assert (output / f"checkpoint-{pause_at}").is_dir()

    # 3. Resumed again, to the end.
    result = run_to_end(resume)
    assert "Resumed from" in result.stdout + result.stderr
    assert_same_end(uninterrupted(accumulation), output)
