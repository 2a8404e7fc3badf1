"""The pretraining data path: dataset loading with clear errors, per-process sharding, decoding and augmentation,
and the stream of fixed-size uint8 batches (with its resumable position).

Every process reads its own part of the dataset (`split_dataset_by_node`: whole files when there are at least as
many files as processes), shuffled with a buffer reseeded every epoch. Images are decoded here (not by `datasets`)
so that corrupt records are skipped and counted instead of crashing the run. Crops are seeded per record from
`(seed, rank, epoch, index in epoch)`, so batches do not depend on which process or worker decoded what.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .arguments import DataTrainingArguments

logger = logging.getLogger(__name__)

# Training-set sizes used when the number of samples per epoch cannot be read from the dataset (streaming).
KNOWN_TRAIN_SIZES = {
    # ILSVRC-2012 train split: 1,281,167 images (both the Hub parquet copy and timm's webdataset copy).
    "ilsvrc/imagenet-1k": 1_281_167,
    "imagenet-1k": 1_281_167,
    "timm/imagenet-1k-wds": 1_281_167,
    # ImageNet-21k "fall11" release: 14,197,122 images in total (the official code has no IN-22k loader; check the
    # count of your copy and pass --num_train_samples if it differs).
    "timm/imagenet-22k-wds": 14_197_122,
}


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# What PIL raises for truncated, unidentifiable or otherwise undecodable files: such records are skipped and counted.
DECODE_ERRORS = _decode_errors()


class DatasetAccessError(RuntimeError):
    """The dataset could not be opened; the message says what to do."""


def access_instructions(dataset_name: str) -> str:
    return (
        f"Could not open the dataset {dataset_name!r} on the Hugging Face Hub. If it is gated (ILSVRC/imagenet-1k is):\n"
        f"  1. open https://huggingface.co/datasets/{dataset_name} while logged in and accept its terms of access;\n"
        "  2. log in on this machine: `hf auth login` (or set HF_TOKEN, or pass --token);\n"
        "  3. check the name and that this machine can reach huggingface.co (HF_HUB_OFFLINE must not be set).\n"
        "Alternatives: --dataset_name timm/imagenet-1k-wds (also gated, webdataset copy), or a local copy, e.g. "
        "--dataset_name /data/imagenet/train (a folder of images or parquet files)."
    )


# Hub ids of Fashion-MNIST; when Debian's `dataset-fashion-mnist` is installed the same images are read from it.
FASHION_MNIST_HUB_IDS = ("zalando-datasets/fashion_mnist", "fashion_mnist")


def local_fashion_mnist(data_args: DataTrainingArguments) -> str | None:
    """Folder of parquet shards exported from Debian's Fashion-MNIST (same images and labels as the Hub copy),
    or None when `--dataset_name` is not Fashion-MNIST or the Debian files are missing."""
    if data_args.dataset_name.lower() not in FASHION_MNIST_HUB_IDS:
        return None
    from .fashion_mnist import DEFAULT_SOURCE_DIR, IDX_FILES, export_fashion_mnist

    split = data_args.train_split
    if split not in IDX_FILES or not all((Path(DEFAULT_SOURCE_DIR) / f).exists() for f in IDX_FILES[split]):
        return None
    import datasets

    root = Path(data_args.cache_dir or datasets.config.HF_DATASETS_CACHE) / "ijepa_fashion_mnist_debian"
    path = export_fashion_mnist(root, split=split)
    logger.info("Fashion-MNIST: using Debian's copy (%s), exported to %s; no network needed.", DEFAULT_SOURCE_DIR, path)
    return path


def load_train_dataset(data_args: DataTrainingArguments):
    """`datasets.load_dataset` with clear errors for gated, missing or unreachable datasets."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    name = local_fashion_mnist(data_args) or data_args.dataset_name
    builder, data_files = name, None
    if os.path.isfile(name) or any(ch in name for ch in "*?["):
        suffix = name.rsplit(".", 1)[-1]
        formats = {"parquet": "parquet", "arrow": "arrow"}
        if suffix not in formats:
            raise ValueError(f"--dataset_name {name!r}: only .parquet/.arrow files or globs are supported as files.")
        builder, data_files = formats[suffix], name
    elif not os.path.exists(name) and (name.startswith((".", "/")) or os.sep in name and name.count("/") > 1):
        raise DatasetAccessError(f"--dataset_name {name!r} looks like a local path but does not exist.")
    try:
        return datasets.load_dataset(
            builder,
            data_args.dataset_config_name,
            data_files=data_files,
            split=data_args.train_split,
            streaming=data_args.streaming,
            cache_dir=data_args.cache_dir,
            token=data_args.token,
        )
    except (DatasetNotFoundError, GatedRepoError, RepositoryNotFoundError, LocalEntryNotFoundError) as err:
        raise DatasetAccessError(f"{access_instructions(name)}\n(datasets said: {err})") from err
    except ConnectionError as err:  # datasets' "Couldn't reach '<id>' on the Hub" (offline, no network)
        if os.path.exists(name):
            raise
        raise DatasetAccessError(f"{access_instructions(name)}\n(datasets said: {err})") from err


