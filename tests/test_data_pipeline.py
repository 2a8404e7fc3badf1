"""The DataLoader data path (`modeling_ijepa.training.data`) and the sync-free step (`step.py`, `loop.train`):
the official sampler's order for map-style data, batches independent of the worker count there, stream readers that
read only their own shards, exact resumes that skip what was consumed, each record read once per epoch, the Hub's
ImageNet layouts (parquet, webdataset) streamed from local copies, a clear error when a worker dies, and no
host-device synchronisation between logging steps."""

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

from test_pretrain import e2e_args, make_mixed_image_folder, read_log


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


def image_folder_index(folder: Path):
    """The map-style dataset pretraining reads from a local image folder (`local_image_files`)."""
    return training_data.local_image_files(arguments.DataTrainingArguments(dataset_name=str(folder)))


def stream_of(dataset, workers: int, state=None, batch_size: int = 3, buffer_size: int = 4, crop=(32, 32),
              shards_per_buffer: int | None = None, rank: int = 0, world_size: int = 1, column: str = "image",
              colour: bool = True):
    settings = training_data.AugmentationSettings(crop_size=crop, horizontal_flip=True, color_distortion=colour,
                                                  color_jitter_strength=0.5, gaussian_blur=colour)
    collator = training_data.BatchIndexedMaskCollator(ijepa_config_from_preset("tiny-cpu"), seed=0, rank=rank)
    shards = training_data.shard_for_process(dataset, rank, world_size, 0, buffer_size, workers)
    if shards_per_buffer is not None:
        shards.shards_per_buffer = shards_per_buffer
    return training_data.ImageBatchStream(shards, column, batch_size, settings, 0, rank, num_workers=workers,
                                          state=state, collator=collator, log_batch_fingerprints=True)


def take(stream, count: int) -> list[dict]:
    it = iter(stream)
    batches = [dict(next(it), fingerprint=stream.last_fingerprint) for _ in range(count)]
    it.close()
    return batches


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        for key in ("context_mask", "target_mask"):
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]))
        assert a["fingerprint"] == b["fingerprint"]


def solid_colour_dataset(count: int):
    """A map-style dataset whose record i is a solid PNG of grey level 10 * i: any crop of it is that level, so a
    batch's pixels name the records it holds."""
    import datasets

    images = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (12 + i % 5, 10 + i % 3), (10 * i,) * 3).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image(decode=False)}))


