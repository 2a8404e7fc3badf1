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
"""

from __future__ import annotations

import logging
import os
import sys

import datasets
import transformers
from transformers import HfArgumentParser, TrainingArguments

from modeling_ijepa.finetuning import DataTrainingArguments, ModelArguments, finetune

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


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
    except ValueError as error:  # an argument a dataclass refused: one line, no traceback
        raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {error}") from None
    setup_logging(training_args)
    logger.info("Training/evaluation parameters %s", training_args)
    return finetune(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
