"""The `shuffle` benchmark: how well the data path mixes a class-sorted dataset, and how many records it pulls from
storage per epoch.

The dataset is ImageNet-shaped and laid out as a local image folder is (class after class): `classes x per_class`
rows with a `label` column and, for the streamed copy, a `file` column naming the parquet file a row is stored in.
Only these small columns are read, through the data path's own order code (`order.py`, `batches.py`: the
`EpochBatchSampler` + `IndexedRecords.fetch` a map-style worker runs, the `StreamBatchDataset.epoch_chunks` a stream
reader runs), for every process and DataLoader worker of a simulated launch; images are not decoded, which changes
no order. Reported: distinct classes (map-style) and distinct files (streams) per batch, and records pulled per
epoch / records in the epoch (1.0: each record read once; the data path before issue 19 read W times).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

# ImageNet-1k: 1,000 classes; 128 rows per class keeps the benchmark at 128,000 rows (ImageNet has ~1,281 per class).
CLASSES, PER_CLASS = 1000, 128


def class_sorted_table(classes: int = CLASSES, per_class: int = PER_CLASS, files: int = 16):
    """`datasets.Dataset` with `label` (class after class) and `file` (which of `files` contiguous files holds it)."""
    import datasets

    rows = classes * per_class
    labels = [row // per_class for row in range(rows)]
    return datasets.Dataset.from_dict({"label": labels, "file": [row * files // rows for row in range(rows)]})


def write_parquet_files(table, root: Path, files: int = 16, row_group_rows: int = 1000) -> str:
    """`files` parquet files of consecutive rows, row groups of `row_group_rows`; returns their glob."""
    root.mkdir(parents=True, exist_ok=True)
    size = len(table) // files
    for index in range(files):
        part = table.select(range(index * size, (index + 1) * size))
        part.to_parquet(str(root / f"train-{index:05d}-of-{files:05d}.parquet"), batch_size=row_group_rows)
    return str(root / "*.parquet")


def map_epoch(table, column: str, batch_size: int, world_size: int, workers: int) -> tuple[list[list], int]:
    """Epoch 0 of a map-style dataset on `world_size` processes: the batches (values of `column`) and the records
    fetched, each ticket fetched by the worker it goes to (`MapBatchDataset.__getitem__`, without the decode)."""
    from ..training.data import DataState, EpochBatchSampler, shard_for_process

    batches, reads = [], 0
    for rank in range(world_size):
        records = shard_for_process(table.select_columns([column]), rank, world_size, seed=0, buffer_size=1)
        per_worker = [shard_for_process(table.select_columns([column]), rank, world_size, 0, 1) for _ in range(workers)]
        for ticket in EpochBatchSampler(records, batch_size, DataState()):
            if ticket.epoch > 0:
                break
            batches.append(per_worker[ticket.index % workers].fetch(list(ticket.indices), column))
        reads += sum(copy.records_read for copy in per_worker)
    return batches, reads


def stream_epoch(dataset, column: str, batch_size: int, world_size: int, workers: int,
                 buffer_size: int) -> tuple[list[list], int]:
    """Epoch 0 of a stream on `world_size` processes x `workers` readers: the batches (values of `column`) and the
    records pulled from the shards by all readers (`StreamBatchDataset.epoch_chunks`, without the decode)."""
    from ..training.data import AugmentationSettings, BatchMaker, DataState, ReaderPosition, StreamBatchDataset
    from ..training.data import shard_for_process

    batches, reads = [], 0
    for rank in range(world_size):
        for worker in range(workers):
            records = shard_for_process(dataset.select_columns([column]), rank, world_size, 0, buffer_size, workers)
            maker = BatchMaker(AugmentationSettings(crop_size=(8, 8)), seed=0, rank=rank, collator=None)
            reader = StreamBatchDataset(records, column, batch_size, maker, DataState())
            for chunk, _ in reader.epoch_chunks(ReaderPosition(), worker, workers):
                batches.append([value for _, _, value in chunk])
            reads += records.records_read
    return batches, reads


def distinct_per_batch(batches: list[list]) -> dict:
    counts = [len(set(batch)) for batch in batches]
    return {"mean": statistics.mean(counts), "min": min(counts), "max": max(counts), "batches": len(counts)}


def shuffle_benchmark(classes: int = CLASSES, per_class: int = PER_CLASS, batch_size: int = 128, files: int = 16,
                      world_size: int = 2, workers: int = 4, buffer_size: int = 10_000,
                      row_group_rows: int = 1000) -> dict:
    """Shuffle quality and reads per epoch of both paths (see the module docstring)."""
    import datasets

    table = class_sorted_table(classes, per_class, files)
    map_classes, map_reads = map_epoch(table, "label", batch_size, world_size, workers)
    with tempfile.TemporaryDirectory() as tmp:
        glob = write_parquet_files(table, Path(tmp), files, row_group_rows)
        stream = datasets.load_dataset("parquet", data_files=glob, split="train", streaming=True)
        stream_files, stream_reads = stream_epoch(stream, "file", batch_size, world_size, workers, buffer_size)
        stream_classes, _ = stream_epoch(stream, "label", batch_size, world_size, workers, buffer_size)
    return {
        "kind": "shuffle", "records": len(table), "classes": classes, "files": files, "batch_size": batch_size,
        "processes": world_size, "workers": workers, "buffer_size": buffer_size,
        "map_classes_per_batch": distinct_per_batch(map_classes),
        "map_reads_per_record": map_reads / len(table),
        "stream_files_per_batch": distinct_per_batch(stream_files),
        "stream_classes_per_batch": distinct_per_batch(stream_classes),
        "stream_reads_per_record": stream_reads / len(table),
    }


def format_shuffle_table(result: dict) -> str:
    lines = [f"class-sorted dataset: {result['classes']} classes, {result['records']} records, {result['files']} "
             f"parquet files; {result['processes']} processes x {result['workers']} DataLoader workers, batch "
             f"{result['batch_size']}, shuffle buffer {result['buffer_size']}", "",
             "| path | distinct per batch (mean / min / max) | records read per epoch / records |",
             "|---|---|---|"]
    for name, key, reads in (("map-style: classes", "map_classes_per_batch", "map_reads_per_record"),
                             ("stream: files", "stream_files_per_batch", "stream_reads_per_record"),
                             ("stream: classes", "stream_classes_per_batch", "stream_reads_per_record")):
        stats = result[key]
        lines.append(f"| {name} | {stats['mean']:.1f} / {stats['min']} / {stats['max']} | {result[reads]:.3f} |")
    return "\n".join(lines)
