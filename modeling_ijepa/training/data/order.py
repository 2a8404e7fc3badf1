"""In what order records are read, and by whom: each record is read once per epoch, by the one DataLoader worker that
uses it.

* Map-style data (a downloaded `datasets.Dataset`, a local image folder, local parquet/arrow without `--streaming`):
  the official sampler. Every epoch is `torch.utils.data.DistributedSampler(shuffle=True, seed=seed)` after
  `set_epoch(epoch)` (a permutation of all records seeded with `seed + epoch`, padded to a multiple of the world size,
  process `rank` takes `[rank::world_size]`), cut into batches with the official `drop_last=True`. A worker fetches
  only the rows of its batch (`dataset[indices]`), so a resume starts at its batch without reading the skipped ones.
* Streams (Hub or `--streaming` parquet/webdataset): the dataset's shards (parquet row groups after
  `IterableDataset.reshard()`, else files) are permuted every epoch with a seed common to all processes and dealt to
  the `processes x workers` readers; each reader reads its shards `SHARDS_PER_BUFFER` at a time, one record from each
  in turn, through a shuffle buffer that is emptied at the end of each group. A reader's position is (epoch, group,
  record), so a resume replays at most one group, undecoded.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ...masking_ijepa import derive_seed

logger = logging.getLogger(__name__)

# Tags that keep the seeds of different random choices apart.
SHARD_ORDER_TAG, BUFFER_TAG, REFILL_TAG, CROP_TAG = 1, 2, 3, 4
# Shards a stream reader interleaves into its shuffle buffer: a batch mixes records of up to this many shards (files or
# parquet row groups). Memory: this many open shards of `READ_BATCH_SIZE` undecoded records each, plus the buffer.
SHARDS_PER_BUFFER = 16
# Rows read from a shard per call (arrow batches of the image column only, undecoded).
READ_BATCH_SIZE = 32


def distributed_sampler_order(num_records: int, rank: int, world_size: int, seed: int, epoch: int) -> list[int]:
    """The indices `torch.utils.data.DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed,
    drop_last=False)` yields after `set_epoch(epoch)` (the official `src/datasets/imagenet1k.py` sampler, seed 0):
    `randperm(num_records)` from a generator seeded with `seed + epoch`, padded with its own first indices to a
    multiple of `world_size`, every `world_size`-th index from `rank`."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    # Through numpy: the sampler runs in the training process, where tensor `.tolist()` is kept for device reads.
    indices = torch.randperm(num_records, generator=generator).numpy().tolist()
    total = math.ceil(num_records / world_size) * world_size
    padding = total - num_records
    indices += (indices * math.ceil(padding / max(1, num_records)))[:padding]
    return indices[rank:total:world_size]


@dataclass
class IndexedRecords:
    """Map-style records of one process: its epoch order (`distributed_sampler_order`) and random access to rows.
    `records_read` counts the rows this copy fetched (in a DataLoader worker: that worker's reads)."""

    dataset: Any  # datasets.Dataset, undecoded image column
    rank: int
    world_size: int
    seed: int
    records_read: int = 0

    def epoch_order(self, epoch: int) -> list[int]:
        return distributed_sampler_order(len(self.dataset), self.rank, self.world_size, self.seed, epoch)

    def fetch(self, indices: list[int], column: str) -> list[Any]:
        """The values of `column` at `indices` (one arrow `take`: only these rows are read)."""
        self.records_read += len(indices)
        return self.dataset[indices][column]


@dataclass
class ReaderPlan:
    """What one stream reader reads in one epoch: groups of shard indices read together, and of the interleaved
    records of each group every `stride`-th from `offset` (stride 1 unless there are fewer shards than readers)."""

    groups: list[list[int]]
    stride: int = 1
    offset: int = 0