def count_train_samples(dataset, data_args: DataTrainingArguments) -> int | None:
    """Samples per epoch when they can be known without reading the data: the length of a downloaded dataset, the
    split size recorded in a Hub dataset's metadata, or the known ImageNet sizes; None otherwise."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return len(dataset)
    splits = getattr(dataset.info, "splits", None) or {}
    split_info = splits.get(data_args.train_split) if hasattr(splits, "get") else None
    if split_info is not None and getattr(split_info, "num_examples", 0):
        return int(split_info.num_examples)
    if data_args.train_split == "train":
        return KNOWN_TRAIN_SIZES.get(data_args.dataset_name.lower())
    return None


def detect_image_column(features, requested: str | None) -> str:
    import datasets

    names = list(features or {})
    if requested is not None:
        if features is not None and requested not in features:
            raise ValueError(f"--image_column_name {requested!r} is not a column; columns: {names}.")
        return requested
    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img", "jpg", "jpeg", "png", "webp"):
        if name in names:
            return name
    raise ValueError(f"No image column found among {names}; pass --image_column_name.")


def shard_for_process(dataset, rank: int, world_size: int, seed: int, buffer_size: int):
    """This process's part of the dataset, shuffled.

    Iterable datasets with at least `world_size` files get whole files per process (strategy "shards"; with a file
    count that is not a multiple of the world size some processes get one file more, and since training is counted
    in steps, not epochs, each process simply starts its next epoch when its files are done). With fewer files than
    processes every process reads everything and keeps one example in `world_size` (strategy "examples").
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
    return dataset.shuffle(seed=seed, buffer_size=buffer_size)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes, workers and Python versions."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class AugmentationSettings:
    """Official `make_transforms`: RandomResizedCrop(crop_size, crop_scale), optional flip / colour distortion /
    blur; normalisation happens after batching, on the training device."""

    crop_size: tuple[int, int]
    crop_scale: tuple[float, float] = (0.3, 1.0)
    horizontal_flip: bool = False
    color_distortion: bool = False
    color_jitter_strength: float = 0.0
    gaussian_blur: bool = False


def to_rgb(image):
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) -> RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA", "LA"):
        # Palette/alpha images go through RGBA so transparency is handled by PIL, not dropped with a warning.
        image = image.convert("RGBA")
    elif image.mode.startswith("I;16") or image.mode in ("I", "F"):
        import numpy as np
        from PIL import Image

        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low if high > low else 1.0) * 255.0
        image = Image.fromarray(array.astype(np.uint8), mode="L")
    return image.convert("RGB")


