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
    (["--dataloader_num_workers", "-2"], "--dataloader_num_workers -2: must be >= 0"),
    (["--save_on_signal", "SIGFOO"], "--save_on_signal SIGFOO: SIGFOO is not a signal of this system"),
    (["--preemption_check_steps", "0"], "--preemption_check_steps 0: must be a positive number"),
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
