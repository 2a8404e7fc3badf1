"""In what order records are read: each process's part of the dataset and its per-epoch shuffle."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ...masking_ijepa import derive_seed

logger = logging.getLogger(__name__)



@dataclass
class ProcessShards:
    """One process's part of the dataset (undecoded records) and how it is shuffled: per epoch, a permutation of the
    shards, then within each shard a shuffle buffer of `buffer_size` records. Both are pure functions of `(seed,
    rank, epoch, shard position)`, so a data position is just (epoch, shard position, record offset) and a resume
    starts at its shard, never re-reading finished ones."""

    dataset: Any  # datasets.IterableDataset of this process, unshuffled
    buffer_size: int

    @property
    def num_shards(self) -> int:
        return self.dataset.num_shards

    def shard_order(self, seed: int, rank: int, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(seed, rank, epoch, SHARD_ORDER_TAG))
        return torch.randperm(self.num_shards, generator=generator).tolist()

    def records(self, shard: int, column: str, shuffle_seed: int) -> Iterator[Any]:
        """The undecoded image values of one shard, buffer-shuffled with `random.Random(shuffle_seed)`."""
        source = self.dataset if self.num_shards == 1 else self.dataset.shard(self.num_shards, shard, contiguous=True)
        values = (value for rows in source.iter(batch_size=READ_BATCH_SIZE) for value in rows[column])
        # `.iter()`, not `iter()`: datasets would otherwise split shards over DataLoader workers by itself, and every
        # worker here must see the whole stream (each decodes only its own batches).
        rng, buffer = random.Random(shuffle_seed), []
        for value in values:
            if len(buffer) < self.buffer_size:
                buffer.append(value)
                continue
            slot = rng.randrange(self.buffer_size)
            yield buffer[slot]
            buffer[slot] = value
        rng.shuffle(buffer)
        yield from buffer


# Tags that keep the seeds of different random choices apart.
SHARD_ORDER_TAG, BUFFER_TAG, REFILL_TAG = 1, 2, 3
# Rows read from the dataset per call (arrow batches; only the bytes of the image column).
READ_BATCH_SIZE = 256


def shard_for_process(dataset, rank: int, world_size: int, seed: int, buffer_size: int) -> ProcessShards:
    """This process's part of the dataset, with its shuffle (see `ProcessShards`).

    Iterable datasets with at least `world_size` files get whole files per process (strategy "shards"; with a file
    count that is not a multiple of the world size some processes get one file more, and since training is counted
    in steps, not epochs, each process simply starts its next epoch when its files are done). With fewer files than
    processes every process reads everything and keeps one example in `world_size` (strategy "examples").
    `seed` is unused here (the shuffle is seeded per epoch by the batch dataset); kept for a stable signature.
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    if isinstance(dataset, datasets.Dataset):
        # Map-style (downloaded) data: many virtual shards, so shard-order shuffling mixes well.
        dataset = dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 1024)))
    if world_size > 1:
        strategy = "shards" if dataset.num_shards >= world_size else "examples"
        if strategy == "examples":
            logger.warning(
                "The dataset has %d file(s) for %d processes: every process reads all of them and keeps 1 example in "
                "%d. For large datasets use at least as many files as processes.",
                dataset.num_shards, world_size, world_size,
            )
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size, strategy=strategy)
    return ProcessShards(dataset, max(1, int(buffer_size)))

