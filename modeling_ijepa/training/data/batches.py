"""How batches are made where the DataLoader runs them (its workers): records in their order, decoded, cropped,
stacked to uint8 and given their masks, with the data position after each batch."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ...masking_ijepa import IJepaMaskCollator, derive_seed
from .decode import DECODE_ERRORS, AugmentationSettings, RecordAugmenter, decode_image, record_name
from .order import BUFFER_TAG, REFILL_TAG, ProcessShards



def batch_fingerprint(pixels: torch.Tensor, context_mask, target_mask) -> str:
    """Hash of a batch's uint8 pixels `(B, 3, H, W)` and masks (to check that two runs saw the same batches)."""
    digest = hashlib.sha256(pixels.cpu().contiguous().numpy().tobytes())
    for mask in [*context_mask, *target_mask]:
        digest.update(mask.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class DataState:
    """Position of one process in its data stream; saved with each checkpoint (one file per process).

    It counts only batches the training loop took (`next()` returned them), never batches that workers prefetched.
    """

    epoch: int = 0
    position: int = 0  # records of this epoch consumed into batches (including skipped corrupt ones)
    shard: int = 0  # position, in this epoch's shard order, of the shard holding the last consumed record
    shard_start: int = 0  # epoch record index of that shard's first record (a resume restarts there)
    corrupt_images: int = 0  # corrupt records skipped so far, all epochs, this process
    batches: int = 0  # micro-batches consumed so far (also the mask collator's batch counter)


@dataclass
class BatchInfo:
    """What a worker reports with each batch: the data position after it and the corrupt records it skipped."""

    state: DataState
    corrupt: list[str]
    fingerprint: str | None = None


class BatchIndexedMaskCollator(IJepaMaskCollator):
    """`IJepaMaskCollator` whose masks depend on `(seed, rank, batch index)` only, not on which DataLoader worker
    sampled them, so the masks of batch k are those the training process itself would draw for its k-th batch."""

    def generator_for_batch(self, batch_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.rank, -1, batch_index))

    def masks_for_batch(self, batch_index: int, batch_size: int) -> dict:
        """`context_mask`, `target_mask` (and `allow_overlap` when the official relax step fired) of one batch."""
        self.num_batches = batch_index
        context_mask, target_mask = self.sample(batch_size)
        masks = {"context_mask": context_mask, "target_mask": target_mask}
        if self.last_stats.get("relaxed_samples", 0) and not self.settings.allow_overlap:
            masks["allow_overlap"] = True
        return masks


# Bytes per worker in the shared "which record am I decoding" board (read by the training process if a worker dies).
_BOARD_SLOT = 512


@dataclass
class _Chunk:
    """`batch_size` consecutive records of an epoch: batch `index` of the run, and the position after it."""

    index: int
    records: list[tuple[int, Any]]
    after: DataState


