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

Metrics are the project's local `evaluate` modules (`modeling_ijepa/metrics/`), loaded by path, so evaluation runs
offline. The work is `modeling_ijepa.finetuning.finetune`.

Exit codes: 0 done, 2 bad arguments (one `finetune.py: error: ...` line each, checked by
`finetuning.validate_finetune_arguments` before any data is read or any model loaded).
"""

from __future__ import annotations

import logging
import os
import sys

import datasets
import transformers
from transformers import TrainingArguments

from modeling_ijepa.finetuning import DataTrainingArguments, ModelArguments, finetune, validate_finetune_arguments
from modeling_ijepa.training.validation import ArgumentError, exit_for_bad_arguments, parse_command_line

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None):
    """The three argument dataclasses, checked: bad arguments raise `ArgumentError` before any data or model."""
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_command_line((ModelArguments, DataTrainingArguments, TrainingArguments), argv)
    validate_finetune_arguments(*arguments)
    return arguments


def setup_logging(training_args: TrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logging.getLogger("modeling_ijepa").setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)


def main(argv: list[str] | None = None) -> dict:
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ArgumentError as error:  # one line per bad argument, exit 2, no traceback
        exit_for_bad_arguments(error, os.path.basename(sys.argv[0]))
    setup_logging(training_args)
    logger.info("Training/evaluation parameters %s", training_args)
    return finetune(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
