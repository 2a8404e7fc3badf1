"""How records become pixels: decoding (torchvision's JPEG decoder, PIL for the rest; corrupt files raise one of
`DECODE_ERRORS`), conversion to RGB and the official `make_transforms` augmentation with one seeded generator per
record (`RecordAugmenter`)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch



def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# What PIL raises for truncated, unidentifiable or otherwise undecodable files: such records are skipped and counted.
DECODE_ERRORS = _decode_errors()


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

