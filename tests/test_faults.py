"""Faults beyond kill -9: preemption signals, corrupt or incomplete checkpoints, a full disk, and bad arguments.

The preemption test starts the two ranks of a CPU DDP run directly (RANK/WORLD_SIZE/MASTER_ADDR set per process, as
`srun` starts one task per rank under SLURM), so each rank's exit code is observable; the checkpoint tests use
in-process single-process runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets/huggingface_hub are imported: no network in tests

import pytest
import torch

from modeling_ijepa.training import arguments, checkpoints, loop
from modeling_ijepa.training.checkpoints import CheckpointCorruptError, CheckpointSpaceError
from modeling_ijepa.training.preemption import PREEMPTED_EXIT_CODE
from modeling_ijepa.training.validation import ArgumentError, validate_arguments, validate_world_size

from test_pretrain import REPO, SCRIPTS, e2e_args, free_port, make_mixed_image_folder, read_log

GRACE_SECONDS = 60  # what a scheduler would allow between SIGTERM and SIGKILL (SLURM's KillWait is 30 s by default)


def start_ranks(args: list[str], logs: Path, num_processes: int = 2) -> list[subprocess.Popen]:
    """The ranks of one CPU DDP run as separate processes (no launcher in between), their output in `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    port, ranks = free_port(), []
    for rank in range(num_processes):
        env = dict(
            os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
            ACCELERATE_USE_CPU="1", ACCELERATE_MIXED_PRECISION="no", RANK=str(rank), LOCAL_RANK=str(rank),
            WORLD_SIZE=str(num_processes), LOCAL_WORLD_SIZE=str(num_processes), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        with (logs / f"rank{rank}.log").open("w") as log:
            ranks.append(subprocess.Popen([sys.executable, str(SCRIPTS / "pretrain.py"), *args], env=env, cwd=REPO,
                                          stdout=log, stderr=subprocess.STDOUT))
    return ranks


def wait_all(ranks: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    return [rank.wait(timeout=max(1.0, deadline - time.monotonic())) for rank in ranks]


def run_ranks(args: list[str], logs: Path, timeout: float = 300) -> None:
    codes = wait_all(start_ranks(args, logs), timeout)
    assert codes == [0, 0], f"{codes}\n" + "\n".join(p.read_text()[-3000:] for p in sorted(logs.glob("*.log")))


def run_args(data: Path, output: Path, max_steps: int, *extra: str):
    return arguments.parse_arguments(e2e_args(data, output, max_steps, "--report_to", "none", *extra))


def same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# bad arguments: one line each, before any data or model


BAD_ARGUMENTS = [  # (extra command-line arguments, what the one-line message must say)
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be a positive number of images"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be a positive number"),
    (["--max_steps", "0"], "--max_steps 0: must be a positive number of optimizer steps, or -1"),
    (["--num_train_epochs", "0"], "--num_train_epochs 0.0: must be positive"),
    (["--num_train_samples", "0"], "--num_train_samples 0: must be a positive number of samples"),
    (["--crop_scale", "2", "1"], "--crop_scale 2.0 1.0: must be two numbers MIN MAX with 0 < MIN <= MAX <= 1"),
    (["--crop_scale", "0.5"], "--crop_scale 0.5: must be two numbers MIN MAX"),
    (["--learning_rate", "-0.1"], "--learning_rate -0.1: must be positive"),
    (["--base_learning_rate", "0"], "--base_learning_rate 0.0: must be positive"),
    (["--final_lr=-1e-6"], "--final_lr -1e-06: must be >= 0"),
    (["--ema_momentum_start", "1.5"], "--ema_momentum_start 1.5: must be in [0, 1]"),
    (["--ema_momentum_start", "1.0", "--ema_momentum_end", "0.99"],
     "--ema_momentum_end 0.99: must be >= --ema_momentum_start 1.0"),
    (["--weight_decay", "-0.04"], "--weight_decay -0.04: must be >= 0"),
    (["--warmup_epochs", "5"], "--warmup_epochs 5.0: must be in [0, --num_train_epochs 2]"),
    (["--warmup_steps", "-1"], "--warmup_steps -1: must be >= 0 optimizer steps"),
    (["--ipe_scale", "0.5"], "--ipe_scale 0.5: must be >= 1"),
    (["--adam_beta2", "1.0"], "--adam_beta2 1.0: must be in [0, 1)"),
    (["--logging_steps", "0"], "--logging_steps 0: must be a positive number of optimizer steps"),
    (["--checkpointing_steps", "0"], "--checkpointing_steps 0: must be a positive number of optimizer steps"),
    (["--save_total_limit", "-1"], "--save_total_limit -1: must be a positive number of checkpoints"),
    (["--mixed_precision", "fp32"], "--mixed_precision fp32: must be one of no, fp16, bf16, fp8"),
    (["--report_to", "tensorbord"], "--report_to tensorbord: 'tensorbord' is not a tracker"),
    (["--shuffle_buffer_size", "0"], "--shuffle_buffer_size 0: must be a positive number of records"),
    (["--dataloader_num_workers", "-2"], "--dataloader_num_workers -2: must be >= -1"),
    (["--save_on_signal", "SIGFOO"], "--save_on_signal SIGFOO: SIGFOO is not a signal of this system"),
    (["--save_on_signal", "SIGUSR1,SIGKILL"], "--save_on_signal SIGUSR1,SIGKILL: SIGKILL cannot ask for a save"),
    (["--save_on_signal", "chld"], "--save_on_signal chld: SIGCHLD cannot ask for a save"),
    (["--preemption_check_steps", "0"], "--preemption_check_steps 0: must be a positive number"),
    (["--distributed_timeout_seconds", "0"], "--distributed_timeout_seconds 0: must be a positive number of seconds"),
    (["--checkpoint_verification", "paranoid"], "--checkpoint_verification paranoid: must be one of fast, full"),
    (["--config_overrides", "target_block_scale=(0.3, 0.1)"],
     "--config_overrides target_block_scale=(0.3, 0.1): target_block_scale=(0.3, 0.1) must satisfy 0 < min <= max"),
    (["--config_overrides", "num_target_blocks=0"], "num_target_blocks must be at least 1, got 0"),
    (["--config_overrides", "patch_size=5"], "image_size 32 is not divisible by patch_size 5"),
    (["--config_overrides", "min_keep=64"], "min_keep=64 must be in [0, 64) for a 8x8 patch grid"),
    (["--config_name", "vit-enormous"], "--config_name vit-enormous: --config_name 'vit-enormous' is neither a preset"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS, ids=[" ".join(extra) for extra, _ in BAD_ARGUMENTS])
def test_validate_arguments__names_the_argument_value_and_what_is_allowed(tmp_path, extra, message):
    start = time.perf_counter()
    with pytest.raises(ArgumentError) as caught:
        validate_arguments(*run_args(tmp_path / "no-data-needed", tmp_path / "run", 4, *extra))
    assert len(caught.value.problems) == 1 and "\n" not in caught.value.problems[0]
    assert message in caught.value.problems[0]
    assert time.perf_counter() - start < 5
    assert not (tmp_path / "run").exists()  # nothing was created


def test_validate_arguments__accepts_the_shipped_configs_and_reports_every_problem_at_once(tmp_path):
    for config in sorted((SCRIPTS / "configs").glob("*.yaml")):
        validate_arguments(*arguments.parse_arguments([str(config)]))
    with pytest.raises(ArgumentError) as caught:
        validate_arguments(*run_args(tmp_path, tmp_path / "run", 4, "--logging_steps", "0", "--adam_epsilon", "0"))
    assert [line.split(":")[0] for line in caught.value.problems] == ["--adam_epsilon 0.0", "--logging_steps 0"]


def test_validate_world_size__global_batch_and_resumed_world_size(tmp_path):
    _, data_args, args = run_args(tmp_path, tmp_path / "run", 4, "--max_steps", "-1", "--num_train_samples", "6")
    with pytest.raises(ArgumentError, match=r"--num_train_samples 6: must be >= one global batch of 8"):
        validate_world_size(args, data_args, 4, None)
    validate_world_size(args, data_args, 2, None)
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / checkpoints.TRAINER_STATE_NAME).write_text(json.dumps({"world_size": 2}))
    with pytest.raises(ArgumentError, match=r"written by 2 processes, this launch has 3; relaunch with 2"):
        validate_world_size(args, data_args, 3, tmp_path / "checkpoint-3")


def test_script__bad_arguments_exit_2_with_one_line_each_and_no_traceback(tmp_path):
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "pretrain.py"), *e2e_args(tmp_path / "images", tmp_path / "run", 4),
         "--per_device_train_batch_size", "0", "--crop_scale", "2", "1", "--ema_momentum_start", "1.5"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "pretrain.py: error: --per_device_train_batch_size 0: must be a positive number of images per process",
        "pretrain.py: error: --ema_momentum_start 1.5: must be in [0, 1] (an EMA momentum: 0 copies the context "
        "encoder, 1 freezes the target encoder)",
        "pretrain.py: error: --crop_scale 2.0 1.0: must be two numbers MIN MAX with 0 < MIN <= MAX <= 1 (fractions of "
        "the image area, official 0.3 1.0)",
    ]
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - start < 60  # the interpreter and imports; nothing is built


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint manifest: a corrupt latest checkpoint


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An in-process 4-step run with checkpoints at steps 2 and 4 (each with its manifest)."""
    root = tmp_path_factory.mktemp("faults")
    data = make_mixed_image_folder(root / "images", count=8, corrupt=False)
    loop.pretrain(*run_args(data, root / "run", 4, "--checkpointing_steps", "2"))
    return data, root / "run"


def copy_run(run: Path, destination: Path) -> Path:
    shutil.copytree(run, destination)
    return destination


def test_manifest__lists_every_file_with_size_and_sha256(finished_run):
    _, run = finished_run
    checkpoint = run / "checkpoint-4"
    files = json.loads((checkpoint / checkpoints.MANIFEST_NAME).read_text())["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {checkpoints.MANIFEST_NAME}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", checkpoints.TRAINER_STATE_NAME} <= set(files)
    assert files["model.safetensors"]["size"] == (checkpoint / "model.safetensors").stat().st_size
    assert files["model.safetensors"]["sha256"] == checkpoints.file_sha256(checkpoint / "model.safetensors")
    assert checkpoints.checkpoint_problem(checkpoint, "full") is None


def test_latest__truncated_weights_resume_from_the_previous_checkpoint_and_end_equal(finished_run, tmp_path, caplog):
    data, run = finished_run
    copy = copy_run(run, tmp_path / "run")
    weights = copy / "checkpoint-4" / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)  # as a failing disk or an interrupted copy leaves it
    with caplog.at_level(logging.INFO, logger="modeling_ijepa.training"):
        results = loop.pretrain(*run_args(data, copy, 4, "--checkpointing_steps", "2",
                                          "--resume_from_checkpoint", "latest"))
    assert f"SKIPPING checkpoint-4: {weights} has {size // 2} bytes, the manifest says {size}" in caplog.text
    assert f"Resumed from {copy / 'checkpoint-2'} at step 2" in caplog.text
    assert results["global_step"] == 4
    same_weights(run, copy)  # steps 3-4 replayed exactly
    assert checkpoints.checkpoint_problem(copy / "checkpoint-4") is None  # rewritten whole


def test_resume__deleted_or_altered_weights(finished_run, tmp_path, caplog):
    _, run = finished_run
    copy = copy_run(run, tmp_path / "run")
    (copy / "checkpoint-4" / "model.safetensors").unlink()
    with caplog.at_level(logging.INFO, logger="modeling_ijepa.training"):
        assert checkpoints.resolve_resume_path("latest", str(copy)) == copy / "checkpoint-2"
    assert "SKIPPING checkpoint-4" in caplog.text and "model.safetensors is missing" in caplog.text
    with pytest.raises(CheckpointCorruptError, match=(
        rf"--resume_from_checkpoint {copy / 'checkpoint-4'}: {copy / 'checkpoint-4' / 'model.safetensors'} is missing "
        rf".*; the newest checkpoint that verifies is {copy / 'checkpoint-2'}\.")):
        checkpoints.resolve_resume_path(str(copy / "checkpoint-4"), str(copy))

    state = copy / "checkpoint-2" / "random_states_0.pkl"  # same size, one byte changed: small files are hashed
    content = bytearray(state.read_bytes())
    content[-1] ^= 0xFF
    state.write_bytes(bytes(content))
    with pytest.raises(CheckpointCorruptError, match="does not match its sha256 in the manifest"):
        checkpoints.resolve_resume_path("latest", str(copy))


def test_resume__checkpoint_without_manifest_is_used_with_a_warning(finished_run, tmp_path, caplog):
    _, run = finished_run
    copy = copy_run(run, tmp_path / "run")
    (copy / "checkpoint-4" / checkpoints.MANIFEST_NAME).unlink()  # as written before manifests existed
    with caplog.at_level(logging.WARNING, logger="modeling_ijepa.training"):
        assert checkpoints.resolve_resume_path("latest", str(copy)) == copy / "checkpoint-4"
    assert "has no checkpoint_manifest.json (written before manifests existed): using it unverified" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# a full disk while saving


def test_full_disk__previous_checkpoint_intact_temporary_folder_removed_clear_message(finished_run, tmp_path,
                                                                                      monkeypatch):
    import accelerate.checkpointing

    data, run = finished_run
    copy = copy_run(run, tmp_path / "run")
    original_save = accelerate.checkpointing.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if Path(f).name == "optimizer.bin":  # model.safetensors is already written: the failure is mid-save
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return original_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save_until_the_disk_is_full)
    needed = checkpoints.format_bytes(checkpoints.checkpoint_size(copy / "checkpoint-4"))
    with pytest.raises(CheckpointSpaceError, match=(
        rf"No space left on the device while writing checkpoint-6: a checkpoint of this run takes {needed} "
        rf"\(checkpoint-4\), .* are free .*the previous checkpoint {copy / 'checkpoint-4'} is intact")):
        loop.pretrain(*run_args(data, copy, 6, "--resume_from_checkpoint", "latest"))
    assert not list(copy.glob(".tmp-*"))
    assert [p.name for p in checkpoints.list_checkpoints(copy)] == ["checkpoint-2", "checkpoint-4"]
    assert checkpoints.checkpoint_problem(copy / "checkpoint-4", "full") is None

    monkeypatch.setattr(accelerate.checkpointing, "save", original_save)  # space freed: the resume works
    assert loop.pretrain(*run_args(data, copy, 6, "--resume_from_checkpoint", "latest"))["global_step"] == 6


# ---------------------------------------------------------------------------------------------------------------------
# preemption: SIGTERM to a 2-process run


def wait_for_step(log: Path, step: int, ranks: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= step:
            return
        assert all(rank.poll() is None for rank in ranks), "a rank ended before the signal"
        time.sleep(0.05)
    raise TimeoutError(f"{log} did not reach step {step}")


@pytest.mark.slow
def test_preemption__sigterm_to_one_rank_stops_both_after_one_step_and_the_resume_is_bitwise_exact(tmp_path):
    import re

    data = make_mixed_image_folder(tmp_path / "images", count=12, corrupt=False)
    steps = 30  # ~3 s of steps at ~10 steps/s on 2 idle cores: the signal (after step 3) lands mid-run

    def args(output: Path, *extra: str) -> list[str]:
        return e2e_args(data, output, steps, "--report_to", "none", *extra)

    preempted = tmp_path / "preempted"
    ranks = start_ranks(args(preempted), tmp_path / "logs-preempted")
    wait_for_step(preempted / loop.TRAIN_LOG_NAME, 3, ranks)
    ranks[1].send_signal(signal.SIGTERM)  # only rank 1: the agreement at the step boundary stops rank 0 too
    sent = time.monotonic()
    codes = wait_all(ranks, GRACE_SECONDS)
    assert time.monotonic() - sent < GRACE_SECONDS
    output = (tmp_path / "logs-preempted" / "rank0.log").read_text()
    assert codes == [PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE], output[-3000:]
    assert "Traceback" not in output
    match = re.search(r"Preempted by SIGTERM after step (\d+): saved (\S+)\. Resume with the same command plus "
                      r"--resume_from_checkpoint latest \(exit code 75\)\.", output)
    assert match, output[-3000:]
    step = int(match.group(1))
    assert 3 <= step < steps and "SIGTERM received (by process [1])" in output
    assert Path(match.group(2)) == preempted / f"checkpoint-{step}"
    state = json.loads((preempted / f"checkpoint-{step}" / checkpoints.TRAINER_STATE_NAME).read_text())
    assert state["global_step"] == step and checkpoints.checkpoint_problem(preempted / f"checkpoint-{step}") is None
    assert len(read_log(preempted)) == step

    full = tmp_path / "full"
    resumed_ranks = start_ranks(args(preempted, "--resume_from_checkpoint", "latest"), tmp_path / "logs-resumed")
    run_ranks(args(full), tmp_path / "logs-full")
    assert wait_all(resumed_ranks, 300) == [0, 0]
    same_weights(preempted, full)
    assert read_log(preempted) == read_log(full)  # same losses, schedules and batches at every step
