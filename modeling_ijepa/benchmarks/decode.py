"""The `decode` benchmark: JPEG decode + RandomResizedCrop(224) images/s on one core, ours against the official
pipeline, on the same ImageNet-size files.

* **ours**: the package's per-record path, `BatchMaker.make_batch` of `modeling_ijepa/training/data/batches.py`
  (`decode_image` -> `RecordAugmenter`: crop drawn from the record's own `torch.Generator`, applied with
  `torchvision.transforms.v2.functional.resized_crop` -> `np.stack`), uint8 `(B, 3, 224, 224)`, no masks; the
  normalisation happens later on the training device. `ours (draft)` is the same with `draft=True` (PIL's reduced-size
  JPEG decode, which engages only when the image is at least twice the crop size on both sides).
* **official**: `src/transforms.py::make_transforms` of the I-JEPA repository with its defaults, in the loader its
  `src/datasets/imagenet1k.py` builds: `torchvision.datasets.ImageFolder` (PIL `open` + `convert("RGB")`) ->
  `RandomResizedCrop(224, scale=(0.3, 1.0))` -> `ToTensor` -> `Normalize`, in a `DataLoader` with `num_workers=0`
  (the time one worker spends), float32 `(B, 3, 224, 224)`.

The files are real photographs shipped by scikit-image (`skimage.data`), cropped at varied offsets and zooms,
resized to 500x375 or 375x500 (ImageNet's typical sizes) and re-encoded with PIL at quality 90. Each timed pass goes
over every file once per implementation, the order of the implementations alternates every pass, and the reported
rate is the median pass. One thread (`torch.set_num_threads(1)`): the rate of one worker core.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

# Colour photographs of `skimage.data` (what the official pipeline sees: natural RGB images).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                  "stereo_motorcycle", "retina", "colorwheel")
# ImageNet-1k train images are mostly 500x375 / 375x500 (the median size is about 500x400).
IMAGENET_SIZE = (500, 375)
JPEG_QUALITY = 90  # close to the ImageNet JPEGs' typical encoder setting
CROP_SIZE = 224  # official `crop_size`
CROP_SCALE = (0.3, 1.0)  # official `crop_scale`
BATCH_SIZE = 16  # records per timed call (one `make_batch` / one DataLoader batch)


def skimage_photo(name: str):
    import numpy as np
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
    return np.ascontiguousarray(image[..., :3])


def make_jpeg_folder(root: str | Path, count: int = 64, seed: int = 0) -> list[Path]:
    """`count` JPEGs in `root/photos/` (an `ImageFolder` with one class) made from `skimage.data` photographs: a
    random crop of 60-100% of each side, resized to 500x375 (every third one 375x500), quality 90."""
    import numpy as np
    from PIL import Image

    folder = Path(root) / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    names = SKIMAGE_PHOTOS[:count]
    rng, photos, paths = np.random.default_rng(seed), [skimage_photo(n) for n in names], []
    for i in range(count):
        photo = photos[i % len(names)]
        height, width = photo.shape[:2]
        h, w = (int(side * rng.uniform(0.6, 1.0)) for side in (height, width))
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        size = IMAGENET_SIZE if i % 3 else IMAGENET_SIZE[::-1]
        image = Image.fromarray(photo[top:top + h, left:left + w]).resize(size, Image.Resampling.BICUBIC)
        paths.append(folder / f"{i:04d}.jpg")
        image.save(paths[-1], quality=JPEG_QUALITY)
    return paths


def ours_batches(paths: list[Path], draft: bool, seed: int = 0, tensor_decode: bool = True):
    """A callable making our uint8 batches of all `paths` (bytes read from the files, as a parquet record holds them);
    `tensor_decode=False`: the PIL decode and resize instead of torchvision's."""
    from ..training.data import AugmentationSettings, BatchMaker

    settings = AugmentationSettings(crop_size=(CROP_SIZE, CROP_SIZE), crop_scale=CROP_SCALE)
    maker = BatchMaker(settings, seed, 0, collator=None, draft=draft)
    maker.tensor_decode = tensor_decode

    def run() -> list[torch.Tensor]:
        out = []
        for start in range(0, len(paths), BATCH_SIZE):
            records = [(0, start + i, {"bytes": p.read_bytes(), "path": None})
                       for i, p in enumerate(paths[start:start + BATCH_SIZE])]
            batch, _, _ = maker.make_batch(start // BATCH_SIZE, records, 0)
            out.append(batch["pixel_values"])
        return out

    return run


def official_batches(root: Path):
    """A callable making the official pipeline's float batches of every file under `root` (one epoch)."""
    from torchvision import datasets, transforms
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    transform = transforms.Compose([
        transforms.RandomResizedCrop(CROP_SIZE, scale=CROP_SCALE),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(root), transform=transform),
                                         batch_size=BATCH_SIZE, num_workers=0, shuffle=False)
    return lambda: [pixels for pixels, _ in loader]


def abs_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> tuple[float, int]:
    """Mean and max |first - second| over uint8 batches, in uint8 levels."""
    diffs = torch.cat([(a.int() - b.int()).abs().flatten() for a, b in zip(first, second)])
    return float(diffs.float().mean()), int(diffs.max())


def pixel_differences(samples: dict[str, list[torch.Tensor]], paths: list[Path]) -> dict:
    """How our variants' pixels differ after the same crops: the tensor path against the PIL path, draft against
    full decode (mean and max in uint8 levels), and how many files draft actually shrank."""
    from PIL import Image

    result = {}
    if "ours_pil" in samples:
        result["pil_mean_abs_diff"], result["pil_max_abs_diff"] = abs_difference(samples["ours"], samples["ours_pil"])
    if "ours_draft" not in samples:
        return result
    result["draft_mean_abs_diff"], result["draft_max_abs_diff"] = abs_difference(samples["ours"],
                                                                                 samples["ours_draft"])
    shrunk = 0
    for path in paths:
        with Image.open(path) as image:
            size = image.size
            image.draft("RGB", (CROP_SIZE, CROP_SIZE))
            shrunk += image.size != size
    return dict(result, draft_shrunk_files=shrunk)


def interleaved_pass_seconds(fns: dict, passes: int) -> dict[str, float]:
    """Median seconds of one call per name, the order of the names alternating every pass."""
    times, names = {name: [] for name in fns}, list(fns)
    for rep in range(passes):
        for name in names if rep % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def decode_benchmark(num_images: int = 64, passes: int = 5, seed: int = 0, draft: bool = True,
                     pil: bool = True) -> dict:
    """`{"ours_images_per_s", "official_images_per_s", "ratio", ...}` on one thread, in this process; `pil` adds our
    path with PIL's decode and resize (`ours_pil`), `draft` our path with `draft=True` (`ours_draft`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = make_jpeg_folder(tmp, num_images, seed)
            fns = {"ours": ours_batches(paths, False, seed), "official": official_batches(Path(tmp))}
            if pil:
                fns["ours_pil"] = ours_batches(paths, False, seed, tensor_decode=False)
            if draft:
                fns["ours_draft"] = ours_batches(paths, True, seed)
            samples = {name: fn() for name, fn in fns.items()}  # warm-up, and the outputs compared below
            seconds = interleaved_pass_seconds(fns, passes)
            result = {"kind": "decode", "images": num_images, "passes": passes, "batch_size": BATCH_SIZE,
                      "image_size": list(IMAGENET_SIZE), "jpeg_quality": JPEG_QUALITY, "threads": 1,
                      "mean_jpeg_kib": sum(p.stat().st_size for p in paths) / len(paths) / 1024,
                      **pixel_differences(samples, paths)}
    finally:
        torch.set_num_threads(threads)
    for name, value in seconds.items():
        first = samples[name][0]
        result[f"{name}_images_per_s"] = num_images / value
        result[f"{name}_output"] = {"shape": list(first.shape), "dtype": str(first.dtype).removeprefix("torch.")}
        result[f"{name}_ratio"] = seconds["official"] / value
    result["ratio"] = result["ours_ratio"]
    return result


ROWS = {  # name in the result -> table label
    "ours": "ours: `BatchMaker.make_batch` (torchvision decode_jpeg + uint8 antialiased resized_crop)",
    "ours_pil": "ours with PIL decode + resize (`tensor_decode=False`)",
    "ours_draft": "ours, `draft=True` (reduced-size JPEG decode)",
    "official": "official: ImageFolder + PIL + RandomResizedCrop + ToTensor + Normalize, DataLoader(num_workers=0)",
}


def format_decode_table(result: dict) -> str:
    """Markdown table: one row per pipeline, images/s on one core and the ratio to the official pipeline."""
    lines = [f"| pipeline (1 core, {CROP_SIZE}x{CROP_SIZE} crops of {result['images']} JPEGs "
             f"{result['image_size'][0]}x{result['image_size'][1]} q{result['jpeg_quality']}) | batch output | "
             "images/s | / official |", "|---|---|---|---|"]
    for name, label in ROWS.items():
        if f"{name}_images_per_s" in result:
            output = result[f"{name}_output"]
            lines.append(f"| {label} | {output['dtype']} {'x'.join(map(str, output['shape']))} | "
                         f"{result[f'{name}_images_per_s']:.1f} | {result[f'{name}_ratio']:.2f} |")
    notes = []
    if "pil_mean_abs_diff" in result:
        notes.append(f"ours vs ours-with-PIL after the same crops: mean |diff| {result['pil_mean_abs_diff']:.4f}, "
                     f"max {result['pil_max_abs_diff']} (uint8 levels)")
    if "draft_mean_abs_diff" in result:
        notes.append(f"draft vs full decode after the same crops: mean |diff| {result['draft_mean_abs_diff']:.4f}, "
                     f"max {result['draft_max_abs_diff']}; draft shrank {result['draft_shrunk_files']}/"
                     f"{result['images']} files (it needs >= {2 * CROP_SIZE} px on both sides)")
    return "\n".join(lines + ([""] + notes if notes else []))