def records_of(batch: dict) -> list[int]:
    return [int(level) // 10 for level in batch["pixel_values"][:, 0, 0, 0]]


@pytest.mark.parametrize("num_records,world_size", [(24, 1), (23, 2), (10, 4), (7, 3)])
def test_map_order__is_torch_distributed_sampler_order(num_records, world_size):
    from torch.utils.data import DistributedSampler

    for rank in range(world_size):
        sampler = DistributedSampler(range(num_records), num_replicas=world_size, rank=rank, shuffle=True, seed=5)
        for epoch in (0, 1, 7):
            sampler.set_epoch(epoch)
            assert training_data.distributed_sampler_order(num_records, rank, world_size, 5, epoch) == list(sampler)


def test_map_style__batches_hold_the_official_sampler_records_and_a_resume_reads_only_what_follows():
    dataset = solid_colour_dataset(22)  # 2 processes: 11 records each, 2 batches of 4 per epoch (3 dropped)
    for rank in range(2):
        reference = stream_of(dataset, 0, batch_size=4, rank=rank, world_size=2, colour=False)  # grey stays grey
        batches = take(reference, 6)  # 3 epochs
        for k, batch in enumerate(batches):
            order = training_data.distributed_sampler_order(22, rank, 2, 0, epoch=k // 2)
            assert records_of(batch) == order[4 * (k % 2):4 * (k % 2) + 4]
        assert reference.shards.records_read == 6 * 4

        it = iter(reference := stream_of(dataset, 0, batch_size=4, rank=rank, world_size=2, colour=False))
        for _ in range(3):
            next(it)
        saved = training_data.DataState(**vars(reference.state))
        it.close()
        assert (saved.epoch, saved.position, saved.batches) == (1, 4, 3)
        resumed = stream_of(dataset, 0, state=training_data.DataState(**vars(saved)), batch_size=4, rank=rank,
                            world_size=2, colour=False)
        following = take(resumed, 3)
        assert_same_batches(following, [dict(b) for b in batches[3:]])
        assert resumed.shards.records_read == 3 * 4  # the batches it made, nothing before the saved position


def test_map_style__batches_and_masks_identical_for_0_1_2_workers(tmp_path):
    dataset = image_folder_index(make_mixed_image_folder(tmp_path / "images", count=12, corrupt=True))
    runs = {workers: take(stream_of(dataset, workers), 7) for workers in (0, 1, 2)}  # 13 records: 4 batches/epoch
    for workers in (1, 2):
        assert all(b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape == (3, 3, 32, 32)
                   for b in runs[workers])
        assert_same_batches(runs[0], runs[workers])


def test_map_style__resume_with_workers_continues_exactly(tmp_path):
    dataset = image_folder_index(make_mixed_image_folder(tmp_path / "images", count=12, corrupt=True))
    uninterrupted = stream_of(dataset, 2)
    reference = take(uninterrupted, 9)
    first = stream_of(dataset, 2)
    take(first, 4)
    assert first.collator.num_batches == first.state.batches == 4  # one counter: the collator reads the state
    resumed = stream_of(dataset, 1, state=training_data.DataState(**vars(first.state)))
    assert_same_batches(take(resumed, 5), reference[4:])
    assert vars(resumed.state) == vars(uninterrupted.state)  # epoch, position, batches, corrupt count
    assert uninterrupted.state.corrupt_images >= 2  # broken.jpg, once per epoch


def test_stream__0_and_1_workers_same_batches_resume_exact_with_2_and_another_count_refused(tmp_path):
    dataset = image_column(make_parquet_shards(tmp_path / "parquet", shards=4, per_shard=10))
    assert_same_batches(take(stream_of(dataset, 0, batch_size=5), 6), take(stream_of(dataset, 1, batch_size=5), 6))
    reference = take(stream_of(dataset, 2, batch_size=5), 12)  # 2 readers of 2 files: 4 batches each per epoch
    first = stream_of(dataset, 2, batch_size=5)
    take(first, 5)
    saved = training_data.DataState(**vars(first.state))
    assert len(saved.readers) == 2 and saved.batches == 5
    resumed = stream_of(dataset, 2, state=training_data.DataState(**vars(saved)), batch_size=5)
    assert_same_batches(take(resumed, 7), reference[5:])
    with pytest.raises(ValueError, match="--dataloader_num_workers 2"):
        take(stream_of(dataset, 1, state=training_data.DataState(**vars(saved)), batch_size=5), 1)


def test_stream__batches_mix_the_files_of_a_group_and_a_resume_replays_only_its_group(tmp_path):
    dataset = image_column(make_parquet_shards(tmp_path / "parquet", shards=4, per_shard=10))
    # Groups of 2 files (20 records each); buffer 1 keeps the interleaved order: files alternate record by record.
    reference = stream_of(dataset, 0, batch_size=5, buffer_size=1, shards_per_buffer=2)
    it = iter(reference)
    for _ in range(5):  # 25 records: the second group is being read
        next(it)
    saved = training_data.DataState(**vars(reference.state))
    following = [next(it)["pixel_values"] for _ in range(3)]  # to the end of the epoch
    it.close()
    assert saved.readers == [{"epoch": 0, "position": 25, "group": 1, "group_start": 20}]
    resumed = stream_of(dataset, 0, state=training_data.DataState(**vars(saved)), batch_size=5, buffer_size=1,
                        shards_per_buffer=2)
    it = iter(resumed)
    for expected in following:
        assert torch.equal(next(it)["pixel_values"], expected)
    assert resumed.shards.records_read == 20  # its group only (replayed undecoded), not the first group
    it.close()


def test_reads__each_record_pulled_once_per_epoch_with_2_processes_and_4_workers(tmp_path):
    """Every record of the epoch is fetched by exactly one worker of one process (map-style: the official padding
    repeats a record only to even out the processes), as pulled from storage by the data path's own readers."""
    from modeling_ijepa.benchmarks import shuffle

    table = shuffle.class_sorted_table(classes=2000, per_class=1, files=16)  # label = record id
    batches, reads = shuffle.map_epoch(table, "label", batch_size=16, world_size=2, workers=4)
    assert reads / len(table) <= 1.05 and reads == sum(len(b) for b in batches)
    assert len(set(sum(batches, []))) == reads  # no record twice (2000 = 2 x 62 x 16 + 16 dropped)
    import datasets

    glob = shuffle.write_parquet_files(table, tmp_path / "parquet", files=16, row_group_rows=25)
    stream = datasets.load_dataset("parquet", data_files=glob, split="train", streaming=True)
    batches, reads = shuffle.stream_epoch(stream, "label", batch_size=16, world_size=2, workers=4, buffer_size=50)
    assert reads == len(table)  # each record pulled once, by one of the 8 readers
    used = sum(batches, [])
    assert len(used) == len(set(used)) and len(used) >= len(table) - 8 * 15  # each reader drops < 16 at its end


@pytest.mark.slow  # 128,000 records through both paths' order code (~15 s on 2 shared cores)
def test_shuffle_quality__class_sorted_records_mix_across_classes_and_files():
    """ImageNet-shaped class-sorted data (as a local image folder lists it): map-style batches of 128 hold about the
    classes of a uniform draw, streamed batches mix records of at least 8 of 16 files."""
    from modeling_ijepa.benchmarks import shuffle

    result = shuffle.shuffle_benchmark(classes=1000, per_class=128, batch_size=128, files=16, world_size=2,
                                       workers=4)
    assert result["map_classes_per_batch"]["mean"] >= 100  # a uniform draw: 1000 (1 - (1 - 1/1000)^128) = 120.3
    assert result["stream_files_per_batch"]["min"] >= 8
    assert result["map_reads_per_record"] <= 1.05 and result["stream_reads_per_record"] <= 1.05


def make_imagenet_layouts(root: Path, shards: int = 3, per_shard: int = 6) -> dict[str, Path]:
    """Small local copies of the two Hub layouts of ImageNet: parquet files with an `image` struct {bytes, path}
    and a `label` (ILSVRC/imagenet-1k), and webdataset tar shards of `.jpg` + `.cls` members (timm/imagenet-1k-wds)."""
    import tarfile

    import datasets

    rng = np.random.default_rng(0)
    layouts = {"parquet": root / "ilsvrc", "webdataset": root / "wds"}
    for folder in layouts.values():
        folder.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=1000)})
    for shard in range(shards):
        rows, name = [], f"train-{shard:05d}-of-{shards:05d}"
        with tarfile.open(layouts["webdataset"] / f"imagenet1k-{name}.tar", "w") as tar:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray((rng.random((30 + i, 40, 3)) * 255).astype("uint8")).save(buffer, format="JPEG")
                key, label = f"n0144{shard}{i:03d}_{i}", (7 * shard + i) % 1000
                rows.append({"image": {"bytes": buffer.getvalue(), "path": f"{key}.JPEG"}, "label": label})
                for suffix, data in (("jpg", buffer.getvalue()), ("cls", str(label).encode())):
                    member = tarfile.TarInfo(f"{key}.{suffix}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
        table = datasets.Dataset.from_list(rows, features=features)
        table.to_parquet(str(layouts["parquet"] / f"{name}.parquet"))
    return layouts


@pytest.mark.parametrize("layout,column", [("parquet", "image"), ("webdataset", "jpg")])
def test_imagenet_hub_layouts__stream_through_the_data_path(tmp_path, layout, column):
    """Both layouts load with `load_train_dataset` (as the Hub ids would, up to the network call), their image
    column is found, and 2 processes x 2 workers stream uint8 batches from their own shards (3 files: 1 reader
    keeps 1 record in 4 of each, so every record is used by exactly one reader)."""
    import datasets

    folder = make_imagenet_layouts(tmp_path)[layout]
    data_args = arguments.DataTrainingArguments(dataset_name=str(folder), streaming=True)
    dataset = training_data.load_training_images(data_args)
    assert isinstance(dataset, datasets.IterableDataset)
    assert training_data.detect_image_column(dataset.features, None) == column
    dataset = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    for rank in range(2):
        stream = stream_of(dataset, 2, batch_size=2, rank=rank, world_size=2, column=column, crop=(16, 16))
        batches = take(stream, 4)
        assert all(b["pixel_values"].shape == (2, 3, 16, 16) and b["pixel_values"].dtype == torch.uint8
                   for b in batches)
        assert stream.state.corrupt_images == 0


@pytest.mark.slow  # two in-process runs with 2 DataLoader workers (~1 min on 2 shared cores)
def test_stream_run__resumed_with_workers_sees_the_batches_and_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    """The loop on a streamed parquet dataset with 2 workers (2 readers): 6 steps with a checkpoint at 3, against a
    resume of that checkpoint to 6 (a kill right after it): same batch fingerprints at steps 3-5 (0-based), same final weights."""
    import shutil

    from safetensors.torch import load_file

    data = make_parquet_shards(tmp_path / "parquet", shards=4, per_shard=10)
    extra = ["--report_to", "none", "--dataloader_num_workers", "2", "--checkpointing_steps", "3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    loop.pretrain(*arguments.parse_arguments(e2e_args(data, full, 6, *extra)))
    killed.mkdir()
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-3")
    loop.pretrain(*arguments.parse_arguments(e2e_args(data, killed, 6, *extra, "--resume_from_checkpoint", "latest")))
    full_log, killed_log = read_log(full), read_log(killed)
    assert [full_log[s]["batch_fingerprint"] for s in (3, 4, 5)] == [killed_log[s]["batch_fingerprint"] for s in (3, 4, 5)]
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_old_data_position__clear_error_naming_ignore_data_skip():
    old = {"epoch": 1, "position": 35, "shard": 3, "shard_start": 30, "corrupt_images": 0, "batches": 7}
    with pytest.raises(ValueError, match="--ignore_data_skip"):
        training_data.data_state_from_dict(old)


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
