"""How batches are made where the DataLoader runs them (its workers): the records of a batch in their order
(`order.py`), decoded, cropped, stacked to uint8 and given their masks, with the data position after the batch.

Seeds: the crop of a record is seeded by `(seed, rank, epoch, position of the record in its epoch order)` (streams:
also the reader), the masks of a batch by `(seed, rank, batch index of the run)`; neither depends on which worker
made the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ...masking_ijepa import IJepaMaskCollator, derive_seed, sample_masks
from .decode import DECODE_ERRORS, AugmentationSettings, RecordAugmenter, decode_image, record_name
from .order import BUFFER_TAG, REFILL_TAG, IndexedRecords, ShardedRecords


def batch_fingerprint(pixels: torch.Tensor, context_mask, target_mask) -> str:
    """Hash of a batch's uint8 pixels `(B, 3, H, W)` and masks (to check that two runs saw the same batches)."""
    digest = hashlib.sha256(pixels.cpu().contiguous().numpy().tobytes())
    for mask in [*context_mask, *target_mask]:
        digest.update(mask.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ReaderPosition:
    """Where one stream reader is in its epoch: records of the epoch consumed into batches, the group of shards
    holding the last of them and the epoch index of that group's first record (a resume replays from there)."""

    epoch: int = 0
    position: int = 0
    group: int = 0
    group_start: int = 0


@dataclass
class DataState:
    """Position of one process in its data; saved with each checkpoint (one file per process).

    It counts only batches the training loop took (`next()` returned them), never batches that workers prefetched.
    """

    epoch: int = 0  # map-style: epoch of the last batch taken; streams: the lowest epoch of the readers
    position: int = 0  # map-style: records of that epoch's order consumed into batches (corrupt ones included)
    corrupt_images: int = 0  # corrupt records skipped so far, all epochs, this process
    batches: int = 0  # micro-batches consumed so far; also the mask collator's batch counter (the same number)
    # Streams: the position of each reader (one per DataLoader worker; reader r makes the batches n with n % W == r).
    readers: list[dict] = field(default_factory=list)


def data_state_from_dict(saved: dict) -> DataState:
    """The `DataState` of a checkpoint's process file, or a clear error for one written by an older data path."""
    unknown = sorted(set(saved) - set(DataState.__dataclass_fields__))
    if unknown:
        raise ValueError(
            f"The checkpoint's data position has fields {unknown} of an older data path (per-shard shuffle); it cannot "
            "be continued exactly. Pass --ignore_data_skip to resume the weights with a fresh data order."
        )
    return DataState(**saved)


@dataclass
class BatchInfo:
    """What a worker reports with each batch: its index in the run, the data position after it and the corrupt
    records it skipped (map-style: `epoch`/`position`; streams: `reader`/`reader_position`)."""

    index: int
    corrupt: list[str]
    fingerprint: str | None = None
    epoch: int = 0
    position: int = 0
    reader: int | None = None
    reader_position: ReaderPosition | None = None


class BatchIndexedMaskCollator(IJepaMaskCollator):
    """`IJepaMaskCollator` whose masks depend on `(seed, rank, batch index)` only, not on which DataLoader worker
    sampled them, so the masks of batch k are those the training process itself would draw for its k-th batch.
    Its batch counter is the `DataState.batches` it is bound to (`bind`), not a second number."""

    _state: DataState | None = None

    def bind(self, state: DataState) -> None:
        self._state = state

    @property
    def num_batches(self) -> int:
        return self._state.batches if self._state is not None else self.__dict__.get("_unbound_batches", 0)

    @num_batches.setter
    def num_batches(self, value: int) -> None:
        if self._state is not None:
            self._state.batches = int(value)
        else:
            self.__dict__["_unbound_batches"] = int(value)

    def generator_for_batch(self, batch_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.rank, -1, batch_index))

    def masks_for_batch(self, batch_index: int, batch_size: int) -> dict:
        """`context_mask`, `target_mask` (and `allow_overlap` when the official relax step fired) of one batch."""
        context_mask, target_mask, stats = sample_masks(
            self.settings, batch_size * self.num_mask_sets, self.generator_for_batch(batch_index)
        )
        masks = {"context_mask": context_mask, "target_mask": target_mask}
        if stats.get("relaxed_samples", 0) and not self.settings.allow_overlap:
            masks["allow_overlap"] = True
        return masks


