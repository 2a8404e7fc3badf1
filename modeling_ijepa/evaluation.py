"""Frozen-feature evaluation of I-JEPA encoders: the paper's linear probe (Assran et al., CVPR 2023, Sec. 5 and
Appendix C "linear evaluation").

The official repository never released its evaluation code; this module follows the protocol the paper describes:

1. features are extracted once from the frozen target encoder: the average over patch tokens of the last layer
   (`IJepaModel.pooler_output`), optionally concatenated with the average-pooled outputs of the preceding layers
   (the paper concatenates the last 4 layers for its low-level tasks);
2. each feature is standardised with the mean and standard deviation of the training features;
3. a linear classifier is fitted by full-batch L-BFGS (default) or mini-batch SGD, for each L2 weight decay of a small
   sweep; the decay with the best accuracy on a held-out part of the training set is refitted on the whole training
   set and scored on the test set.

`scripts/linear_probe.py` wraps this for any `datasets` image-classification dataset; `scripts/benchmark_learning.py`
uses it for the pretrained / random-init / raw-pixel comparison. `image_transform_from_processor` turns a checkpoint's
image processor into the train / eval transforms of `scripts/linear_probe.py` and `scripts/finetune.py`.

This file imports only torch and transformers at module level; `image_transform_from_processor` also needs
torchvision and PIL (the `train` extra) and imports them when called.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import ViTImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# Small L2 sweep (weight decay on the mean cross-entropy). On 10k Fashion-MNIST images, 128-d encoder features picked
# 1e-5 / 1e-4 and 784-d raw pixels 1e-2, the top of an earlier 1e-6..1e-2 sweep; 1e-1 was added so that no probe
# sits at the edge.
DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Fraction of the training features held out to pick the weight decay.
DEFAULT_VALIDATION_FRACTION = 0.2
# Full-batch L-BFGS iterations. On raw Fashion-MNIST pixels (5k train / 2k test) 100 iterations score 83.25% and
# 300 score 83.65%, at a third of the time; raise `lbfgs_steps` for the last few tenths of a point.
DEFAULT_LBFGS_STEPS = 100
DEFAULT_SGD_EPOCHS = 100
DEFAULT_SGD_BATCH_SIZE = 256
DEFAULT_SGD_LEARNING_RATE = 0.1
# Guard against constant features (e.g. always-black border pixels) when standardising.
STD_EPS = 1e-6


def default_image_processor(image_size: int | Sequence[int], num_channels: int = 3) -> ViTImageProcessor:
    """A ViT-style processor for checkpoints saved without one (e.g. pretraining directories): resize to
    `image_size`, rescale to [0, 1], normalise with ImageNet mean/std (the statistics I-JEPA pretraining uses);
    single-channel models get the channel average of those statistics."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    mean, std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    if num_channels == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    elif num_channels != 3:
        raise ValueError(
            f"No image processor and {num_channels} input channels: pass an image processor whose image_mean/"
            "image_std match them."
        )
    return ViTImageProcessor(size={"height": int(height), "width": int(width)}, image_mean=mean, image_std=std)


class ConvertImageMode:
    """`PIL.Image.convert(mode)` as a picklable transform: any PIL mode (L, RGB, RGBA, P, CMYK, I;16, ...) becomes the
    mode the model takes ("L" for one channel, "RGB" for three)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


class RescaleToFloat:
    """`(C, H, W)` uint8 tensor -> float32 times `factor` (the processor's `rescale_factor`; 1 when `do_rescale` is
    off). Picklable, unlike a lambda, so the transform can go to DataLoader workers."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(torch.float32) * self.factor

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.factor!r})"


def _size_field(size: Mapping[str, Any] | Any, key: str) -> int | None:
    """`size[key]` of a processor size (a dict, or transformers' `SizeDict` whose absent fields are None)."""
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return None if value is None else int(value)


def processor_output_size(image_processor) -> tuple[int, int]:
    """`(height, width)` of the images `image_processor` produces: `crop_size` when it center-crops, else its resize
    `size` (`height`/`width`, or a square of `shortest_edge`)."""
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        return _size_field(crop, "height"), _size_field(crop, "width")
    size = image_processor.size
    height, width = _size_field(size, "height"), _size_field(size, "width")
    if height is not None and width is not None:
        return height, width
    shortest = _size_field(size, "shortest_edge")
    if shortest is None:
        raise ValueError(
            f"Image processor size {size} has neither height/width nor shortest_edge: give a processor with "
            "size={'height': H, 'width': W} or {'shortest_edge': S} (and crop_size with do_center_crop)."
        )
    return shortest, shortest


