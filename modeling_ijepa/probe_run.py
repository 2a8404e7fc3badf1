"""Frozen-encoder evaluation runs on `datasets` image-classification data: the engine of `scripts/linear_probe.py`.

`run_probe(ProbeArguments(...))` loads an encoder (a pretraining directory's EMA target encoder, an exported encoder
or any transformers `ijepa` checkpoint) or takes the raw pixels, preprocesses both splits with the checkpoint's own
image processor (every field: resize, crop, resample, rescale, mean/std), extracts features once and scores one of
four probes (`--probe`): the linear probe of `evaluation.linear_probe`, the paper's BatchNorm protocol, V-JEPA's
attentive probe, or a k-NN probe (`probes.py`). Needs the `train` extra (datasets, torchvision).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModel

from .evaluation import (
    DEFAULT_WEIGHT_DECAYS,
    ProbeSettings,
    default_image_processor,
    extract_features,
    image_transform_from_processor,
    linear_probe,
)
from .probes import (
    DEFAULT_ATTENTIVE_EPOCHS,
    PAPER_LOW_LEVEL_NUM_LAYERS,
    AttentiveProbeSettings,
    batchnorm_linear_probe,
    extract_patch_tokens,
    fit_attentive_probe,
    knn_probe,
)
from .training.validation import (
    ArgumentError,
    Problems,
    check_dataset_folder_or_hub,
    check_hub_or_local,
    check_ijepa_checkpoint,
    check_output_path,
)

logger = logging.getLogger(__name__)

PROBES = ("linear", "batchnorm", "attentive", "knn")
FIT_METHODS = ("lbfgs", "sgd")  # `evaluation.ProbeSettings.method`: full-batch L-BFGS or minibatch SGD


@dataclass
class ProbeArguments:
    """What to probe, on which data, and how."""

    dataset_name: str = field(metadata={"help": "Hub dataset id or local dataset directory (image + label columns)."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretraining directory, encoder or transformers `ijepa` checkpoint."}
    )
    raw_pixels: bool = field(
        default=False, metadata={"help": "Probe the preprocessed pixels (flattened) instead of an encoder."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Split the classifier is fitted on."})
    test_split: str = field(default="test", metadata={"help": "Split the accuracy is reported on."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding integer/ClassLabel labels."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of loading it."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training images."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Use the first N test images."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor (name or path); default: the checkpoint's."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "With --raw_pixels and no processor: resize images to this size."}
    )
    batch_size: int = field(default=256, metadata={"help": "Images per feature-extraction batch."})
    num_layers: int = field(
        default=1, metadata={"help": "Concatenate the average-pooled outputs of the last N layers (1: last only)."}
    )
    probe: str = field(
        default="linear",
        metadata={"help": "'linear' (standardised features, L2 sweep), 'batchnorm' (the paper's BatchNorm1d without "
                  "affine before the linear head), 'attentive' (V-JEPA's attentive probe over the patch tokens, "
                  "AdamW) or 'knn' (weighted cosine k-NN, k=20)."},
    )
    attentive_epochs: int = field(default=DEFAULT_ATTENTIVE_EPOCHS, metadata={"help": "Attentive probe epochs."})
    method: str = field(default="lbfgs", metadata={"help": "'lbfgs' (full batch) or 'sgd'."})
    weight_decays: list[float] = field(
        default_factory=lambda: list(DEFAULT_WEIGHT_DECAYS), metadata={"help": "L2 sweep picked on held-out train."}
    )
    validation_fraction: float = field(default=0.2, metadata={"help": "Part of train held out to pick the decay."})
    no_standardize: bool = field(default=False, metadata={"help": "Skip per-feature standardisation."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split and SGD order."})
    output_file: str | None = field(default=None, metadata={"help": "Where to write the JSON result."})


# ---------------------------------------------------------------------------------------------------------------------
# Bad arguments: one line each, before any data is read or any model loaded


def check_probe_source(p: Problems, args: ProbeArguments) -> None:
    """The encoder (a checkpoint whose config.json is read, not its weights) or the raw-pixel baseline."""
    if (args.model_name_or_path is None) == (not args.raw_pixels):
        p.lines.append("--model_name_or_path/--raw_pixels: give exactly one (an encoder to probe, or --raw_pixels for "
                       "the pixel baseline)")
    config = check_ijepa_checkpoint(p, "model_name_or_path")
    depth = (config or {}).get("num_hidden_layers")
    if isinstance(depth, int) and args.num_layers > depth:
        p.lines.append(f"--num_layers {args.num_layers}: must be at most {depth}, the number of layers of "
                       f"{args.model_name_or_path}")
    size_given = args.image_size is not None or args.image_processor_name is not None
    if args.raw_pixels and args.model_name_or_path is None and not size_given:
        p.lines.append("--raw_pixels: needs --image_size N (the side images are resized to) or --image_processor_name")
    if args.image_size is not None and args.model_name_or_path is not None:
        p.lines.append(f"--image_size {args.image_size}: only applies to --raw_pixels (an encoder is probed at the "
                       "size of its own image processor); drop it")
    p.at_least("image_size", 1, "must be a positive number of pixels", optional=True)
    check_hub_or_local(p, "image_processor_name", "preprocessor_config.json")


def check_probe_data(p: Problems, args: ProbeArguments) -> None:
    """The dataset and its splits (their syntax only: their existence needs the dataset)."""
    from datasets import ReadInstruction

    check_dataset_folder_or_hub(p, "dataset_name")
    for name, limit in (("train_split", "max_train_samples"), ("test_split", "max_test_samples")):
        split = p.value(name)
        try:
            ReadInstruction.from_spec(split)
        except ValueError as error:
            p.lines.append(f"--{name} {split}: not a split ({error}); e.g. train, train[:80%], train+validation")
            continue
        p.require(name, not (args.streaming and "[" in split), f"--streaming reads whole splits (no slices); "
                  f"drop --streaming, or take the whole split and cap it with --{limit}")
        p.at_least(limit, 1, "must be a positive number of images (or absent: the whole split)", optional=True)
    p.at_least("batch_size", 1, "must be a positive number of images per batch")


def check_probe_fit(p: Problems, args: ProbeArguments, probes: tuple[str, ...]) -> None:
    """The probes and their settings."""
    for probe in probes:
        if probe not in PROBES:
            p.lines.append(f"--probe {probe}: must be one of {', '.join(PROBES)}")
    if args.raw_pixels and "attentive" in probes:
        p.lines.append("--probe attentive: needs an encoder's patch tokens; probe --raw_pixels with linear, "
                       "batchnorm or knn")
    p.at_least("num_layers", 1, "must be a positive number of last layers to pool")
    p.at_least("attentive_epochs", 1, "must be a positive number of epochs")
    p.require("method", args.method in FIT_METHODS, f"must be one of {', '.join(FIT_METHODS)}")
    p.require("weight_decays", bool(args.weight_decays) and min(args.weight_decays) >= 0,
              "must be one or more L2 weight decays >= 0 (the sweep picks the best on held-out train)")
    p.require("validation_fraction", 0 < args.validation_fraction < 1, "must be in (0, 1) (the part of train "
              "held out to pick the weight decay)")


def validate_probe_arguments(args: ProbeArguments, probes: tuple[str, ...] | None = None) -> None:
    """Raise `ArgumentError` (one line per bad argument, all at once) if `args` cannot make a probe run of `probes`
    (default: `args.probe`). Reads at most the checkpoint's config.json: no data, no weights. The column names can
    only be checked once the dataset is open."""
    p = Problems(args)
    check_probe_source(p, args)
    check_probe_data(p, args)
    check_probe_fit(p, args, probes or (args.probe,))
    check_output_path(p, "output_file", folder=False)
    if p.lines:
        raise ArgumentError(p.lines)


def load_processor(path: str | None, fallback_config=None, image_size: int | None = None, num_channels: int = 3):
    """The checkpoint's image processor; without one, a ViT-style default at the config's size (ImageNet stats)."""
    if path is not None:
        try:
            return AutoImageProcessor.from_pretrained(path)
        except OSError:
            logger.warning("%s has no image processor; using a default one from its config.", path)
    if fallback_config is not None:
        return default_image_processor(fallback_config.image_size, fallback_config.num_channels)
    if image_size is not None:
        return default_image_processor(image_size, num_channels)
    raise ValueError("No image processor found: pass --image_processor_name or --image_size.")


def batches(
    examples: Iterable[dict], transform, image_column: str, label_column: str, batch_size: int, limit: int | None
) -> Iterator[dict]:
    """`{"pixel_values": (B, C, H, W), "labels": (B,)}` batches from any iterable of examples (streaming or not)."""
    pixels, labels = [], []
    for count, example in enumerate(examples):
        if limit is not None and count >= limit:
            break
        pixels.append(transform(example[image_column]))
        labels.append(int(example[label_column]))
        if len(pixels) == batch_size:
            yield {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels)}
            pixels, labels = [], []
    if pixels:
        yield {"pixel_values": torch.stack(pixels), "labels": torch.tensor(labels)}


class PixelEncoder(torch.nn.Module):
    """Raw-pixel "encoder": the flattened preprocessed image, for the pixel baseline."""

    def forward(self, pixel_values, output_hidden_states=False):
        class Output:
            pooler_output = pixel_values.flatten(1)
            hidden_states = None

        return Output()


def load_split(args: ProbeArguments, split: str):
    from datasets import load_dataset

    return load_dataset(args.dataset_name, args.dataset_config_name, split=split, streaming=args.streaming)


def load_encoder(args: ProbeArguments):
    """(encoder, its image processor, number of input channels, layers to pool)."""
    if args.raw_pixels:
        processor = load_processor(args.image_processor_name, image_size=args.image_size, num_channels=1)
        return PixelEncoder(), processor, len(processor.image_mean), 1
    import modeling_ijepa  # noqa: F401  (registers the I-JEPA classes with the Auto classes)

    encoder = AutoModel.from_pretrained(args.model_name_or_path)
    processor = load_processor(args.image_processor_name or args.model_name_or_path, encoder.config)
    return encoder.eval(), processor, encoder.config.num_channels, args.num_layers


@dataclass
class SplitInputs:
    """What the probes read from one split: pooled features `(N, num_layers * D)` (last layer first), patch tokens
    `(N, P, D)` (only for the attentive probe) and labels `(N,)`."""

    features: torch.Tensor | None
    tokens: torch.Tensor | None
    labels: torch.Tensor


def split_inputs(encoder, dataset, transform, args: ProbeArguments, limit: int | None, num_layers: int,
                 probes: tuple[str, ...]) -> SplitInputs:
    """The representations `probes` need of one split, extracted once on the CPU."""
    def data():
        return batches(dataset, transform, args.image_column_name, args.label_column_name, args.batch_size, limit)

    features = tokens = labels = None
    if any(probe != "attentive" for probe in probes):
        features, labels = extract_features(encoder, data(), num_layers=num_layers, device=torch.device("cpu"))
    if "attentive" in probes:
        tokens, labels = extract_patch_tokens(encoder, data(), device=torch.device("cpu"))
    return SplitInputs(features, tokens, labels)


def probe_view(inputs: SplitInputs, probe: str, num_layers: int, extracted_layers: int) -> torch.Tensor:
    """The representation one probe reads: tokens for 'attentive'; for 'batchnorm' all extracted layers (the paper's
    last 4); otherwise the last `num_layers` (the first slices: `pooled_features` puts the deepest layer first)."""
    if probe == "attentive":
        return inputs.tokens
    if probe == "batchnorm":
        return inputs.features
    width = inputs.features.size(1) // extracted_layers
    return inputs.features[:, : num_layers * width]


def score(args: ProbeArguments, probe: str, train_x, train_y, test_x, test_y, num_classes: int | None) -> dict:
    """Fit one probe on train, score it on test; a JSON-ready dict with `test_accuracy`."""
    if probe == "knn":
        return knn_probe(train_x, train_y, test_x, test_y, num_classes=num_classes).to_dict()
    if probe == "attentive":
        settings = AttentiveProbeSettings(epochs=args.attentive_epochs, seed=args.seed)
        return fit_attentive_probe(train_x, train_y, test_x, test_y, num_classes, settings).to_dict()
    settings = ProbeSettings(
        method=args.method, weight_decays=tuple(args.weight_decays), validation_fraction=args.validation_fraction,
        standardize=not args.no_standardize, seed=args.seed,
    )
    fit = batchnorm_linear_probe if probe == "batchnorm" else linear_probe
    return fit(train_x, train_y, test_x, test_y, num_classes=num_classes, settings=settings).to_dict()


def run_probes(args: ProbeArguments, probes: tuple[str, ...]) -> dict[str, dict]:
    """Extract each split's features once and score every probe in `probes` on them; `{probe: result}`.
    'batchnorm' reads the paper's last `PAPER_LOW_LEVEL_NUM_LAYERS` layers, the others `args.num_layers`."""
    from datasets import ClassLabel

    validate_probe_arguments(args, probes)  # before any data or model
    start = time.perf_counter()
    encoder, processor, num_channels, num_layers = load_encoder(args)
    extracted_layers = num_layers
    if "batchnorm" in probes and not args.raw_pixels:  # the paper's last 4 (all of them in a shallower encoder)
        extracted_layers = max(num_layers, min(PAPER_LOW_LEVEL_NUM_LAYERS, encoder.config.num_hidden_layers))
    # Every field of the processor (resize, center crop, resample, rescale, mean/std), as finetune.py evaluates.
    transform = image_transform_from_processor(processor, train=False, num_channels=num_channels)
    train, test = load_split(args, args.train_split), load_split(args, args.test_split)
    label_feature = (train.features or {}).get(args.label_column_name)
    num_classes = label_feature.num_classes if isinstance(label_feature, ClassLabel) else None
    train_in = split_inputs(encoder, train, transform, args, args.max_train_samples, extracted_layers, probes)
    test_in = split_inputs(encoder, test, transform, args, args.max_test_samples, extracted_layers, probes)
    extraction_s = time.perf_counter() - start
    results = {}
    for probe in probes:
        probe_start = time.perf_counter()
        fitted = score(args, probe, probe_view(train_in, probe, num_layers, extracted_layers), train_in.labels,
                       probe_view(test_in, probe, num_layers, extracted_layers), test_in.labels, num_classes)
        results[probe] = {
            "model": "raw_pixels" if args.raw_pixels else args.model_name_or_path, "probe": probe,
            "dataset": args.dataset_name, "train_split": args.train_split, "test_split": args.test_split,
            "num_layers": extracted_layers if probe == "batchnorm" else num_layers, **fitted,
            "feature_extraction_s": round(extraction_s, 2), "fit_s": round(time.perf_counter() - probe_start, 2),
        }
        if any(isinstance(v, float) and math.isnan(v) for v in results[probe].values()):
            raise RuntimeError(f"The probe produced NaN: {results[probe]}")
    return results


def run_probe(args: ProbeArguments) -> dict:
    """Extract features for train and test once, fit `args.probe`, and return the JSON-ready result (also written
    to `args.output_file` when given)."""
    start = time.perf_counter()
    output = {**run_probes(args, (args.probe,))[args.probe], "total_s": 0.0, "args": asdict(args)}
    output["total_s"] = round(time.perf_counter() - start, 2)
    if args.output_file:
        Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_file).write_text(json.dumps(output, indent=2))
    return output
