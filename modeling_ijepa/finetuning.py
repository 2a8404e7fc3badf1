"""Fine-tuning an I-JEPA encoder for image classification with `Trainer`: the engine of `scripts/finetune.py`.

`finetune(model_args, data_args, training_args) -> metrics` follows transformers'
`run_image_classification.py`: a dataset (Hub id, local dataset directory or image folders) with a validation split
held out when there is none, labels as a `ClassLabel`, the checkpoint's image processor for both transforms (random
resized crop + flip to train, its resize/center crop to evaluate), offline metrics from `modeling_ijepa/metrics/`,
`Trainer` for the loop, resume and the model card. Needs the `train` extra (datasets, evaluate, torchvision).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
from datasets import ClassLabel, load_dataset
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from .evaluation import default_image_processor, image_transform_from_processor
from .training.validation import (
    ArgumentError,
    Problems,
    check_adam,
    check_dataset_folder_or_hub,
    check_existing_folder,
    check_hub_or_local,
    check_ijepa_checkpoint,
    check_output_path,
)

logger = logging.getLogger(__name__)

# The project's own `evaluate` modules (package data), loaded by path so evaluation runs offline.
METRICS_DIR = Path(__file__).resolve().parent / "metrics"
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


# ---------------------------------------------------------------------------------------------------------------------
# Bad arguments: one line each, before any data is read or any model loaded


def check_finetune_sources(p: Problems, data_args: DataTrainingArguments, training_args: TrainingArguments) -> None:
    """Where the images come from, and whether there is something to do with them."""
    folders = data_args.train_dir is not None or data_args.validation_dir is not None
    if data_args.dataset_name is None and not folders:
        p.lines.append("--dataset_name/--train_dir: neither is given; give --dataset_name (a Hub id or a local "
                       "dataset folder), or --train_dir image folders (and optionally --validation_dir)")
    elif data_args.dataset_name is not None and folders:
        name = "train_dir" if data_args.train_dir is not None else "validation_dir"
        p.lines.append(f"--{name} {p.value(name)}: conflicts with --dataset_name {data_args.dataset_name} (its own "
                       "splits would be used and the folders ignored); give one of them")
    elif training_args.do_train and data_args.dataset_name is None and data_args.train_dir is None:
        p.lines.append(f"--do_train: needs training images, but only --validation_dir {data_args.validation_dir} is "
                       "given; add --train_dir, or drop --do_train to only evaluate")
    if not training_args.do_train and not training_args.do_eval:
        p.lines.append("--do_train/--do_eval: neither is set, so nothing would run; pass --do_train, --do_eval or "
                       "both (an --eval_strategy other than 'no' also sets --do_eval)")
    check_dataset_folder_or_hub(p, "dataset_name")
    check_existing_folder(p, "train_dir")
    check_existing_folder(p, "validation_dir")
    p.require("train_val_split", 0 < data_args.train_val_split < 1, "must be in (0, 1) (the fraction of train held "
              "out for evaluation when there is no validation split; default 0.15)")
    p.at_least("max_train_samples", 1, "must be a positive number of images (or absent: all)", optional=True)
    p.at_least("max_eval_samples", 1, "must be a positive number of images (or absent: all)", optional=True)


def check_finetune_optimization(p: Problems, training_args: TrainingArguments) -> None:
    """The `TrainingArguments` values `TrainingArguments` itself accepts but `Trainer` fails on (or silently
    misreads) after the data and the model are loaded."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        p.at_least(name, 1, "must be a positive number of images per device")
    p.at_least("gradient_accumulation_steps", 1, "must be a positive number of batches per optimizer step")
    p.require("learning_rate", training_args.learning_rate > 0, "must be positive")
    p.require("max_steps", training_args.max_steps == -1 or training_args.max_steps >= 1,
              "must be a positive number of optimizer steps, or -1 to train for --num_train_epochs")
    if training_args.max_steps == -1:
        p.require("num_train_epochs", training_args.num_train_epochs > 0, "must be positive (or give --max_steps)")
    p.at_least("weight_decay", 0, "must be >= 0")
    p.at_least("max_grad_norm", 0, "must be >= 0 (0 disables clipping)", optional=True)
    p.at_least("dataloader_num_workers", 0, "must be >= 0 (0: the main process loads the images)")
    check_adam(p)