def image_transform_from_processor(image_processor, train: bool, num_channels: int = 3):
    """The torchvision transform `PIL image -> (num_channels, H, W)` float tensor that a checkpoint's image
    processor describes, built from all its fields (as transformers' `run_image_classification.py` does):

    * eval (`train=False`): convert the PIL mode, `Resize` (`size.shortest_edge` keeps the aspect ratio,
      `size.height/width` does not) with the processor's `resample`, `CenterCrop(crop_size)` when
      `do_center_crop` (a `shortest_edge` processor without one is cropped to a `shortest_edge` square so that
      images batch), rescale by `rescale_factor`, normalise by `image_mean`/`image_std`. For the processors this
      project saves (ViT-style default, converted official checkpoints) it gives the processor's own output.
    * train: `RandomResizedCrop` to the same output size (with `resample`) and a random horizontal flip instead of
      resize and crop; the rest is the same.

    `H, W` is `processor_output_size(image_processor)`, e.g. 224x224 for a converted ViT-H/14 processor
    (`shortest_edge` 256, `crop_size` 224) and `image_size` for a pretraining directory's default processor.
    """
    try:
        from torchvision import transforms
    except ImportError as error:
        raise ImportError(
            "image_transform_from_processor needs torchvision and Pillow: pip install 'modeling-ijepa[train]'."
        ) from error
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
    interpolation = processor_interpolation(image_processor)
    output_size = processor_output_size(image_processor)
    steps = [ConvertImageMode("L" if num_channels == 1 else "RGB")]
    if train:
        steps += [
            transforms.RandomResizedCrop(output_size, interpolation=interpolation),
            transforms.RandomHorizontalFlip(),
        ]
    else:
        steps += eval_geometry_steps(image_processor, output_size, interpolation)
    rescale = image_processor.rescale_factor if getattr(image_processor, "do_rescale", True) else 1.0
    steps += [transforms.PILToTensor(), RescaleToFloat(rescale)]
    if getattr(image_processor, "do_normalize", True):
        mean, std = list(image_processor.image_mean), list(image_processor.image_std)
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(
                f"The image processor normalises {len(mean)} channels (image_mean {mean}) but the model takes "
                f"{num_channels}: pass --image_processor_name with matching image_mean/image_std."
            )
        steps.append(transforms.Normalize(mean=mean, std=std))
    return transforms.Compose(steps)


def processor_interpolation(image_processor):
    """The torchvision `InterpolationMode` of the processor's PIL `resample` (bilinear when it stores none, as
    transformers' processors default)."""
    from PIL import Image
    from torchvision import transforms

    resamplings = {
        Image.Resampling.NEAREST: transforms.InterpolationMode.NEAREST,
        Image.Resampling.BILINEAR: transforms.InterpolationMode.BILINEAR,
        Image.Resampling.BICUBIC: transforms.InterpolationMode.BICUBIC,
        Image.Resampling.BOX: transforms.InterpolationMode.BOX,
        Image.Resampling.HAMMING: transforms.InterpolationMode.HAMMING,
        Image.Resampling.LANCZOS: transforms.InterpolationMode.LANCZOS,
    }
    resample = getattr(image_processor, "resample", None)
    interpolation = transforms.InterpolationMode.BILINEAR if resample is None else resamplings.get(int(resample))
    if interpolation is None:
        raise ValueError(f"Unknown resample {resample!r}: use a PIL.Image.Resampling value (0-5).")
    return interpolation


def eval_geometry_steps(image_processor, output_size: tuple[int, int], interpolation) -> list:
    """Evaluation resize and crop: `Resize` (`shortest_edge` keeps the aspect ratio, `height/width` does not), then
    `CenterCrop(output_size)` when `do_center_crop` or the size is a `shortest_edge` (so that images batch)."""
    from torchvision import transforms

    steps = []
    size = image_processor.size
    if getattr(image_processor, "do_resize", True):
        shortest = _size_field(size, "shortest_edge")
        target = shortest if shortest is not None else (_size_field(size, "height"), _size_field(size, "width"))
        steps.append(transforms.Resize(target, interpolation=interpolation))
    if getattr(image_processor, "do_center_crop", False) or _size_field(size, "height") is None:
        steps.append(transforms.CenterCrop(output_size))
    return steps


