"""How batches reach the training loop: the `DataLoader` over the batch dataset, its saved position, clear errors
when a worker dies, and the uint8 -> float normalisation on the training device."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import asdict

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ...masking_ijepa import derive_seed
from .. import workers as worker_lifecycle
from .batches import (
    _BOARD_SLOT, BatchIndexedMaskCollator, BatchInfo, BatchMaker, DataState, EpochBatchSampler, MapBatchDataset,
    ReaderPosition, StreamBatchDataset,
)
from .decode import AugmentationSettings
from .order import IndexedRecords, ShardedRecords

logger = logging.getLogger(__name__)



class DataWorkerError(RuntimeError):
    """A DataLoader worker died or stalled; the message names the record it was on."""


def default_num_workers(local_world_size: int | None = None) -> int:
    """DataLoader workers per process for `--dataloader_num_workers -1`: the CPUs this process may use
    (`sched_getaffinity` / local processes) minus one for the training process itself, at least 1 (see
    docs/performance.md for the measurement behind it)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // max(1, local) - 1)


class ImageBatchStream:
    """The batches of one process: a `torch.utils.data.DataLoader` whose workers read, decode, crop, stack and
    sample masks, started from `state` and advancing it only by the batches taken. Map-style records
    (`IndexedRecords`): an `EpochBatchSampler` hands each worker its batch's row indices (batches do not depend on the
    number of workers). Streams (`ShardedRecords`): each worker is one reader of its own shards (batches depend on
    the number of workers, which the saved position records; a resume with another number is refused).

    Yields `{"pixel_values": uint8 (B, 3, H, W), "context_mask": [...], "target_mask": [...]}` (the forward's
    argument names; `allow_overlap` too when the sampler relaxed). `last_fingerprint` holds the hash of the last
    batch when `log_batch_fingerprints`. A worker that dies raises `DataWorkerError` naming its record.
    """

    def __init__(self, dataset: IndexedRecords | ShardedRecords, image_column: str, batch_size: int, settings: AugmentationSettings,
                 seed: int, rank: int, num_workers: int = 0, state: DataState | None = None,
                 max_logged_corrupt: int = 20, collator: BatchIndexedMaskCollator | None = None,  # None: no masks
                 pin_memory: bool = False, prefetch_factor: int = 2, log_batch_fingerprints: bool = False,
                 timeout: float = 300.0, draft: bool = False, worker_init_fn=None):
        self.shards, self.collator, self.state = dataset, collator, state or DataState()
        if collator is not None:
            collator.bind(self.state)  # one batch counter: the collator's is `state.batches`
        # e.g. `workers.WorkerSignals`: workers ignore the stop signals and die with the training process.
        self.worker_init_fn = worker_init_fn
        self.image_column, self.batch_size = image_column, batch_size
        self.options = dict(settings=settings, seed=seed, rank=rank, collator=collator,
                            fingerprints=log_batch_fingerprints, draft=draft)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.timeout, self.max_logged_corrupt, self.rank = timeout, max_logged_corrupt, rank
        self.last_fingerprint: str | None = None
        self.dataset: MapBatchDataset | StreamBatchDataset | None = None
        self._iterator = self._board = None
        self._worker_pids: list[int] = []  # kept after the iterator closes: a dead worker is named by its pid

    def _loader(self):
        board = multiprocessing.Array("c", _BOARD_SLOT * max(1, self.num_workers), lock=False)
        maker = BatchMaker(board=board, **self.options)
        sampler = None
        if isinstance(self.shards, IndexedRecords):
            self.dataset = MapBatchDataset(self.shards, self.image_column, maker)
            sampler = EpochBatchSampler(self.shards, self.batch_size, self.state)
        else:
            self.check_readers()
            self.dataset = StreamBatchDataset(self.shards, self.image_column, self.batch_size, maker, self.state)
        workers = self.num_workers > 0
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=workers, prefetch_factor=self.prefetch_factor if workers else None,
            timeout=self.timeout if workers else 0, worker_init_fn=self.worker_init_fn if workers else None,
            # Its own generator for the workers' base seed (unused by our per-record seeds): the global RNG is
            # neither consumed nor read.
            generator=torch.Generator().manual_seed(derive_seed(self.options["seed"], self.rank)),
        )
        return loader, board

    def __iter__(self) -> Iterator[dict]:
        """Starts the DataLoader (its workers) now, not at the first `next()`."""
        loader, self._board = self._loader()
        self._iterator = iter(loader)
        self._worker_pids = worker_lifecycle.worker_pids(self._iterator)
        return self._batches(self._iterator, self._board)

    def _batches(self, iterator, board) -> Iterator[dict]:
        try:
            while True:
                try:
                    batch, info = next(iterator)
                except (RuntimeError, EOFError, ConnectionError) as err:
                    # A dead worker surfaces as torch's "DataLoader worker ... exited unexpectedly"/"timed out", or
                    # as the EOF of its result pipe; errors raised by our own code keep their type and message.
                    if self.num_workers == 0 or (isinstance(err, RuntimeError) and "DataLoader" not in str(err)):
                        raise
                    raise self.worker_error(err, board) from err
                self.consume(info)
                yield batch
        finally:
            self._iterator = None
            worker_lifecycle.stop_workers(iterator)

    def check_readers(self) -> None:
        """A stream's saved position holds one reader per DataLoader worker: start them, or refuse another count."""
        readers = max(1, self.num_workers)
        if not self.state.readers:
            self.state.readers = [asdict(ReaderPosition()) for _ in range(readers)]
        elif len(self.state.readers) != readers:
            saved = len(self.state.readers)
            raise ValueError(
                f"The saved data position of process {self.rank} is that of {saved} DataLoader worker(s) (a stream's "
                f"batches depend on the worker count); this run has {self.num_workers}. Pass --dataloader_num_workers "
                f"{saved} to continue exactly, or --ignore_data_skip to continue with a fresh data order."
            )

    def consume(self, info: BatchInfo) -> None:
        """The loop took this batch: advance the saved position, count and report its corrupt records."""
        corrupt = self.state.corrupt_images
        self.state.batches = info.index + 1
        if info.reader_position is not None:
            readers = list(self.state.readers)  # a new list: copies of the state made before keep their positions
            readers[info.reader] = asdict(info.reader_position)
            self.state.readers = readers
            self.state.epoch = min(reader["epoch"] for reader in self.state.readers)
        else:
            self.state.epoch, self.state.position = info.epoch, info.position
        self.state.corrupt_images = corrupt + len(info.corrupt)
        for offset, message in enumerate(info.corrupt):
            if corrupt + offset < self.max_logged_corrupt:
                logger.warning("Skipping undecodable image %s", message)
        self.last_fingerprint = info.fingerprint

    def data_error(self, err: BaseException) -> DataWorkerError | None:
        """The `DataWorkerError` for torch's worker-death error, wherever in the training process it surfaced (torch's
        SIGCHLD handler raises it at whatever line runs); None for any other error."""
        if (self.num_workers == 0 or self._board is None or isinstance(err, DataWorkerError)
                or not worker_lifecycle.is_worker_death(err)):
            return None
        return self.worker_error(err, self._board)

    def worker_error(self, err: BaseException, board) -> DataWorkerError:
        # The pid torch names, mapped to its worker; a stall names no pid: the worker that owed the next batch.
        dead = worker_lifecycle.dead_worker_ids(err, self._worker_pids)
        if not dead and not worker_lifecycle.is_worker_death(err):
            # The pipe broke (EOF, connection reset) before torch noticed the death: the workers that exited.
            try:
                dead = self.exited_workers()
            except RuntimeError as death:  # torch's SIGCHLD handler named the dead worker while we waited
                if not worker_lifecycle.is_worker_death(death):
                    raise
                err, dead = death, worker_lifecycle.dead_worker_ids(death, self._worker_pids)
            else:
                if dead:
                    pids = ", ".join(str(self._worker_pids[w]) for w in dead)
                    err = RuntimeError(f"DataLoader worker (pid(s) {pids}) exited unexpectedly: {err}")
        dead = dead or [self.state.batches % self.num_workers]
        records = [bytes(board[w * _BOARD_SLOT:(w + 1) * _BOARD_SLOT]).rstrip(b"\0").decode("utf-8", "replace")
                   for w in dead]
        named = "; ".join(f"DataLoader worker {w} of process {self.rank} failed; it was on record {r or '<none yet>'}"
                          for w, r in zip(dead, records))
        return DataWorkerError(
            f"{named}. ({err}) If it was killed for memory, lower --dataloader_num_workers or the batch size; if the "
            "record crashes the decoder, remove it."
        )

    def exited_workers(self, wait_seconds: float = 2.0) -> list[int]:
        """Ids of this DataLoader's workers that have exited, waiting up to `wait_seconds` for one to be reaped."""
        import time

        processes = list(getattr(self._iterator, "_workers", []))
        deadline = time.monotonic() + wait_seconds
        while processes:
            dead = [worker for worker, process in enumerate(processes) if not process.is_alive()]
            if dead or time.monotonic() > deadline:
                return dead
            time.sleep(0.05)
        return []

    def close(self) -> None:
        """Kept for callers of the old stream: the DataLoader's workers stop when its iteration is closed."""
        self._iterator = None


class PixelNormalizer:
    """uint8 `(B, 3, H, W)` -> float normalised with ImageNet statistics on the training device (official
    `ToTensor` + `Normalize`, the default of `src/transforms.py::make_transforms`); the constants are made once."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        # (x / 255 - mean) / std == (x - 255 mean) / (255 std): two ops on the batch instead of three.
        self.offset = (255.0 * torch.tensor(IMAGENET_DEFAULT_MEAN, device=self.device)).view(1, 3, 1, 1)
        self.scale = (255.0 * torch.tensor(IMAGENET_DEFAULT_STD, device=self.device)).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # The copy moves uint8 (4x fewer bytes than float); the permute to contiguous NCHW happens on the device.
        pixels = pixels.to(self.device, non_blocking=True).float().contiguous(memory_format=torch.contiguous_format)
        return (pixels - self.offset) / self.scale


def normalize(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One-off `PixelNormalizer(device)(pixels)`; the training loop keeps one normalizer instead."""
    return PixelNormalizer(device)(pixels)
