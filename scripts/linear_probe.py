#!/usr/bin/env python
"""The paper's frozen linear evaluation of an I-JEPA encoder on any `datasets` image-classification dataset.

Assran et al. (CVPR 2023), Sec. 5 / Appendix C: the target encoder is frozen, its average-pooled patch features are
extracted once, and a linear classifier is trained on them. The official repository never released this code; the
protocol here (standardised features, L2 sweep picked on a held-out part of train, full-batch L-BFGS or SGD) is
documented in `modeling_ijepa/evaluation.py` and `docs/evaluation.md`.

    python scripts/linear_probe.py --model_name_or_path runs/pretrain --dataset_name data/fashion_mnist \
        --max_train_samples 10000 --num_layers 1 --output_file runs/pretrain/linear_probe.json

`--model_name_or_path` is a pretraining directory (its EMA target encoder `ijepa.*` is probed), an encoder or a
transformers `ijepa` checkpoint. `--raw_pixels` probes the preprocessed pixels instead (the baseline every encoder
must beat). `--streaming` reads the dataset without materialising it. The result is printed and written as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from datasets import ClassLabel, load_dataset
from transformers import AutoImageProcessor, AutoModel, HfArgumentParser

import modeling_ijepa  # noqa: F401  (registers the I-JEPA classes with the Auto classes)
from modeling_ijepa.evaluation import (
    DEFAULT_WEIGHT_DECAYS,
    ProbeSettings,
    default_image_processor,
    extract_features,
    image_transform_from_processor,
    linear_probe,
)

logger = logging.getLogger(__name__)


@dataclass
class LinearProbeArguments:
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
    method: str = field(default="lbfgs", metadata={"help": "'lbfgs' (full batch) or 'sgd'."})
    weight_decays: list[float] = field(
        default_factory=lambda: list(DEFAULT_WEIGHT_DECAYS), metadata={"help": "L2 sweep picked on held-out train."}
    )
    validation_fraction: float = field(default=0.2, metadata={"help": "Part of train held out to pick the decay."})
    no_standardize: bool = field(default=False, metadata={"help": "Skip per-feature standardisation."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split and SGD order."})
    output_file: str | None = field(default=None, metadata={"help": "Where to write the JSON result."})

    def __post_init__(self):
        if (self.model_name_or_path is None) == (not self.raw_pixels):
            raise ValueError("Give either --model_name_or_path or --raw_pixels (exactly one).")


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


def features_for_split(encoder, dataset, transform, args: LinearProbeArguments, limit: int | None, num_layers: int):
    data = batches(dataset, transform, args.image_column_name, args.label_column_name, args.batch_size, limit)
    return extract_features(encoder, data, num_layers=num_layers, device=torch.device("cpu"))


def run_linear_probe(args: LinearProbeArguments) -> dict:
    """Extract features for train and test once, fit the probe, and return the JSON-ready result."""
    start = time.perf_counter()
    if args.raw_pixels:
        encoder = PixelEncoder()
        processor = load_processor(args.image_processor_name, image_size=args.image_size, num_channels=1)
        num_channels = len(processor.image_mean)
        num_layers = 1
    else:
        encoder = AutoModel.from_pretrained(args.model_name_or_path)
        processor = load_processor(args.image_processor_name or args.model_name_or_path, encoder.config)
        num_channels = encoder.config.num_channels
        num_layers = args.num_layers
    encoder.eval()
    # Every field of the processor (resize, center crop, resample, rescale, mean/std), as finetune.py evaluates.
    transform = image_transform_from_processor(processor, train=False, num_channels=num_channels)

    train = load_dataset(args.dataset_name, args.dataset_config_name, split=args.train_split, streaming=args.streaming)
    test = load_dataset(args.dataset_name, args.dataset_config_name, split=args.test_split, streaming=args.streaming)
    label_feature = (train.features or {}).get(args.label_column_name)
    num_classes = label_feature.num_classes if isinstance(label_feature, ClassLabel) else None
    train_x, train_y = features_for_split(encoder, train, transform, args, args.max_train_samples, num_layers)
    test_x, test_y = features_for_split(encoder, test, transform, args, args.max_test_samples, num_layers)
    extraction_s = time.perf_counter() - start
    settings = ProbeSettings(
        method=args.method, weight_decays=tuple(args.weight_decays), validation_fraction=args.validation_fraction,
        standardize=not args.no_standardize, seed=args.seed,
    )
    result = linear_probe(train_x, train_y, test_x, test_y, num_classes=num_classes, settings=settings)
    output = {
        "model": "raw_pixels" if args.raw_pixels else args.model_name_or_path,
        "dataset": args.dataset_name,
        "train_split": args.train_split,
        "test_split": args.test_split,
        "num_layers": num_layers,
        **result.to_dict(),
        "feature_extraction_s": round(extraction_s, 2),
        "total_s": round(time.perf_counter() - start, 2),
        "args": asdict(args),
    }
    if any(isinstance(v, float) and math.isnan(v) for v in output.values()):
        raise RuntimeError(f"The probe produced NaN: {output}")
    return output


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    parser = HfArgumentParser(LinearProbeArguments)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        (args,) = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
    else:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    output = run_linear_probe(args)
    print(
        f"linear probe of {output['model']} on {args.dataset_name}: top-1 {100 * output['test_accuracy']:.2f}% "
        f"({output['num_test']} {args.test_split} images, {output['num_train']} {args.train_split} images, "
        f"{output['feature_dim']}-d features, weight decay {output['best_weight_decay']:g})"
    )
    if args.output_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with open(args.output_file, "w") as f:
            json.dump(output, f, indent=2)
    return output


if __name__ == "__main__":
    main()