@torch.no_grad()
def pooled_features(model: nn.Module, pixel_values: torch.Tensor, num_layers: int = 1) -> torch.Tensor:
    """Average-pooled features of an `IJepaModel` for one batch.

    Args:
        model: an `IJepaModel` (or any encoder returning `pooler_output` and `hidden_states`).
        pixel_values: `(batch, channels, height, width)`.
        num_layers: 1 uses `pooler_output` (mean of the final, layer-normed tokens); N > 1 concatenates it with the
            token means of the N - 1 preceding transformer layers' outputs, deepest first.
    Returns:
        `(batch, num_layers * hidden_size)`.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
    outputs = model(pixel_values, output_hidden_states=num_layers > 1)
    features = [outputs.pooler_output]
    if num_layers > 1:
        # hidden_states = (embeddings, layer 1, ..., layer L); the last one is already in pooler_output (normed).
        layers = outputs.hidden_states[1:-1]
        if num_layers - 1 > len(layers):
            raise ValueError(
                f"num_layers={num_layers} but the encoder has only {len(layers) + 1} transformer layers; "
                f"use at most {len(layers) + 1}."
            )
        for hidden in reversed(layers[len(layers) - (num_layers - 1):]):
            features.append(hidden.mean(dim=1))
    return torch.cat(features, dim=-1)


@torch.no_grad()
def encode_batches(
    model: nn.Module,
    batches: Iterable[dict | tuple | torch.Tensor],
    encode,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a frozen encoder over batches once: `(torch.cat of encode(model, pixels) per batch, labels (N,) or None)`.

    `batches` yields dicts with `pixel_values` (and optionally `labels`), `(pixel_values, labels)` tuples, or bare
    pixel tensors. The model is put in eval mode; `encode` returns each batch's outputs, moved where they should be
    kept (the CPU, for probes).
    """
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    outputs, labels = [], []
    for batch in batches:
        if isinstance(batch, dict):
            pixels, batch_labels = batch["pixel_values"], batch.get("labels")
        elif isinstance(batch, (tuple, list)):
            pixels, batch_labels = batch[0], batch[1] if len(batch) > 1 else None
        else:
            pixels, batch_labels = batch, None
        outputs.append(encode(model, pixels.to(device)))
        if batch_labels is not None:
            labels.append(torch.as_tensor(batch_labels).cpu())
    if not outputs:
        raise ValueError("The encoder received no batches: the dataset split is empty.")
    return torch.cat(outputs), (torch.cat(labels).long() if labels else None)


def extract_features(
    model: nn.Module,
    batches: Iterable[dict | tuple | torch.Tensor],
    num_layers: int = 1,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a frozen encoder over batches once and return `(features (N, num_layers * D), labels (N,) or None)`, the
    features on the CPU in float32 (`batches` as in `encode_batches`)."""
    return encode_batches(
        model, batches, lambda m, pixels: pooled_features(m, pixels, num_layers=num_layers).float().cpu(), device
    )


@dataclass
class Standardizer:
    """Per-feature z-scoring with statistics of the training features."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> "Standardizer":
        return cls(mean=features.mean(0), std=features.std(0).clamp_min(STD_EPS))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


@dataclass
class ProbeSettings:
    """How the linear classifier is fitted (see module docstring)."""

    method: str = "lbfgs"  # "lbfgs" (full batch) or "sgd"
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    standardize: bool = True
    lbfgs_steps: int = DEFAULT_LBFGS_STEPS
    sgd_epochs: int = DEFAULT_SGD_EPOCHS
    sgd_batch_size: int = DEFAULT_SGD_BATCH_SIZE
    sgd_learning_rate: float = DEFAULT_SGD_LEARNING_RATE
    seed: int = 0

    def __post_init__(self):
        if self.method not in ("lbfgs", "sgd"):
            raise ValueError(f"method must be 'lbfgs' or 'sgd', got {self.method!r}.")
        if not self.weight_decays:
            raise ValueError("weight_decays is empty: give at least one L2 weight decay to try.")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}.")


@dataclass
class ProbeResult:
    """Outcome of `linear_probe`; `to_dict()` is what the scripts write as JSON."""

    test_accuracy: float | None
    train_accuracy: float
    best_weight_decay: float
    validation_accuracy: dict[str, float] = field(default_factory=dict)  # str(weight decay) -> accuracy
    num_train: int = 0
    num_test: int = 0
    feature_dim: int = 0
    num_classes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def fit_linear_classifier(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, settings: ProbeSettings
) -> nn.Linear:
    """Multinomial logistic regression `(N, D) -> num_classes` minimising mean cross-entropy + wd/2 * ||W||^2."""
    generator = torch.Generator().manual_seed(settings.seed)
    classifier = nn.Linear(features.size(1), num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)

    def objective(logits_of):
        return F.cross_entropy(logits_of, labels) + 0.5 * weight_decay * classifier.weight.pow(2).sum()

    if settings.method == "lbfgs":
        optimizer = torch.optim.LBFGS(
            classifier.parameters(), lr=1.0, max_iter=settings.lbfgs_steps, history_size=20,
            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10,
        )

        def closure():
            optimizer.zero_grad()
            loss = objective(classifier(features))
            loss.backward()
            return loss

        optimizer.step(closure)
    else:
        optimizer = torch.optim.SGD(classifier.parameters(), lr=settings.sgd_learning_rate, momentum=0.9)
        steps_per_epoch = math.ceil(features.size(0) / settings.sgd_batch_size)
        total = settings.sgd_epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        for _ in range(settings.sgd_epochs):
            order = torch.randperm(features.size(0), generator=generator)
            for start in range(0, features.size(0), settings.sgd_batch_size):
                index = order[start:start + settings.sgd_batch_size]
                optimizer.zero_grad()
                loss = F.cross_entropy(classifier(features[index]), labels[index])
                loss = loss + 0.5 * weight_decay * classifier.weight.pow(2).sum()
                loss.backward()
                optimizer.step()
                scheduler.step()
    return classifier


