"""Resumable checkpoints: atomic writes, listing, and the state a resume needs.

A checkpoint is `output_dir/checkpoint-<step>`: Accelerate's state (model, optimizer, RNGs), one data-position file
per process and `trainer_state.json`, written last into a temporary folder that is then renamed, so a crash mid-write
never leaves a folder that looks complete.

Each checkpoint also carries `checkpoint_manifest.json`: every file's size and sha256, written last before the rename
(the main process reads the freshly written files once, ~1.3 GB/s on one core). A resume verifies it before loading
(`verify_checkpoint`): sizes always, content hashes of files up to `FAST_HASH_LIMIT` in the default 'fast' mode and of
every file in 'full' mode. `latest` takes the newest checkpoint that verifies and says which ones it skipped; a
checkpoint without a manifest (written before manifests existed) is used unverified, with a warning.
"""

from __future__ import annotations

import errno
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
MANIFEST_NAME = "checkpoint_manifest.json"
# 'fast' verification hashes files up to this size: the trainer, data-position and RNG state (and a small model's
# weights) cost milliseconds, while a ViT-H's weights and optimizer state (~10 GB) are only size-checked.
FAST_HASH_LIMIT = 64 * 2**20
HASH_CHUNK = 8 * 2**20  # streamed: memory stays flat for any file size


class CheckpointCorruptError(RuntimeError):
    """A checkpoint whose files do not match its manifest; the message names the bad file and the newest good one."""


class CheckpointSpaceError(RuntimeError):
    """The disk filled up while writing a checkpoint; the previous checkpoint is intact (the message says how much
    space one needs)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> dict:
    """Write `checkpoint_manifest.json` listing every other file under `folder` with its size and sha256."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": 1, "files": files}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return manifest


def checkpoint_problem(folder: Path, mode: str = "fast") -> str | None:
    """Why `folder` does not match its manifest (None: it verifies, or it has no manifest). `mode` 'fast' hashes
    files up to `FAST_HASH_LIMIT`, 'full' every file; sizes are always compared."""
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.exists():
        return None
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as error:
        return f"{manifest_path} is unreadable ({error})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing (the manifest lists {expected['size']} bytes)"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, the manifest says {expected['size']} (truncated or overwritten)"
        if (mode == "full" or size <= FAST_HASH_LIMIT) and file_sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in the manifest (corrupted content)"
    return None


def checkpoint_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def any_process(accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any (one all-reduce of one number)."""
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


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


def newest_good_checkpoint(output_dir: str | os.PathLike, mode: str = "fast") -> tuple[Path | None, list[str]]:
    """(the newest checkpoint in `output_dir` that verifies, or None; one line per newer one skipped and why)."""
    skipped = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path, mode)
        if problem is None:
            if not (path / MANIFEST_NAME).exists():
                logger.warning("%s has no %s (written before manifests existed): using it unverified.", path,
                               MANIFEST_NAME)
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str, mode: str = "fast") -> Path | None:
    """The checkpoint to resume from (None: a fresh start), verified against its manifest.

    'latest' takes the newest checkpoint that verifies, logging every newer one it skips; an explicit folder that
    fails raises `CheckpointCorruptError` naming the bad file and the newest checkpoint that verifies."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        if not list_checkpoints(output_dir):
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting from scratch.", output_dir)
            return None
        good, skipped = newest_good_checkpoint(output_dir, mode)
        for line in skipped:
            logger.error("--resume_from_checkpoint latest: SKIPPING %s", line)
        if good is None:
            raise CheckpointCorruptError(
                f"--resume_from_checkpoint latest: no checkpoint in {output_dir} verifies ({'; '.join(skipped)}). "
                "Restore one from a copy, or pass --overwrite_output_dir to start again."
            )
        return good
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_NAME).exists():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {TRAINER_STATE_NAME}); pass a "
            f"{CHECKPOINT_PREFIX}<step> folder or 'latest'."
        )
    problem = checkpoint_problem(path, mode)
    if problem is not None:
        good, _ = newest_good_checkpoint(path.parent, mode)
        hint = f"the newest checkpoint that verifies is {good}" if good else f"no checkpoint in {path.parent} verifies"
        raise CheckpointCorruptError(f"--resume_from_checkpoint {path}: {problem}; {hint}.")
    if not (path / MANIFEST_NAME).exists():
        logger.warning("%s has no %s (written before manifests existed): using it unverified.", path, MANIFEST_NAME)
    return path


def resolve_resume_path_once(accelerator, resume_from_checkpoint: str | None, output_dir: str,
                             mode: str = "fast") -> Path | None:
    """`resolve_resume_path` on the main process only (the files are read once), its answer or error sent to all."""
    from accelerate.utils import broadcast_object_list

    answer: list = [None]
    if accelerator.is_main_process:
        try:
            path = resolve_resume_path(resume_from_checkpoint, output_dir, mode)
            answer = [("path", None if path is None else str(path))]
        except (CheckpointCorruptError, FileNotFoundError) as error:
            answer = [(type(error).__name__, str(error))]  # re-raised below on every process
    if accelerator.num_processes > 1:
        broadcast_object_list(answer)
    kind, value = answer[0]
    if kind == "CheckpointCorruptError":
        raise CheckpointCorruptError(value)
    if kind == "FileNotFoundError":
        raise FileNotFoundError(value)
    return None if value is None else Path(value)


SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota: the same advice


def agreed_write_failure(accelerator, error: OSError | None) -> str | None:
    """Tell every process whether any failed to write ('space', 'other' or None): one all-reduce of two numbers, so
    a process whose write failed and those whose write worked leave the save together instead of hanging."""
    flags = [float(error is not None and error.errno in SPACE_ERRNOS),
             float(error is not None and error.errno not in SPACE_ERRNOS)]
    space, other = accelerator.reduce(torch.tensor(flags, device=accelerator.device), reduction="sum").tolist()
    return "space" if space else "other" if other else None


def abandon_write(accelerator, tmp: Path, output_dir: Path, what: str, failure: str, error: OSError | None):
    """Remove the temporary folder of a failed write and raise: `CheckpointSpaceError` with the space one needs for a
    full disk, the process's own error otherwise. Called on every process after `agreed_write_failure`."""
    previous = list_checkpoints(output_dir)
    written = checkpoint_size(tmp) if tmp.exists() else 0
    accelerator.wait_for_everyone()  # every process has measured before the folder goes
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    if failure == "other":
        if error is not None:
            raise error
        raise RuntimeError(f"Writing {what} failed on another process (its error is in its log); {tmp} was removed.")
    needed = (f"a checkpoint of this run takes {format_bytes(checkpoint_size(previous[-1]))} ({previous[-1].name})"
              if previous else f"a checkpoint of this run takes more than the {format_bytes(written)} written")
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    free = shutil.disk_usage(output_dir).free
    raise CheckpointSpaceError(
        f"No space left on the device while writing {what}: {needed}, {format_bytes(free)} are free in {output_dir} "
        f"(with --save_total_limit K, K + 1 checkpoints exist while the newest is written). {tmp} was removed and "
        f"{kept}; free space or pass another --output_dir, then resume with --resume_from_checkpoint latest."
    )


def format_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    return f"{count:.1f} TiB"


def save_pretrained_files(accelerator, model, config_dir: Path, image_processor) -> None:
    """`save_pretrained` of the pretraining model plus the image processor config into `config_dir`, written to a
    temporary folder first and moved file by file, so a crash never leaves half-written weights (main process)."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    tmp, error = config_dir / ".tmp-save-pretrained", None
    if accelerator.is_main_process:
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            unwrapped.save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
            image_processor.save_pretrained(tmp)
            for path in tmp.iterdir():
                os.replace(path, config_dir / path.name)
            tmp.rmdir()
        except OSError as caught:  # agreed below, then re-raised on this process
            error = caught
    failure = agreed_write_failure(accelerator, error)
    if failure is not None:
        abandon_write(accelerator, tmp, config_dir, f"the exported model in {config_dir}", failure, error)


def write_process_files(accelerator, tmp: Path, data_state: DataState, collator_state: dict) -> OSError | None:
    """Accelerate's state and this process's data position into `tmp`; the error of a failed write (not raised:
    the processes first agree that one failed)."""
    try:
        accelerator.save_state(str(tmp))
        rank_state = {"data": asdict(data_state), "mask_collator": collator_state}
        (tmp / RANK_STATE_NAME.format(rank=accelerator.process_index)).write_text(json.dumps(rank_state))
    except OSError as error:
        return error
    return None


def seal_checkpoint(tmp: Path, final: Path, trainer_state: dict) -> None:
    """Main process: `trainer_state.json`, then the manifest of every file, then the atomic rename to `final`."""
    (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2))
    write_manifest(tmp)  # last: it covers every other file
    if final.exists():  # same step saved again (e.g. a resume with nothing left to do): swap, then delete
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def save_checkpoint(
    accelerator, model, output_dir: Path, step: int, trainer_state: dict, data_state: DataState,
    collator_state: dict, image_processor, save_total_limit: int | None, export_model: bool = True,
) -> Path:
    """`accelerator.save_state` into `.tmp-checkpoint-<step>`, plus our state files and the manifest, then an atomic
    rename to `checkpoint-<step>`: a crash mid-write leaves only a temporary folder, never a checkpoint that looks
    complete. A full disk removes the temporary folder and raises `CheckpointSpaceError` (older checkpoints stay).

    `export_model` also writes the model folder (`save_pretrained` + image processor) into `output_dir`: the loop
    asks for it only at the end of a run (also a stopped or preempted one), so an intermediate checkpoint writes the
    weights once (in the Accelerate state), not twice."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{TMP_CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    error = write_process_files(accelerator, tmp, data_state, collator_state)
    failure = agreed_write_failure(accelerator, error)
    if failure is None and accelerator.is_main_process:
        try:
            seal_checkpoint(tmp, final, trainer_state)
        except OSError as caught:
            error = caught
        failure = agreed_write_failure(accelerator, error)
    elif failure is None:
        failure = agreed_write_failure(accelerator, None)
    if failure is not None:
        abandon_write(accelerator, tmp, output_dir, final.name, failure, error)
    if export_model:
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