def decode_image(value) -> Any:
    """PIL image from a `datasets` image record (`{"bytes", "path"}`, a PIL image, or raw bytes)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    else:
        raise ValueError(f"record holds no image ({type(value).__name__})")
    image.load()
    return to_rgb(image)


def augment(image, settings: AugmentationSettings, seed: int):
    """Official `make_transforms` up to `ToTensor`, with all randomness from `seed`. Returns a uint8 numpy array
    `(H, W, 3)` (numpy, not torch, so worker processes return it without shared-memory file descriptors)."""
    import numpy as np
    from PIL import ImageFilter
    from torchvision import transforms

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image = transforms.RandomResizedCrop(settings.crop_size, scale=settings.crop_scale)(image)
        if settings.horizontal_flip:
            image = transforms.RandomHorizontalFlip()(image)
        if settings.color_distortion:
            s = settings.color_jitter_strength
            jitter = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
            image = transforms.RandomApply([jitter], p=0.8)(image)
            image = transforms.RandomGrayscale(p=0.2)(image)
        if settings.gaussian_blur:
            # Official `GaussianBlur(p=0.5, radius_min=0.1, radius_max=2.0)`.
            if torch.rand(1).item() < 0.5:
                radius = 0.1 + torch.rand(1).item() * (2.0 - 0.1)
                image = image.filter(ImageFilter.GaussianBlur(radius=radius))
    return np.array(image, dtype=np.uint8)


def decode_and_augment(job: tuple[Any, AugmentationSettings, int]) -> tuple[Any, str | None]:
    """(uint8 image, None) or (None, reason) for a record that cannot be decoded."""
    value, settings, seed = job
    try:
        image = decode_image(value)
    except DECODE_ERRORS as err:
        return None, f"{type(err).__name__}: {err}"
    return augment(image, settings, seed), None


def record_name(value) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return "<bytes>"


@dataclass
class DataState:
    """Position of one process in its data stream; saved with each checkpoint (one file per process)."""

    epoch: int = 0
    position: int = 0  # records of this epoch consumed into yielded batches (including skipped corrupt ones)
    corrupt_images: int = 0  # corrupt records skipped so far, all epochs, this process
    batches: int = 0  # micro-batches yielded so far


class ImageBatchStream:
    """Fixed-size uint8 batches `(B, 3, H, W)` from one process's shuffled stream, skipping corrupt records.

    Crops are seeded per record from `(seed, rank, epoch, index)`, so the output does not depend on how many worker
    processes decode. An epoch's leftover partial batch is dropped (official `drop_last=True`).
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        batch_size: int,
        settings: AugmentationSettings,
        seed: int,
        rank: int,
        num_workers: int = 0,
        state: DataState | None = None,
        max_logged_corrupt: int = 20,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.batch_size = batch_size
        self.settings = settings
        self.seed = seed
        self.rank = rank
        self.num_workers = num_workers
        self.state = state or DataState()
        self.max_logged_corrupt = max_logged_corrupt
        self._pool = None

    def _records(self, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)  # reseeds the file order and the shuffle buffer: seed + epoch
        for index, example in enumerate(self.dataset):
            if index < start:
                continue  # resume: skip what was consumed, before any decoding
            yield index, example[self.image_column]

    def _decoded(self, epoch: int, start: int) -> Iterator[tuple[int, Any, Any, str | None]]:
        jobs = (
            (index, value, (value, self.settings, derive_seed(self.seed, self.rank, epoch, index)))
            for index, value in self._records(epoch, start)
        )
        if self.num_workers <= 0:
            for index, value, job in jobs:
                yield (index, value, *decode_and_augment(job))
            return
        if self._pool is None:
            # spawn: safe after CUDA initialisation; workers only run `decode_and_augment`.
            self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
        # Bounded read-ahead (Pool.imap would read the whole stream into memory): chunks of one batch.
        pending: deque = deque()
        max_pending = 2 * self.num_workers
        exhausted = False
        while True:
            while not exhausted and len(pending) < max_pending:
                chunk = [next(jobs, None) for _ in range(self.batch_size)]
                chunk = [item for item in chunk if item is not None]
                if len(chunk) < self.batch_size:
                    exhausted = True
                if chunk:
                    result = self._pool.map_async(decode_and_augment, [job for _, _, job in chunk])
                    pending.append((chunk, result))
            if not pending:
                return
            chunk, result = pending.popleft()
            for (index, value, _), decoded in zip(chunk, result.get()):
                yield (index, value, *decoded)

    def __iter__(self) -> Iterator[torch.Tensor]:
        import numpy as np

        state = self.state
        while True:
            images: list = []
            produced_in_epoch = state.position > 0
            for index, value, image, error in self._decoded(state.epoch, state.position):
                if image is None:
                    state.corrupt_images += 1
                    if state.corrupt_images <= self.max_logged_corrupt:
                        logger.warning(
                            "Skipping undecodable image %s (epoch %d, record %d, process %d): %s",
                            record_name(value), state.epoch, index, self.rank, error,
                        )
                    continue
                images.append(image)
                if len(images) == self.batch_size:
                    state.position = index + 1
                    state.batches += 1
                    produced_in_epoch = True
                    yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
                    images = []
            if not produced_in_epoch:
                raise ValueError(
                    f"Process {self.rank} found fewer than {self.batch_size} decodable images in its part of the "
                    f"dataset (epoch {state.epoch}): lower --per_device_train_batch_size or use more data."
                )
            state.epoch += 1
            state.position = 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def normalize(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 `(B, 3, H, W)` -> float normalised with ImageNet statistics (official `ToTensor` + `Normalize`, the
    default of `src/transforms.py::make_transforms`)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    return (pixels.to(device, non_blocking=True).float() / 255.0 - mean) / std