# Bytes per worker in the shared "which record am I decoding" board (read by the training process if a worker dies).
_BOARD_SLOT = 512


class BatchMaker:
    """Decodes, crops and stacks the records of one batch into uint8 `(B, 3, H, W)` and adds its masks. A corrupt
    record is counted and its slot refilled with another crop of a decodable record of the same batch, so batches
    keep their size and their records."""

    def __init__(self, settings: AugmentationSettings, seed: int, rank: int, collator: BatchIndexedMaskCollator | None,
                 fingerprints: bool = False, board=None, draft: bool = False):
        self.settings, self.seed, self.rank, self.collator = settings, seed, rank, collator
        self.fingerprints, self.board = fingerprints, board
        self.draft_size = tuple(settings.crop_size[::-1]) if draft else None
        self.augmenter = RecordAugmenter(settings)
        # JPEGs decoded and cropped as tensors (same pixels to within one level, faster); False: the PIL path.
        self.tensor_decode = True

    def announce(self, worker_id: int, text: str) -> None:
        if self.board is not None:
            data = text.encode("utf-8", "replace")[: _BOARD_SLOT - 1].ljust(_BOARD_SLOT, b"\0")
            self.board[worker_id * _BOARD_SLOT:(worker_id + 1) * _BOARD_SLOT] = data

    def decode(self, value):
        return decode_image(value, self.draft_size, self.tensor_decode)

    def make_batch(self, batch_index: int, records: list[tuple[int, int, Any]], worker_id: int,
                   seed_prefix: tuple[int, ...] = ()) -> tuple[dict, list[str], str | None]:
        """`records`: `(epoch, position in the epoch order, undecoded value)`; returns the batch, the messages of its
        corrupt records and its fingerprint (when asked for)."""
        import numpy as np

        arrays, good, corrupt = [], [], []
        for epoch, index, value in records:
            self.announce(worker_id, f"{record_name(value)} (epoch {epoch}, record {index}, batch {batch_index})")
            try:
                image = self.decode(value)
            except DECODE_ERRORS as err:
                corrupt.append(f"{record_name(value)} (epoch {epoch}, record {index}, process {self.rank}): "
                               f"{type(err).__name__}: {err}")
                continue
            arrays.append(self.augmenter(image, derive_seed(self.seed, self.rank, *seed_prefix, epoch, index)))
            good.append((epoch, index, value))
        if not good:
            raise ValueError(f"Every record of batch {batch_index} is undecodable: {corrupt}")
        for slot in range(len(corrupt)):  # refill: another crop of a decodable record of this batch
            epoch, index, value = good[slot % len(good)]
            seed = derive_seed(self.seed, self.rank, *seed_prefix, epoch, index, REFILL_TAG, slot)
            arrays.append(self.augmenter(self.decode(value), seed))
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) view of (B, H, W, 3)
        batch = {"pixel_values": pixels}
        if self.collator is not None:
            batch.update(self.collator.masks_for_batch(batch_index, len(arrays)))
        fingerprint = None
        if self.fingerprints and self.collator is not None:
            fingerprint = batch_fingerprint(pixels, batch["context_mask"], batch["target_mask"])
        return batch, corrupt, fingerprint


def _worker() -> tuple[int, int]:
    """(worker id, workers) where this runs; (0, 1) in the training process."""
    worker = torch.utils.data.get_worker_info()
    return (worker.id, worker.num_workers) if worker is not None else (0, 1)


@dataclass(frozen=True)
class BatchTicket:
    """Batch `index` of the run: records `order[start:start + len(indices)]` of `epoch` (dataset rows `indices`)."""

    index: int
    epoch: int
    start: int
    indices: tuple[int, ...]


