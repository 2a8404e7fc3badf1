#!/usr/bin/env python
"""Fine-tune an I-JEPA encoder for image classification with `Trainer` (or train only a linear head on it).

Follows the conventions of transformers' `examples/pytorch/image-classification/run_image_classification.py`:
argument dataclasses parsed by `HfArgumentParser` (command line, or one `.json`/`.yaml` file), every
`TrainingArguments` flag, `all_results.json` in `--output_dir`.

`--model_name_or_path` may be a pretraining directory of this project (`IJepaForPreTraining`: the EMA *target*
encoder is loaded, the encoder the paper evaluates), an exported encoder, a plain transformers `ijepa` checkpoint, or
a Hub id. The saved result is a standard `ijepa` image classifier: plain transformers loads it with
`AutoModelForImageClassification.from_pretrained(output_dir)`.

Examples:

    # fine-tune everything on a local image folder (one sub-folder per class)
    python scripts/finetune.py --model_name_or_path runs/pretrain --train_dir data/train --validation_dir data/val \
        --output_dir runs/finetune --do_train --do_eval --num_train_epochs 5 --learning_rate 1e-4

    # linear probing through Trainer: only the classification head trains
    python scripts/finetune.py --model_name_or_path runs/pretrain --dataset_name data/fashion_mnist \
        --freeze_encoder --output_dir runs/probe --do_train --do_eval --learning_rate 1e-2

Metrics are the project's local `evaluate` modules (`metrics/accuracy`, `metrics/top5_accuracy`), loaded by path,
so evaluation runs offline.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
import transformers
from datasets import ClassLabel, load_dataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

import modeling_ijepa  # noqa: F401  (registers the I-JEPA classes with the Auto classes)
from modeling_ijepa.evaluation import default_image_processor, image_transform_from_processor

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"
# Top-5 accuracy is reported only when it is informative, i.e. with more than five classes.
TOP_K = 5


@dataclass
class ModelArguments:
    """Which checkpoint to start from."""

    model_name_or_path: str = field(
        metadata={
            "help": "Pretraining directory (IJepaForPreTraining; its EMA target encoder is used), exported encoder, "
            "transformers `ijepa` checkpoint or Hub id."
        }
    )
    image_processor_name: str | None = field(
        default=None,
        metadata={"help": "Image processor to use instead of the checkpoint's (name or path)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache models/datasets from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private checkpoints/datasets."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom code from the checkpoint repository."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a classification head of another size (e.g. fine-tuning a fine-tuned model)."},
    )
    freeze_encoder: bool = field(
        default=False,
        metadata={"help": "Linear probing: freeze the encoder (no gradients, eval mode) and train only the head."},
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, or a local dataset directory (image folder, parquet/arrow files, script)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder of training images (class sub-dirs)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder of validation images."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of train held out for evaluation when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set (debugging)."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None and self.validation_dir is None:
            raise ValueError("Give --dataset_name, or --train_dir (and optionally --validation_dir).")
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")


def load_image_dataset(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    """Train/validation splits from a Hub id, a local dataset directory, or image folders."""
    if data_args.dataset_name is not None:
        dataset = load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    else:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    if "validation" not in dataset and "train" in dataset:
        # As run_image_classification.py: hold out part of train (a "test" split, if any, stays untouched).
        logger.info("No validation split: holding out %.0f%% of train for evaluation.", 100 * data_args.train_val_split)
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=0)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    for name, split in dataset.items():
        for column in (data_args.image_column_name, data_args.label_column_name):
            if column not in split.column_names:
                raise ValueError(
                    f"Split {name!r} has no column {column!r} (columns: {split.column_names}); set "
                    "--image_column_name/--label_column_name."
                )
    return dataset


def class_names(dataset: datasets.DatasetDict, label_column: str) -> tuple[datasets.DatasetDict, list[str]]:
    """The label names, turning string or integer labels into a `ClassLabel` column first."""
    any_split = next(iter(dataset.values()))
    feature = any_split.features[label_column]
    if isinstance(feature, ClassLabel):
        return dataset, list(feature.names)
    values = sorted({value for split in dataset.values() for value in split[label_column]})
    if all(isinstance(value, (int, np.integer)) for value in values):
        if values[0] < 0:
            raise ValueError(f"Integer labels must be class ids >= 0, found {values[0]}.")
        names = [str(i) for i in range(int(values[-1]) + 1)]
    else:
        names = [str(value) for value in values]
    dataset = dataset.cast_column(label_column, ClassLabel(names=names))
    return dataset, names


def load_image_processor(model_args: ModelArguments, config):
    name = model_args.image_processor_name or model_args.model_name_or_path
    try:
        return AutoImageProcessor.from_pretrained(
            name, cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
        )
    except OSError:
        if model_args.image_processor_name is not None:
            raise
        processor = default_image_processor(config.image_size, config.num_channels)
        logger.warning(
            "%s has no image processor (preprocessor_config.json); using a default ViT processor: %dx%d, mean %s, "
            "std %s. It is saved with the fine-tuned model.",
            name, processor.size["height"], processor.size["width"], processor.image_mean, processor.image_std,
        )
        return processor


def make_transform(image_transform, image_column: str, label_column: str):
    def apply(batch):
        return {
            "pixel_values": [image_transform(image) for image in batch[image_column]],
            "labels": batch[label_column],
        }

    return apply


def collate_fn(examples):
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def compute_metrics_fn(num_labels: int):
    accuracy = evaluate.load(str(METRICS_DIR / "accuracy"))
    top_k = evaluate.load(str(METRICS_DIR / "top5_accuracy")) if num_labels > TOP_K else None

    def compute_metrics(eval_prediction):
        logits = eval_prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        references = eval_prediction.label_ids
        metrics = accuracy.compute(predictions=np.argmax(logits, axis=1), references=references)
        if top_k is not None:
            metrics.update(top_k.compute(predictions=logits, references=references, k=TOP_K))
        return metrics

    return compute_metrics


def _keep_in_eval_mode(module, args):
    if module.training:
        module.eval()


def freeze_encoder(model) -> list[str]:
    """Freeze everything but the classification head; returns the names of the parameters left trainable."""
    encoder = model.base_model
    encoder.requires_grad_(False)
    # Trainer puts the whole model in train mode every step; a frozen encoder must give its eval-mode features
    # (no dropout / drop-path), so it is switched back right before each of its forwards.
    encoder.register_forward_pre_hook(_keep_in_eval_mode)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    if not trainable:
        raise ValueError("Freezing the encoder left no trainable parameter: the model has no classification head.")
    return trainable


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    logger.info("Training/evaluation parameters %s", training_args)
    # The image column is consumed by our transform; Trainer must not drop it before.
    training_args.remove_unused_columns = False

    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info("Checkpoint found in %s: resuming from it.", last_checkpoint)
    set_seed(training_args.seed)

    dataset = load_image_dataset(data_args, model_args)
    dataset, labels = class_names(dataset, data_args.label_column_name)
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = {i: label for i, label in enumerate(labels)}

    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(labels),
        label2id=label2id,
        id2label=id2label,
        finetuning_task="image-classification",
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    if model_args.freeze_encoder:
        trainable = freeze_encoder(model)
        logger.info("Encoder frozen; training only %s.", trainable)
    image_processor = load_image_processor(model_args, config)

    # Train: random resized crop + flip; eval: the processor's resize / center crop; both with its resample,
    # rescale and mean/std (as run_image_classification.py).
    train_transform = image_transform_from_processor(image_processor, train=True, num_channels=config.num_channels)
    eval_transform = image_transform_from_processor(image_processor, train=False, num_channels=config.num_channels)
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train needs a train split (--dataset_name with one, or --train_dir).")
        if data_args.max_train_samples is not None:
            dataset["train"] = dataset["train"].shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
        dataset["train"].set_transform(make_transform(train_transform, image_column, label_column))
    if training_args.do_eval:
        if "validation" not in dataset:
            raise ValueError("--do_eval needs a validation split (--validation_dir, or a train split to hold out from).")
        if data_args.max_eval_samples is not None:
            dataset["validation"] = dataset["validation"].shuffle(seed=training_args.seed).select(
                range(data_args.max_eval_samples)
            )
        dataset["validation"].set_transform(make_transform(eval_transform, image_column, label_column))

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics_fn(len(labels)),
        processing_class=image_processor,
        data_collator=collate_fn,
    )

    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    metrics = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    card = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "image-classification",
        "tags": ["image-classification", "vision", "ijepa"] + (["linear-probe"] if model_args.freeze_encoder else []),
    }
    if data_args.dataset_name is not None:
        card["dataset_tags"] = data_args.dataset_name
        card["dataset"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            card["dataset_args"] = data_args.dataset_config_name
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    return metrics


if __name__ == "__main__":
    main()
