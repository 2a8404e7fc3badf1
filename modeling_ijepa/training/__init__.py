"""The training side of modeling_ijepa: arguments, schedules, data, checkpoints and the pretraining loop.

    from modeling_ijepa.training import parse_arguments, pretrain
    results = pretrain(*parse_arguments(["scripts/configs/tiny_fashion_mnist.yaml", "--max_steps", "20"]))

One module per concern, each importing only those listed before it:

* `schedules`   - learning rate, weight decay and EMA momentum as pure functions of the step (numbers in, numbers out);
* `arguments`   - the `HfArgumentParser` dataclasses of `scripts/pretrain.py` and their YAML/JSON loading;
* `fashion_mnist` - Debian's Fashion-MNIST exported as parquet shards (the offline demo data);
* `data`        - dataset loading with clear errors, sharding, decoding, augmentation, the batch stream;
* `building`    - config, model and optimizer parameter groups from the arguments;
* `checkpoints` - atomic checkpoint writes, listing, resume state;
* `publish`     - the model card and the Hub upload of a finished run;
* `step`        - one optimizer step and its logged metrics;
* `loop`        - `pretrain(model_args, data_args, run_args) -> results`.

The model files (`configuration_ijepa`, `modeling_ijepa`, `masking_ijepa`) never import this package: it needs the
`train` extra (`pip install "modeling-ijepa[train]"`), they need only torch and transformers.
"""

import importlib


def _missing_modules(names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


# The import names of the `train` extra's packages (pyyaml -> yaml, pillow comes with torchvision).
_TRAIN_EXTRA = ("accelerate", "datasets", "yaml", "tqdm", "PIL", "torchvision")
_missing = _missing_modules(_TRAIN_EXTRA)
if _missing:
    raise ImportError(
        f"modeling_ijepa.training needs {', '.join(_missing)}, which are not installed: install the training extra "
        "with `pip install \"modeling-ijepa[train]\"` (or `pip install -e \".[train]\"` in a checkout)."
    )

from .arguments import (  # noqa: E402
    DataTrainingArguments,
    ModelArguments,
    PretrainingArguments,
    arguments_from_file,
    parse_arguments,
    parse_config_overrides,
    resolve_learning_rates,
    resolve_schedules,
)
from .loop import TRAIN_LOG_NAME, PretrainingRun, TrainingStopped, pretrain  # noqa: E402
from .schedules import Schedules, learning_rate_at, weight_decay_at  # noqa: E402

__all__ = [
    "DataTrainingArguments",
    "ModelArguments",
    "PretrainingArguments",
    "PretrainingRun",
    "Schedules",
    "TRAIN_LOG_NAME",
    "TrainingStopped",
    "arguments_from_file",
    "learning_rate_at",
    "parse_arguments",
    "parse_config_overrides",
    "pretrain",
    "resolve_learning_rates",
    "resolve_schedules",
    "weight_decay_at",
]