class EpochBatchSampler(torch.utils.data.Sampler):
    """The official order of a map-style dataset as batch tickets, from a saved position on (the batches before it
    are skipped without reading a record). Endless: epoch after epoch, each `drop_last=True`."""

    def __init__(self, records: IndexedRecords, batch_size: int, start: DataState):
        self.records, self.batch_size = records, batch_size
        self.start = (start.epoch, start.position, start.batches)

    def __iter__(self) -> Iterator[BatchTicket]:
        epoch, position, index = self.start
        while True:
            order = self.records.epoch_order(epoch)
            if len(order) < self.batch_size:
                raise ValueError(
                    f"Process {self.records.rank} has {len(order)} images per epoch, fewer than the batch "
                    f"({self.batch_size}): lower --per_device_train_batch_size or use more data."
                )
            for first in range(position, len(order) - self.batch_size + 1, self.batch_size):
                yield BatchTicket(index, epoch, first, tuple(order[first:first + self.batch_size]))
                index += 1
            epoch, position = epoch + 1, 0


class MapBatchDataset(torch.utils.data.Dataset):
    """Map-style batches: `dataset[ticket]` fetches only the ticket's rows and makes the batch (in a worker)."""

    def __init__(self, records: IndexedRecords, image_column: str, maker: BatchMaker):
        self.records, self.image_column, self.maker = records, image_column, maker

    def __getitem__(self, ticket: BatchTicket) -> tuple[dict, BatchInfo]:
        worker_id, _ = _worker()
        values = self.records.fetch(list(ticket.indices), self.image_column)
        records = [(ticket.epoch, ticket.start + i, value) for i, value in enumerate(values)]
        batch, corrupt, fingerprint = self.maker.make_batch(ticket.index, records, worker_id)
        return batch, BatchInfo(ticket.index, corrupt, fingerprint, ticket.epoch, ticket.start + len(values))


class StreamBatchDataset(torch.utils.data.IterableDataset):
    """Stream batches: worker w of W is reader `(start.batches + w) % W` (the DataLoader takes batches from its
    workers in turn, so reader r makes the run's batches n with n % W == r, before and after a resume); it reads only
    its shards (`ShardedRecords.plan`) and makes a batch of each `batch_size` consecutive records of its epoch. An
    epoch's last `< batch_size` records of a reader are dropped (the official `drop_last=True`, per reader)."""

    def __init__(self, records: ShardedRecords, image_column: str, batch_size: int, maker: BatchMaker,
                 start: DataState):
        self.records, self.image_column, self.batch_size, self.maker = records, image_column, batch_size, maker
        self.start = DataState(**asdict(start))

    def __iter__(self) -> Iterator[tuple[dict, BatchInfo]]:
        worker_id, workers = _worker()
        yield from self.reader_batches(worker_id, workers)

    def reader_batches(self, worker_id: int, workers: int) -> Iterator[tuple[dict, BatchInfo]]:
        """The batches worker `worker_id` of `workers` makes (what a DataLoader worker runs)."""
        reader = (self.start.batches + worker_id) % workers
        saved = self.start.readers[reader] if self.start.readers else {}
        position, batch_index = ReaderPosition(**saved), self.start.batches + worker_id
        while True:
            for records, after in self.epoch_chunks(position, reader, workers):
                batch, corrupt, fingerprint = self.maker.make_batch(batch_index, records, worker_id, (reader,))
                yield batch, BatchInfo(batch_index, corrupt, fingerprint, reader=reader, reader_position=after)
                batch_index += workers
            position = ReaderPosition(epoch=position.epoch + 1)

    def epoch_chunks(self, start: ReaderPosition, reader: int, workers: int):
        """`(records, position after them)` of each batch of the reader's epoch `start.epoch`, from `start` on."""
        plan, index, chunk, produced = self.records.plan(start.epoch, reader, workers), start.group_start, [], False
        for group in range(start.group, len(plan.groups)):
            group_start = index
            seed = derive_seed(self.maker.seed, self.maker.rank, reader, start.epoch, group, BUFFER_TAG)
            for value in self.records.group_records(plan, group, self.image_column, seed):
                if index >= start.position:  # a resume replays only the rest of its group, undecoded
                    chunk.append((start.epoch, index, value))
                index += 1
                if len(chunk) == self.batch_size:
                    yield chunk, ReaderPosition(start.epoch, index, group, group_start)
                    chunk, produced = [], True
        if not produced and start.position == 0:
            raise ValueError(
                f"Reader {reader} of process {self.records.rank} found fewer than {self.batch_size} images in its "
                f"shards (epoch {start.epoch}): lower --per_device_train_batch_size or --dataloader_num_workers, or "
                "use more data."
            )