class ImageBatchDataset(torch.utils.data.IterableDataset):
    """Batches `{"pixel_values": uint8 (B, 3, H, W), "context_mask", "target_mask"}` of one process, with a
    `BatchInfo`, made where this is iterated (a DataLoader worker, or the training process for 0 workers).

    Batch k of the run is records `[k*B, (k+1)*B)` of the epoch's record order (`ProcessShards`); with W workers,
    worker `k % W` makes it, which is the order in which the DataLoader returns batches, so the batches do not depend
    on W. Every worker reads the whole stream (cheap: undecoded bytes) but decodes only its batches. A corrupt record
    is counted and its slot refilled with another crop of a decodable record of the same batch, so batches keep their
    size and their records. An epoch's last `< B` records are dropped (official `drop_last=True`).
    """

    def __init__(self, shards: ProcessShards, image_column: str, batch_size: int, settings: AugmentationSettings,
                 seed: int, rank: int, collator: BatchIndexedMaskCollator, start: DataState,
                 fingerprints: bool = False, board=None, draft: bool = False):
        super().__init__()
        self.shards, self.image_column, self.batch_size = shards, image_column, batch_size
        self.settings, self.seed, self.rank, self.collator = settings, seed, rank, collator
        self.start, self.fingerprints, self.board = DataState(**asdict(start)), fingerprints, board
        self.draft_size = tuple(settings.crop_size[::-1]) if draft else None
        self.augmenter = RecordAugmenter(settings)
        # JPEGs decoded and cropped as tensors (same pixels to within one level, faster); False: the PIL path.
        self.tensor_decode = True
        self.records_read = 0  # records taken from the dataset by this copy (tests check what a resume reads)

    def chunks(self) -> Iterator[_Chunk]:
        state, batch_index = self.start, self.start.batches
        while True:
            order, index, chunk = self.shards.shard_order(self.seed, self.rank, state.epoch), state.shard_start, []
            produced = state.position > 0
            for shard_pos in range(state.shard, len(order)):
                shard_start = index
                seed = derive_seed(self.seed, self.rank, state.epoch, shard_pos, BUFFER_TAG)
                for value in self.shards.records(order[shard_pos], self.image_column, seed):
                    self.records_read += 1
                    if index >= state.position:  # a resume replays only the rest of its shard, undecoded
                        chunk.append((index, value))
                    index += 1
                    if len(chunk) == self.batch_size:
                        after = DataState(state.epoch, index, shard_pos, shard_start, batches=batch_index + 1)
                        yield _Chunk(batch_index, chunk, after)
                        batch_index, chunk, produced = batch_index + 1, [], True
            if not produced:
                raise ValueError(
                    f"Process {self.rank} found fewer than {self.batch_size} images in its part of the dataset "
                    f"(epoch {state.epoch}): lower --per_device_train_batch_size or use more data."
                )
            state, chunk = DataState(epoch=state.epoch + 1), []

    def __iter__(self) -> Iterator[tuple[dict, BatchInfo]]:
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for chunk in self.chunks():
            if chunk.index % workers == worker_id:
                yield self.make_batch(chunk, worker_id)

    def announce(self, worker_id: int, text: str) -> None:
        if self.board is not None:
            data = text.encode("utf-8", "replace")[: _BOARD_SLOT - 1].ljust(_BOARD_SLOT, b"\0")
            self.board[worker_id * _BOARD_SLOT:(worker_id + 1) * _BOARD_SLOT] = data

    def make_batch(self, chunk: _Chunk, worker_id: int) -> tuple[dict, BatchInfo]:
        import numpy as np

        epoch, arrays, good, corrupt = chunk.after.epoch, [], [], []
        for index, value in chunk.records:
            self.announce(worker_id, f"{record_name(value)} (epoch {epoch}, record {index}, batch {chunk.index})")
            try:
                image = decode_image(value, self.draft_size, self.tensor_decode)
            except DECODE_ERRORS as err:
                corrupt.append(f"{record_name(value)} (epoch {epoch}, record {index}, process {self.rank}): "
                               f"{type(err).__name__}: {err}")
                continue
            arrays.append(self.augmenter(image, derive_seed(self.seed, self.rank, epoch, index)))
            good.append((index, value))
        if not good:
            raise ValueError(f"Every record of batch {chunk.index} is undecodable: {corrupt}")
        for slot in range(len(corrupt)):  # refill: another crop of a decodable record of this batch
            index, value = good[slot % len(good)]
            seed = derive_seed(self.seed, self.rank, epoch, index, REFILL_TAG, slot)
            arrays.append(self.augmenter(decode_image(value, self.draft_size, self.tensor_decode), seed))
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) view of (B, H, W, 3)
        batch = {"pixel_values": pixels}
        if self.collator is not None:
            batch.update(self.collator.masks_for_batch(chunk.index, len(arrays)))
        fingerprint = None
        if self.fingerprints and self.collator is not None:
            fingerprint = batch_fingerprint(pixels, batch["context_mask"], batch["target_mask"])
        chunk.after.corrupt_images = len(corrupt)  # a count for this batch; the consumer sums them
        return batch, BatchInfo(chunk.after, corrupt, fingerprint)
