"""Resumable checkpoints: atomic writes, listing, and the state a resume needs.

A checkpoint is `output_dir/checkpoint-<step>`: Accelerate's state (model, optimizer, RNGs), one data-position file
per process and `trainer_state.json`, written last into a temporary folder that is then renamed, so a crash mid-write
never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .data import DataState

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
RANK_STATE_NAME = "data_state_rank{rank}.json"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>` folders), oldest first. Temporary folders are not listed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir() and (path / TRAINER_STATE_NAME).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting from scratch.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_NAME).exists():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {TRAINER_STATE_NAME}); pass a "
            f"{CHECKPOINT_PREFIX}<step> folder or 'latest'."
        )
    return path


def save_pretrained_files(accelerator, model, config_dir: Path, image_processor) -> None:
    """`save_pretrained` of the pretraining model plus the image processor config into `config_dir`, written to a
    temporary folder first and moved file by file, so a crash never leaves half-written weights (main process)."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    tmp = config_dir / ".tmp-save-pretrained"
    if tmp.exists():
        shutil.rmtree(tmp)
    unwrapped.save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
    image_processor.save_pretrained(tmp)
    for path in tmp.iterdir():
        os.replace(path, config_dir / path.name)
    tmp.rmdir()


def save_checkpoint(
    accelerator, model, output_dir: Path, step: int, trainer_state: dict, data_state: DataState,
    collator_state: dict, image_processor, save_total_limit: int | None,
) -> Path:
    """`accelerator.save_state` into `.tmp-checkpoint-<step>`, plus our state files, then an atomic rename to
    `checkpoint-<step>`: a crash mid-write leaves only a temporary folder, never a checkpoint that looks complete."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{TMP_CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank_state = {"data": asdict(data_state), "mask_collator": collator_state}
    (tmp / RANK_STATE_NAME.format(rank=accelerator.process_index)).write_text(json.dumps(rank_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Written last: its presence marks the folder complete (list_checkpoints requires it).
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # same step saved again (e.g. a resume with nothing left to do): swap, then delete
            old = output_dir / f".old-{CHECKPOINT_PREFIX}{step}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    save_pretrained_files(accelerator, model, output_dir, image_processor)
    if accelerator.is_main_process and save_total_limit is not None and save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def tensor_checksum(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape and bytes), to check processes agree bitwise."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