@torch.no_grad()
def accuracy(classifier: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((classifier(features).argmax(-1) == labels).float().mean())


def count_classes(train_features: torch.Tensor, train_labels: torch.Tensor, test_labels: torch.Tensor | None,
                  num_classes: int | None) -> int:
    """`num_classes`, or `max(label) + 1` over train and test; checks that features and labels pair up."""
    if train_features.size(0) != train_labels.size(0):
        raise ValueError(f"{train_features.size(0)} training features but {train_labels.size(0)} labels.")
    if num_classes is not None:
        return num_classes
    num_classes = int(train_labels.max()) + 1
    if test_labels is not None:
        num_classes = max(num_classes, int(test_labels.max()) + 1)
    return num_classes


def held_out_split(num_train: int, settings: ProbeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """`(validation indices, fitting indices)`: a fixed random `validation_fraction` of train (seeded by
    `settings.seed`), used only to pick the weight decay; every probe of the sweep family uses the same split."""
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(settings.seed))
    num_val = max(1, int(round(settings.validation_fraction * num_train)))
    if num_val >= num_train:
        raise ValueError(f"Need at least 2 training examples to hold some out, got {num_train}.")
    return order[:num_val], order[num_val:]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    settings: ProbeSettings | None = None,
) -> ProbeResult:
    """Fit the paper's linear probe on frozen features and score it (see module docstring).

    Args:
        train_features: `(N, D)`; train_labels: `(N,)` class ids in `[0, num_classes)`.
        test_features / test_labels: `(M, D)` / `(M,)`, optional (then `test_accuracy` is None).
        num_classes: defaults to `max(label) + 1` over train and test.
    """
    settings = settings or ProbeSettings()
    train_features = train_features.float()
    train_labels = train_labels.long()
    num_classes = count_classes(train_features, train_labels, test_labels, num_classes)

    # Held-out part of train, a fixed random subset, used only to pick the weight decay.
    val_index, fit_index = held_out_split(train_features.size(0), settings)
    fit_scaler = Standardizer.fit(train_features[fit_index]) if settings.standardize else None
    scale = fit_scaler if fit_scaler is not None else (lambda x: x)
    fit_x, val_x = scale(train_features[fit_index]), scale(train_features[val_index])
    validation_accuracy = {}
    for weight_decay in settings.weight_decays:
        classifier = fit_linear_classifier(fit_x, train_labels[fit_index], num_classes, weight_decay, settings)
        validation_accuracy[str(weight_decay)] = accuracy(classifier, val_x, train_labels[val_index])
    # Ties go to the larger decay (the simpler model).
    best = max(settings.weight_decays, key=lambda wd: (validation_accuracy[str(wd)], wd))

    scaler = Standardizer.fit(train_features) if settings.standardize else None
    scale = scaler if scaler is not None else (lambda x: x)
    all_x = scale(train_features)
    classifier = fit_linear_classifier(all_x, train_labels, num_classes, best, settings)
    test_accuracy = None
    if test_features is not None:
        if test_labels is None:
            raise ValueError("test_features were given without test_labels.")
        test_accuracy = accuracy(classifier, scale(test_features.float()), test_labels.long())
    return ProbeResult(
        test_accuracy=test_accuracy,
        train_accuracy=accuracy(classifier, all_x, train_labels),
        best_weight_decay=float(best),
        validation_accuracy=validation_accuracy,
        num_train=int(train_features.size(0)),
        num_test=int(test_features.size(0)) if test_features is not None else 0,
        feature_dim=int(train_features.size(1)),
        num_classes=int(num_classes),
    )


__all__ = [
    "DEFAULT_WEIGHT_DECAYS",
    "ProbeResult",
    "ProbeSettings",
    "Standardizer",
    "accuracy",
    "extract_features",
    "fit_linear_classifier",
    "image_transform_from_processor",
    "linear_probe",
    "pooled_features",
    "processor_output_size",
]
