"""Where records come from: `datasets.load_dataset` with clear errors (gated, missing, offline), the local copy of
Fashion-MNIST, the samples per epoch and the image column."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..arguments import DataTrainingArguments

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
    from ..fashion_mnist import DEFAULT_SOURCE_DIR, IDX_FILES, export_fashion_mnist

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



def local_image_files(data_args: DataTrainingArguments):
    """A map-style `datasets.Dataset` of the image paths of a local image folder (`{"bytes": None, "path"}` records,
    undecoded: nothing is copied or read here), or None when `--dataset_name` is not one. Training then reads a
    folder with the official sampler's global shuffle whatever `--streaming` says: streamed, `datasets` reads an
    image folder as one shard in file order (class by class for ImageNet's layout)."""
    name = local_fashion_mnist(data_args) or data_args.dataset_name
    if not os.path.isdir(name):
        return None
    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    builder = datasets.load_dataset_builder(name, data_args.dataset_config_name, cache_dir=data_args.cache_dir)
    if builder.name != "imagefolder":
        return None
    files = builder.config.data_files.get(data_args.train_split)
    if not files:
        raise ValueError(f"--dataset_name {name!r} has no {data_args.train_split!r} split; pass --train_split.")
    paths = sorted(str(path) for path in files if os.path.splitext(str(path))[1].lower() in ImageFolder.EXTENSIONS)
    features = datasets.Features({"image": datasets.Image(decode=False)})
    logger.info("Image folder %s: %d images, read in the official sampler's order.", name, len(paths))
    return datasets.Dataset.from_dict({"image": [{"bytes": None, "path": path} for path in paths]}, features=features)


def load_training_images(data_args: DataTrainingArguments):
    """The pretraining dataset: a local image folder as `local_image_files`, anything else `load_train_dataset`."""
    folder = local_image_files(data_args)
    return folder if folder is not None else load_train_dataset(data_args)