def validate_finetune_arguments(model_args: ModelArguments, data_args: DataTrainingArguments,
                                training_args: TrainingArguments) -> None:
    """Raise `ArgumentError` (one line per bad argument, all at once) if these arguments cannot make a fine-tuning
    run. Reads at most the checkpoint's config.json: no data, no weights. The image and label column names can only
    be checked once the dataset is loaded (`load_image_dataset` does it first thing)."""
    p = Problems(model_args, data_args, training_args)
    check_finetune_sources(p, data_args, training_args)
    check_ijepa_checkpoint(p, "model_name_or_path", model_args.cache_dir)
    check_hub_or_local(p, "image_processor_name", "preprocessor_config.json", model_args.cache_dir)
    check_finetune_optimization(p, training_args)
    check_output_path(p, "output_dir", folder=True)
    check_existing_folder(p, "resume_from_checkpoint")
    if p.lines:
        raise ArgumentError(p.lines)


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


def build_classifier(model_args: ModelArguments, labels: list[str]):
    """The classifier (encoder from the checkpoint, a new head of `len(labels)` classes) and its config."""
    import modeling_ijepa  # noqa: F401  (registers the I-JEPA classes with the Auto classes)

    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token,
           "trust_remote_code": model_args.trust_remote_code}
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, num_labels=len(labels), label2id={label: i for i, label in enumerate(labels)},
        id2label=dict(enumerate(labels)), finetuning_task="image-classification", **hub,
    )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **hub,
    )
    if model_args.freeze_encoder:
        logger.info("Encoder frozen; training only %s.", freeze_encoder(model))
    return model, config


def prepare_splits(dataset, data_args: DataTrainingArguments, training_args: TrainingArguments, image_processor,
                   num_channels: int) -> None:
    """Truncate and attach the transforms (train: random resized crop + flip; eval: the processor's resize / center
    crop; both with its resample, rescale and mean/std, as run_image_classification.py)."""
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    for split, wanted, limit, train in (
        ("train", training_args.do_train, data_args.max_train_samples, True),
        ("validation", training_args.do_eval, data_args.max_eval_samples, False),
    ):
        if not wanted:
            continue
        if split not in dataset:
            raise ValueError(
                "--do_train needs a train split (--dataset_name with one, or --train_dir)." if train else
                "--do_eval needs a validation split (--validation_dir, or a train split to hold out from)."
            )
        if limit is not None:
            dataset[split] = dataset[split].shuffle(seed=training_args.seed).select(range(limit))
        transform = image_transform_from_processor(image_processor, train=train, num_channels=num_channels)
        dataset[split].set_transform(make_transform(transform, image_column, label_column))


def card_fields(model_args: ModelArguments, data_args: DataTrainingArguments) -> dict:
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
    return card


def train_and_evaluate(trainer: Trainer, training_args: TrainingArguments) -> dict:
    """`Trainer.train` (resuming from the newest checkpoint in output_dir, or --resume_from_checkpoint) and
    `Trainer.evaluate`, with their metrics logged and saved; returns the evaluation metrics."""
    if training_args.do_train:
        checkpoint = training_args.resume_from_checkpoint
        if checkpoint is None and os.path.isdir(training_args.output_dir):
            checkpoint = get_last_checkpoint(training_args.output_dir)
            if checkpoint is not None:
                logger.info("Checkpoint found in %s: resuming from it.", checkpoint)
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
    return metrics


def finetune(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments) -> dict:
    """Fine-tune (or, with --freeze_encoder, train a linear head on) an I-JEPA encoder; returns the eval metrics."""
    validate_finetune_arguments(model_args, data_args, training_args)  # before any data or model
    # The image column is consumed by our transform; Trainer must not drop it before.
    training_args.remove_unused_columns = False
    set_seed(training_args.seed)
    dataset = load_image_dataset(data_args, model_args)
    dataset, labels = class_names(dataset, data_args.label_column_name)
    model, config = build_classifier(model_args, labels)
    image_processor = load_image_processor(model_args, config)
    prepare_splits(dataset, data_args, training_args, image_processor, config.num_channels)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics_fn(len(labels)),
        processing_class=image_processor,
        data_collator=collate_fn,
    )
    metrics = train_and_evaluate(trainer, training_args)
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_fields(model_args, data_args))
    else:
        trainer.create_model_card(**card_fields(model_args, data_args))
    return metrics