@dataclass
class ShardedRecords:
    """A stream's shards and how the `processes x workers` readers share them (see the module docstring).
    `records_read` counts the records this copy pulled from its shards."""

    dataset: Any  # datasets.IterableDataset, unshuffled, undecoded image column
    rank: int
    world_size: int
    seed: int
    buffer_size: int
    shards_per_buffer: int = SHARDS_PER_BUFFER
    records_read: int = 0
    warned: set = field(default_factory=set)

    @property
    def num_shards(self) -> int:
        return self.dataset.num_shards

    def plan(self, epoch: int, worker: int, workers: int) -> ReaderPlan:
        """Reader `rank * workers + worker` of `world_size * workers`: every reader-th shard of this epoch's
        permutation (the same permutation on every process), in groups of `shards_per_buffer`."""
        readers, reader = self.world_size * workers, self.rank * workers + worker
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, SHARD_ORDER_TAG))
        order = torch.randperm(self.num_shards, generator=generator).tolist()
        if self.num_shards >= readers:
            mine = order[reader::readers]
            size = self.shards_per_buffer
            return ReaderPlan([mine[i:i + size] for i in range(0, len(mine), size)])
        if readers not in self.warned:
            self.warned.add(readers)
            logger.warning(
                "The dataset has %d shard(s) for %d readers (%d processes x %d DataLoader workers): every reader reads "
                "all of them and keeps 1 record in %d. For large datasets use at least as many files (or parquet row "
                "groups) as readers.", self.num_shards, readers, self.world_size, workers, readers,
            )
        size = self.shards_per_buffer
        return ReaderPlan([order[i:i + size] for i in range(0, len(order), size)], stride=readers, offset=reader)

    def shard_values(self, shard: int, column: str) -> Iterator[Any]:
        source = self.dataset if self.num_shards == 1 else self.dataset.shard(self.num_shards, shard, contiguous=True)
        # `.iter()`, not `iter()`: datasets would otherwise split the shard again over DataLoader workers.
        for rows in source.iter(batch_size=READ_BATCH_SIZE):
            yield from rows[column]

    def interleaved(self, shards: list[int], column: str) -> Iterator[Any]:
        """One record of each open shard in turn until all are exhausted."""
        open_shards = [self.shard_values(shard, column) for shard in shards]
        while open_shards:
            for values in list(open_shards):
                value = next(values, _END)
                if value is _END:
                    open_shards.remove(values)
                    continue
                self.records_read += 1
                yield value

    def group_records(self, plan: ReaderPlan, group: int, column: str, shuffle_seed: int) -> Iterator[Any]:
        """The group's records, interleaved, strided, then shuffled by a buffer of `buffer_size` records
        (`random.Random(shuffle_seed)`) that is emptied at the end of the group."""
        rng, buffer = random.Random(shuffle_seed), []
        for index, value in enumerate(self.interleaved(plan.groups[group], column)):
            if index % plan.stride != plan.offset:
                continue
            if len(buffer) < self.buffer_size:
                buffer.append(value)
                continue
            slot = rng.randrange(self.buffer_size)
            yield buffer[slot]
            buffer[slot] = value
        rng.shuffle(buffer)
        yield from buffer


_END = object()


def shard_for_process(dataset, rank: int, world_size: int, seed: int, buffer_size: int,
                      readers_per_process: int = 1) -> IndexedRecords | ShardedRecords:
    """This process's records and their order: `IndexedRecords` for a map-style `datasets.Dataset` (the official
    sampler), `ShardedRecords` for a `datasets.IterableDataset`. A stream with fewer shards than `SHARDS_PER_BUFFER`
    per reader is split into parquet row groups (`IterableDataset.reshard()`) when its format allows it."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return IndexedRecords(dataset, rank, world_size, seed)
    readers = world_size * max(1, readers_per_process)
    if dataset.num_shards < readers * SHARDS_PER_BUFFER:
        resharded = dataset.reshard()
        if resharded.num_shards > dataset.num_shards:
            logger.info("Stream resharded from %d files to %d row groups.", dataset.num_shards, resharded.num_shards)
            dataset = resharded
    return ShardedRecords(dataset, rank, world_size, seed, max(1, int(buffer_size)))
