"""The DataLoader data path (`modeling_ijepa.training.data`) and the sync-free step (`step.py`, `loop.train`):
batches independent of the worker count, resume without re-reading finished shards, a clear error when a worker
dies, and no host-device synchronisation between logging steps."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_ijepa import ijepa_config_from_preset
from modeling_ijepa.training import arguments, loop
from modeling_ijepa.training import data as training_data

from test_pretrain import e2e_args, make_mixed_image_folder


def image_column(folder: Path):
    import datasets

    dataset = datasets.load_dataset(str(folder), split="train", streaming=True)
    return dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))


def make_parquet_shards(root: Path, shards: int = 4, per_shard: int = 10) -> Path:
    """`shards` parquet files of `per_shard` PNG records each (a streamed multi-file dataset)."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard in range(shards):
        images = []
        for _ in range(per_shard):
            buffer = io.BytesIO()
            Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        table = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
        table.to_parquet(str(root / f"train-{shard:05d}-of-{shards:05d}.parquet"))
    return root


def stream_of(dataset, workers: int, state=None, batch_size: int = 3, buffer_size: int = 4, crop=(32, 32)):
    settings = training_data.AugmentationSettings(crop_size=crop, horizontal_flip=True, color_distortion=True,
                                                  color_jitter_strength=0.5, gaussian_blur=True)
    collator = training_data.BatchIndexedMaskCollator(ijepa_config_from_preset("tiny-cpu"), seed=0, rank=0)
    shards = training_data.shard_for_process(dataset, 0, 1, 0, buffer_size)
    return training_data.ImageBatchStream(shards, "image", batch_size, settings, 0, 0, num_workers=workers,
                                          state=state, collator=collator, log_batch_fingerprints=True)


def take(stream, count: int) -> list[dict]:
    it = iter(stream)
    batches = [dict(next(it), fingerprint=stream.last_fingerprint) for _ in range(count)]
    it.close()
    return batches


def test_dataloader__batches_and_masks_identical_for_0_1_2_workers(tmp_path):
    dataset = image_column(make_mixed_image_folder(tmp_path / "images", count=12, corrupt=True))
    runs = {workers: take(stream_of(dataset, workers), 7) for workers in (0, 1, 2)}  # 7 batches: 2 epochs
    for workers in (1, 2):
        for a, b in zip(runs[0], runs[workers]):
            assert a["pixel_values"].dtype == torch.uint8 and a["pixel_values"].shape == (3, 3, 32, 32)
            assert torch.equal(a["pixel_values"], b["pixel_values"])
            for key in ("context_mask", "target_mask"):
                assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]))
            assert a["fingerprint"] == b["fingerprint"]


def test_resume__reads_no_record_of_finished_shards_and_continues_exactly(tmp_path):
    dataset = image_column(make_parquet_shards(tmp_path / "parquet", shards=4, per_shard=10))
    reference = stream_of(dataset, 0, batch_size=5)
    it = iter(reference)
    for _ in range(7):  # 35 records: the 4th shard of the epoch is being read
        next(it)
    saved = training_data.DataState(**vars(reference.state))
    following = [next(it)["pixel_values"] for _ in range(3)]  # to the next epoch
    it.close()
    assert (saved.shard, saved.shard_start, saved.position) == (3, 30, 35)

    resumed = stream_of(dataset, 0, state=training_data.DataState(**vars(saved)), batch_size=5)
    it = iter(resumed)
    assert torch.equal(next(it)["pixel_values"], following[0])
    assert resumed.dataset.records_read == 10  # only the shard it stopped in (replayed undecoded), not shards 0-2
    for expected in following[1:]:
        assert torch.equal(next(it)["pixel_values"], expected)
    it.close()


def test_killed_worker__clear_error_naming_the_record_within_seconds(tmp_path):
    dataset = image_column(make_mixed_image_folder(tmp_path / "images", count=12, corrupt=False))
    stream = stream_of(dataset, 1)
    it = iter(stream)
    next(it)
    (worker,) = stream._iterator._workers
    os.kill(worker.pid, signal.SIGKILL)
    started = time.perf_counter()
    with pytest.raises(training_data.DataWorkerError, match=r"worker 0 .*record .*img\d\d\.(png|jpg) \(epoch"):
        for _ in range(50):  # batches already prefetched are still delivered first
            next(it)
    assert time.perf_counter() - started < 10


def test_step__no_host_sync_between_logging_steps(tmp_path, monkeypatch):
    """An in-process run, 8 steps, logging every 4: `.item()`, `float()`, `bool()`, `.tolist()` and `.cpu()` on
    tensors (each a device sync on a GPU) are called in the training thread only at steps 4 and 8."""
    data = make_mixed_image_folder(tmp_path / "images", count=8, corrupt=False)
    main, current, calls = threading.get_ident(), {"step": None}, []
    original_step = loop.train_step

    def tagged_step(*args, **kwargs):
        current["step"] = 0 if current["step"] is None else current["step"] + 1
        return original_step(*args, **kwargs)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if threading.get_ident() == main and current["step"] is not None:
                calls.append((current["step"], name))
            return original(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(loop, "train_step", tagged_step)
    for name in ("item", "__float__", "__bool__", "tolist", "cpu", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    extra = ["--log_batch_fingerprints", "false", "--report_to", "none", "--logging_steps", "4",
             "--dataloader_num_workers", "1"]
    if "preemption_check_steps" in arguments.PretrainingArguments.__dataclass_fields__:
        extra += ["--preemption_check_steps", "4"]
    loop.pretrain(*arguments.parse_arguments(e2e_args(data, tmp_path / "run", 8, *extra)))
    assert calls, "the patch saw no call at all (logging steps must read the loss)"
    assert {step for step, _ in calls} <= {3, 7}, sorted(set(calls))  # step index 3 = the 4th step, a logging step
