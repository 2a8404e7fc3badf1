"""Turn Debian's Fashion-MNIST IDX files into parquet shards that `datasets.load_dataset` reads.

Debian's `dataset-fashion-mnist` package installs the four original IDX files (gzip) under
`/usr/share/datasets/fashion-mnist/`. This helper writes them in the layout of the Hub copy
(`zalando-datasets/fashion_mnist`): an `image` column (`datasets.Image`, PNG bytes, mode "L", 28x28) and a
`label` column (`datasets.ClassLabel` with the 10 class names spelled as on the Hub), so a training config
works unchanged with either source.

Layout (the Hub convention, which `datasets` maps to splits by file name):

    <output_dir>/data/train-00000-of-00004.parquet ... (60,000 images)
    <output_dir>/data/test-00000-of-00001.parquet  ... (10,000 images)

Then `datasets.load_dataset(<output_dir>, split="train", streaming=True)` works, and so does
`load_dataset("parquet", data_files=f"{output_dir}/data/train-*.parquet")`.

Writes are idempotent and atomic: each shard is written to a temporary file and renamed into place, and a
hidden manifest (ignored by `datasets`) is written last; a split whose manifest matches the request is
skipped. Command line: `python scripts/fashion_mnist.py --output_dir data/fashion_mnist --split train --split test`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
# Debian installs the original file names from https://github.com/zalandoresearch/fashion-mnist.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Spelled as in the Hub copy (zalando-datasets/fashion_mnist) so label ids and names agree with it.
CLASS_NAMES = [
    "T - shirt / top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# IDX magic numbers: 0x00000803 = unsigned byte, 3 dimensions (images); 0x00000801 = unsigned byte, 1 dim (labels).
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
# Shards small enough for streaming/`split_dataset_by_node` to spread over a few processes (60k / 4 = 15k).
DEFAULT_NUM_SHARDS = {"train": 4, "test": 1}
MANIFEST_VERSION = 1


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read a gzip IDX image file. Returns uint8 array of shape (N, rows, cols)."""
    with gzip.open(path, "rb") as f:
        magic, count, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != IDX_IMAGES_MAGIC:
            raise ValueError(f"{path} is not an IDX image file (magic {magic}, expected {IDX_IMAGES_MAGIC}).")
        data = np.frombuffer(f.read(count * rows * cols), dtype=np.uint8)
    if data.size != count * rows * cols:
        raise ValueError(f"{path} is truncated: expected {count * rows * cols} bytes of pixels, got {data.size}.")
    return data.reshape(count, rows, cols)


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a gzip IDX label file. Returns uint8 array of shape (N,)."""
    with gzip.open(path, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
        if magic != IDX_LABELS_MAGIC:
            raise ValueError(f"{path} is not an IDX label file (magic {magic}, expected {IDX_LABELS_MAGIC}).")
        data = np.frombuffer(f.read(count), dtype=np.uint8)
    if data.size != count:
        raise ValueError(f"{path} is truncated: expected {count} labels, got {data.size}.")
    return data


def _features():
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.parquet"


def _manifest_path(data_dir: Path, split: str) -> Path:
    # Hidden file: `datasets` ignores dot-files when it resolves a folder into data files.
    return data_dir / f".fashion_mnist_{split}.json"


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the shards are shared data
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def export_fashion_mnist(
    output_dir: str | os.PathLike,
    split: str = "train",
    max_samples: int | None = None,
    num_shards: int | None = None,
    source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR,
) -> str:
    """Write one Fashion-MNIST split as parquet shards and return the folder to pass as `--dataset_name`.

    Args:
        output_dir: root folder; shards go to `<output_dir>/data/<split>-XXXXX-of-YYYYY.parquet`.
        split: "train" (60,000 images) or "test" (10,000 images).
        max_samples: keep only the first `max_samples` images (for quick tests).
        num_shards: number of parquet files (default 4 for train, 1 for test). Streaming with
            `split_dataset_by_node` gives each process whole shards when `num_shards % world_size == 0`.
        source_dir: where the IDX files are (Debian's `dataset-fashion-mnist` location by default).

    Returns:
        `str(output_dir)`: `datasets.load_dataset(output_dir, split=split)` loads it (streaming or not).
        The shard files alone are matched by `f"{output_dir}/data/{split}-*.parquet"`.
    """
    if split not in IDX_FILES:
        raise ValueError(f"split must be one of {sorted(IDX_FILES)}, got {split!r}.")
    num_shards = DEFAULT_NUM_SHARDS[split] if num_shards is None else int(num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    output_dir = Path(output_dir)
    data_dir = output_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    request = {"version": MANIFEST_VERSION, "split": split, "max_samples": max_samples, "num_shards": num_shards}
    manifest = _manifest_path(data_dir, split)
    expected = [data_dir / _shard_name(split, i, num_shards) for i in range(num_shards)]
    if _already_exported(manifest, request, expected):
        return str(output_dir)
    images, labels = _read_split(Path(source_dir), split, max_samples)
    if len(images) < num_shards:
        raise ValueError(f"cannot split {len(images)} images into {num_shards} shards.")

    # A different request for this split (other shard count/size) replaces the old files.
    if manifest.exists():
        manifest.unlink()
    for old in data_dir.glob(f"{split}-*-of-*.parquet"):
        if old not in expected:
            old.unlink()

    import datasets

    features = _features()
    # `to_parquet` shows a progress bar per shard; silence it here only.
    progress_was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        _write_shards(images, labels, expected, features)
    finally:
        if progress_was_enabled:
            datasets.enable_progress_bars()
    _atomic_write_bytes(manifest, json.dumps({**request, "num_rows": int(len(images))}).encode())
    return str(output_dir)


def _write_shards(images: np.ndarray, labels: np.ndarray, paths: list[Path], features) -> None:
    import datasets

    bounds = np.linspace(0, len(images), len(paths) + 1).astype(int)
    for index, path in enumerate(paths):
        lo, hi = bounds[index], bounds[index + 1]
        shard = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": _png_bytes(img), "path": None} for img in images[lo:hi]],
                "label": labels[lo:hi].astype(np.int64).tolist(),
            },
            features=features,
        )
        buffer = io.BytesIO()
        shard.to_parquet(buffer)
        _atomic_write_bytes(path, buffer.getvalue())


def _already_exported(manifest: Path, request: dict, expected: list[Path]) -> bool:
    """True when the split's manifest records this very request and all its shards exist."""
    if not manifest.exists():
        return False
    try:
        written = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    return {k: written.get(k) for k in request} == request and all(p.exists() for p in expected)


def _read_split(source_dir: Path, split: str, max_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,)) of one split, the first `max_samples` when given."""
    images_file, labels_file = (source_dir / name for name in IDX_FILES[split])
    for path in (images_file, labels_file):
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found. Install Debian's Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` "
                "(or pass --source_dir to a folder with the original IDX .gz files)."
            )
    images = read_idx_images(images_file)
    labels = read_idx_labels(labels_file)
    if len(images) != len(labels):
        raise ValueError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels.")
    if max_samples is not None:
        images, labels = images[:max_samples], labels[:max_samples]
    return images, labels
