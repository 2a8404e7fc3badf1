"""The pretraining data path: dataset loading with clear errors, per-process sharding, decoding and augmentation,
and the `DataLoader` of fixed-size uint8 batches with their masks (with its resumable position).

Every process reads its own part of the dataset (`split_dataset_by_node`: whole files when there are at least as
many files as processes). Each epoch permutes the process's shards and shuffles each shard with a buffer, both pure
functions of `(seed, rank, epoch)`, so a position is (epoch, shard, offset) and a resume starts at its shard without
re-reading finished ones. DataLoader workers read, decode (here, not in `datasets`, so corrupt records are skipped
and counted instead of crashing the run), crop, stack and sample masks; crops are seeded per record from `(seed,
rank, epoch, index in epoch)` and masks per batch, so batches do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import multiprocessing
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..masking_ijepa import IJepaMaskCollator
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


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes, workers and Python versions (the same function as
    `masking_ijepa._derive_seed`)."""
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


JPEG_MAGIC = b"\xff\xd8\xff"  # start-of-image marker + the first segment marker of every JPEG file


def jpeg_bytes(value) -> bytes | None:
    """The file bytes of a record when it is a JPEG (`{"bytes"}`, `{"path"}` or raw bytes), else None."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, dict) and value.get("bytes") is not None:
        data = value["bytes"]
    elif isinstance(value, dict) and value.get("path") and str(value["path"]).lower().endswith((".jpg", ".jpeg")):
        data = Path(value["path"]).read_bytes()
    else:
        return None
    return data if data[:3] == JPEG_MAGIC else None


def draft_would_shrink(data: bytes, draft_size: tuple[int, int]) -> bool:
    """Whether PIL's `draft(draft_size)` scales this JPEG down: only when it is at least twice `draft_size` (width,
    height) on both sides (`JpegImageFile.draft` picks the largest of 1/2, 1/4, 1/8 that stays that large)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:  # reads the header only
        width, height = image.size
    return min(width // draft_size[0], height // draft_size[1]) >= 2


def decode_jpeg_tensor(data: bytes) -> torch.Tensor | None:
    """uint8 `(3, H, W)` RGB from JPEG bytes with torchvision's libjpeg-turbo decoder: bitwise the pixels of PIL's
    decode, in about half the time (PIL unpacks every line to 4-byte RGBX and copies again into numpy). None when it
    cannot decode the file (truncated, unusual colour spaces): PIL then decodes it or raises a `DECODE_ERRORS`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


def decode_image(value, draft_size: tuple[int, int] | None = None, as_tensor: bool = False) -> Any:
    """PIL image from a `datasets` image record (`{"bytes", "path"}`, a PIL image, or raw bytes).

    `draft_size` (width, height): let the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT while staying at least
    that large (PIL's `draft`); faster, and the pixels differ slightly from a full decode followed by the resize.
    `as_tensor`: JPEGs that draft would not shrink come back as uint8 `(3, H, W)` tensors (`decode_jpeg_tensor`,
    same pixels, faster); everything else is still a PIL image."""
    from PIL import Image

    if as_tensor and not isinstance(value, Image.Image):
        data = jpeg_bytes(value)
        if data is not None and (draft_size is None or not draft_would_shrink(data, draft_size)):
            tensor = decode_jpeg_tensor(data)
            if tensor is not None:
                return tensor
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
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", draft_size)
    image.load()
    return to_rgb(image)


# Random numbers drawn per record: 10 crop attempts x (scale, ratio, top, left), then flip, jitter (apply, order x4,
# factors x4), grayscale, blur (apply, radius).
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
_DRAWS = 4 * _CROP_ATTEMPTS + 1 + 9 + 1 + 2


class RecordAugmenter:
    """Official `make_transforms` up to `ToTensor`, applied with `torchvision.transforms.v2.functional` and all
    randomness drawn from one `torch.Generator` per record (no global RNG is touched or reseeded). Built once.

    The crop follows torchvision's `RandomResizedCrop.get_params` (10 attempts, then a centre crop); flip p=0.5;
    colour distortion: `RandomApply([ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)], p=0.8)` then `RandomGrayscale(p=0.2)`;
    blur: official `GaussianBlur(p=0.5, radius 0.1-2.0)`.
    """

    ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range (the official code keeps it)

    def __init__(self, settings: AugmentationSettings):
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional

        self.settings, self.functional, self.bilinear = settings, functional, InterpolationMode.BILINEAR
        self.size = list(settings.crop_size)
        self.log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))

    def crop_box(self, width: int, height: int, draws: list[float]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, as `RandomResizedCrop.get_params`."""
        low, high = self.settings.crop_scale
        for attempt in range(_CROP_ATTEMPTS):
            scale, ratio, top, left = draws[4 * attempt: 4 * attempt + 4]
            target_area = width * height * (low + (high - low) * scale)
            aspect = math.exp(self.log_ratio[0] + (self.log_ratio[1] - self.log_ratio[0]) * ratio)
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(top * (height - h + 1)), int(left * (width - w + 1)), h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image, seed: int):
        """uint8 numpy array `(H, W, 3)` (numpy, so workers return it without shared-memory file descriptors) from a
        PIL image or a uint8 `(3, H, W)` tensor (`decode_image(..., as_tensor=True)`). A tensor is resized by torch's
        uint8 antialiased bilinear kernel, which matches PIL's to within one level (about 0.1% of the values differ,
        by 1) in half the time; colour distortion and blur then run on PIL, as for PIL inputs."""
        import numpy as np

        draws = torch.rand(_DRAWS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
        is_tensor = isinstance(image, torch.Tensor)
        width, height = (image.shape[-1], image.shape[-2]) if is_tensor else (image.width, image.height)
        top, left, h, w = self.crop_box(width, height, draws)
        image = self.functional.resized_crop(image, top, left, h, w, self.size, interpolation=self.bilinear,
                                             antialias=True)
        rest = draws[4 * _CROP_ATTEMPTS:]
        if self.settings.horizontal_flip and rest[0] < 0.5:
            image = self.functional.horizontal_flip(image)
        if is_tensor and (self.settings.color_distortion or self.settings.gaussian_blur):
            image, is_tensor = self.functional.to_pil_image(image), False
        if is_tensor:
            return image.permute(1, 2, 0).numpy()  # (H, W, 3) view; the batch's np.stack copies it
        if self.settings.color_distortion:
            image = self.color_distort(image, rest[1:11])
        if self.settings.gaussian_blur and rest[11] < 0.5:
            from PIL import ImageFilter

            image = image.filter(ImageFilter.GaussianBlur(radius=0.1 + rest[12] * (2.0 - 0.1)))
        return np.asarray(image, dtype=np.uint8)

    def color_distort(self, image, draws: list[float]):
        f, s = self.functional, self.settings.color_jitter_strength
        if draws[0] < 0.8:  # RandomApply(ColorJitter, p=0.8), the four adjustments in a random order
            spans = (0.8 * s, 0.8 * s, 0.8 * s)
            for op in sorted(range(4), key=lambda i: draws[1 + i]):
                u = draws[5 + op]
                if op == 3:
                    image = f.adjust_hue(image, (2 * u - 1) * 0.2 * s) if s > 0 else image
                elif spans[op] > 0:
                    factor = max(0.0, 1 - spans[op]) + u * (1 + spans[op] - max(0.0, 1 - spans[op]))
                    adjust = (f.adjust_brightness, f.adjust_contrast, f.adjust_saturation)[op]
                    image = adjust(image, factor)
        if draws[9] < 0.2:  # RandomGrayscale(p=0.2)
            image = f.rgb_to_grayscale(image, num_output_channels=3)
        return image


def augment(image, settings: AugmentationSettings, seed: int):
    """One record's augmentation (see `RecordAugmenter`; build one and reuse it when augmenting many)."""
    return RecordAugmenter(settings)(image, seed)


def record_name(value) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return "<bytes>"


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
    """The batches of one process: a `torch.utils.data.DataLoader` over an `ImageBatchDataset` (workers read,
    decode, crop, stack and sample masks), started from `state` and advancing it only by the batches taken.

    Yields `{"pixel_values": uint8 (B, 3, H, W), "context_mask": [...], "target_mask": [...]}` (the forward's
    argument names; `allow_overlap` too when the sampler relaxed). `last_fingerprint` holds the hash of the last
    batch when `log_batch_fingerprints`. A worker that dies raises `DataWorkerError` naming its record.
    """

    def __init__(self, dataset: ProcessShards, image_column: str, batch_size: int, settings: AugmentationSettings,
                 seed: int, rank: int, num_workers: int = 0, state: DataState | None = None,
                 max_logged_corrupt: int = 20, collator: BatchIndexedMaskCollator | None = None,  # None: no masks
                 pin_memory: bool = False, prefetch_factor: int = 2, log_batch_fingerprints: bool = False,
                 timeout: float = 300.0, draft: bool = False):
        self.shards, self.collator, self.state = dataset, collator, state or DataState()
        self.options = dict(image_column=image_column, batch_size=batch_size, settings=settings, seed=seed,
                            rank=rank, collator=collator, fingerprints=log_batch_fingerprints, draft=draft)
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.timeout, self.max_logged_corrupt, self.rank = timeout, max_logged_corrupt, rank
        self.last_fingerprint: str | None = None
        self.dataset: ImageBatchDataset | None = None
        self._iterator = None

    def _loader(self):
        board = multiprocessing.Array("c", _BOARD_SLOT * max(1, self.num_workers), lock=False)
        self.dataset = ImageBatchDataset(self.shards, start=self.state, board=board, **self.options)
        workers = self.num_workers > 0
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=workers, prefetch_factor=self.prefetch_factor if workers else None,
            timeout=self.timeout if workers else 0,
            # Its own generator for the workers' base seed (unused by our per-record seeds): the global RNG is
            # neither consumed nor read.
            generator=torch.Generator().manual_seed(derive_seed(self.options["seed"], self.rank)),
        )
        return loader, board

    def __iter__(self) -> Iterator[dict]:
        """Starts the DataLoader (its workers) now, not at the first `next()`."""
        loader, board = self._loader()
        self._iterator = iter(loader)
        return self._batches(self._iterator, board)

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
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def consume(self, info: BatchInfo) -> None:
        """The loop took this batch: advance the saved position, count and report its corrupt records."""
        corrupt = self.state.corrupt_images
        for name, value in asdict(info.state).items():
            setattr(self.state, name, value)
        self.state.corrupt_images = corrupt + len(info.corrupt)
        for offset, message in enumerate(info.corrupt):
            if corrupt + offset < self.max_logged_corrupt:
                logger.warning("Skipping undecodable image %s", message)
        if self.collator is not None:
            self.collator.num_batches = self.state.batches
        self.last_fingerprint = info.fingerprint

    def worker_error(self, err: BaseException, board) -> DataWorkerError:
        worker = self.state.batches % self.num_workers  # batches arrive in order: this worker owed the next one
        slot = bytes(board[worker * _BOARD_SLOT:(worker + 1) * _BOARD_SLOT]).rstrip(b"\0").decode("utf-8", "replace")
        return DataWorkerError(
            f"DataLoader worker {worker} of process {self.rank} failed while making batch {self.state.batches}; it "
            f"was on record {slot or '<none yet>'}. ({err}) If it was killed for memory, lower "
            "--dataloader_num_workers or the batch size; if the record crashes the decoder, remove it."
        )

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
