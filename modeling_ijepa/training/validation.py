"""Checks of the run arguments before any data is read or any model is built.

`validate_arguments(model_args, data_args, run_args)` runs first in `loop.pretrain` and in `scripts/pretrain.py`
(before the Accelerator is made), so a typo fails in a second with a message instead of minutes later inside torch.
Every problem is one line naming the argument, the value given and what is allowed; all problems are reported at
once (`ArgumentError.problems`). Checks that need the launched world size (`validate_world_size`) run in
`loop.pretrain` right after the launch check, still before data or model.

The last section holds what the fine-tuning and probe commands share (`finetuning.validate_finetune_arguments`,
`probe_run.validate_probe_arguments`): the one-line command-line parser, the exit-2 report, and checks of paths and
I-JEPA checkpoints that read at most a config.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from .arguments import DataTrainingArguments, ModelArguments, PretrainingArguments
from ..cuda_settings import SDPA_BACKEND_NAMES

# Accelerate's `PrecisionType` and `LoggerType` values (kept here so the check needs no accelerate import).
MIXED_PRECISION_NAMES = ("no", "fp16", "bf16", "fp8", "auto")  # auto: `precision.choose_mixed_precision`
TRACKER_NAMES = (
    "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab", "aim", "all", "none",
)
CHECKPOINT_VERIFICATION_MODES = ("fast", "full")


class ArgumentError(ValueError):
    """Arguments that cannot make a run; `problems` holds one line per bad argument."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _flag(name: str, value) -> str:
    shown = " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
    return f"--{name} {shown}"


class _Problems:
    """Collects one line per failed check: `--name value: what is allowed`."""

    def __init__(self, *argument_objects):
        self.objects, self.lines = argument_objects, []

    def value(self, name: str):
        for arguments in self.objects:
            if hasattr(arguments, name):
                return getattr(arguments, name)
        raise AttributeError(name)

    def require(self, name: str, ok: bool, allowed: str) -> None:
        if not ok:
            self.lines.append(f"{_flag(name, self.value(name))}: {allowed}")

    def at_least(self, name: str, low, allowed: str | None = None, optional: bool = False) -> None:
        value = self.value(name)
        if optional and value is None:
            return
        self.require(name, value is not None and value >= low, allowed or f"must be >= {low}")

    def in_range(self, name: str, low: float, high: float, what: str) -> None:
        value = self.value(name)
        self.require(name, low <= value <= high, f"must be in [{low:g}, {high:g}] ({what})")


def check_run_length(p: _Problems) -> None:
    p.at_least("per_device_train_batch_size", 1, "must be a positive number of images per process")
    p.at_least("gradient_accumulation_steps", 1, "must be a positive number of micro-batches per optimizer step")
    p.require("num_train_epochs", p.value("num_train_epochs") > 0, "must be positive")
    max_steps = p.value("max_steps")
    p.require("max_steps", max_steps == -1 or max_steps >= 1, "must be a positive number of optimizer steps, or -1 "
              "to train for --num_train_epochs")
    p.at_least("num_train_samples", 1, "must be a positive number of samples per epoch (or absent)", optional=True)
    p.at_least("warmup_steps", 0, "must be >= 0 optimizer steps (or absent to use --warmup_epochs)", optional=True)
    if p.value("warmup_steps") is None and p.value("num_train_epochs") > 0:  # else the epochs' own error says it
        p.require("warmup_epochs", 0 <= p.value("warmup_epochs") <= p.value("num_train_epochs"),
                  f"must be in [0, --num_train_epochs {p.value('num_train_epochs'):g}] (a longer warmup never reaches "
                  "the peak learning rate; pass a smaller --warmup_epochs or --warmup_steps)")
    p.require("ipe_scale", p.value("ipe_scale") >= 1.0, "must be >= 1 (below 1 the cosine schedules end before the "
              "run and the EMA momentum passes its end value; official configs use 1.0 or 1.25)")


def check_optimization(p: _Problems) -> None:
    p.require("learning_rate", p.value("learning_rate") is None or p.value("learning_rate") > 0,
              "must be positive (or absent to scale --base_learning_rate with the batch)")
    p.require("base_learning_rate", p.value("base_learning_rate") > 0, "must be positive")
    for name in ("start_lr", "final_lr", "weight_decay", "final_weight_decay", "max_grad_norm",
                 "color_jitter_strength"):
        p.at_least(name, 0, "must be >= 0" + (" (0 disables clipping)" if name == "max_grad_norm" else ""))
    p.at_least("reference_batch_size", 1, "must be a positive global batch size")
    for name in ("ema_momentum_start", "ema_momentum_end"):
        p.in_range(name, 0.0, 1.0, "an EMA momentum: 0 copies the context encoder, 1 freezes the target encoder")
    p.at_least("ema_momentum_ramp_steps", 0, "must be >= 0 optimizer steps (or absent for the official ramp)",
               optional=True)
    start, end = p.value("ema_momentum_start"), p.value("ema_momentum_end")
    p.require("ema_momentum_end", not (0 <= start <= 1 and 0 <= end <= 1) or start <= end,
              f"must be >= --ema_momentum_start {start} (the I-JEPA momentum rises towards 1; official 0.996 -> 1.0)")
    check_adam(p)
    crop = p.value("crop_scale")
    p.require("crop_scale", len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1,
              "must be two numbers MIN MAX with 0 < MIN <= MAX <= 1 (fractions of the image area, official 0.3 1.0)")


def check_bookkeeping(p: _Problems) -> None:
    p.at_least("logging_steps", 1, "must be a positive number of optimizer steps")
    p.at_least("checkpointing_steps", 1, "must be a positive number of optimizer steps (or absent: save at the end "
               "only)", optional=True)
    p.at_least("save_total_limit", 1, "must be a positive number of checkpoints to keep (or absent to keep all)",
               optional=True)
    p.at_least("shuffle_buffer_size", 1, "must be a positive number of records (1 keeps the file order)")
    p.at_least("dataloader_num_workers", -1, "must be >= -1 (0: the training process decodes, -1: automatic)")
    p.at_least("distributed_timeout_seconds", 1, "must be a positive number of seconds (how long a collective waits "
               "for a lost peer)")
    p.at_least("preemption_check_steps", 1, "must be a positive number of optimizer steps (or absent: every "
               "--logging_steps)", optional=True)
    precision = p.value("mixed_precision")
    p.require("mixed_precision", precision is None or precision in MIXED_PRECISION_NAMES,
              f"must be one of {', '.join(MIXED_PRECISION_NAMES)}")
    unknown = [name for name in p.value("report_to").split(",") if name.strip() not in TRACKER_NAMES]
    p.require("report_to", not unknown, f"{', '.join(map(repr, unknown))} is not a tracker; use a comma-separated "
              f"list of {', '.join(TRACKER_NAMES)}")
    p.require("checkpoint_verification", p.value("checkpoint_verification") in CHECKPOINT_VERIFICATION_MODES,
              f"must be one of {', '.join(CHECKPOINT_VERIFICATION_MODES)}")
    bad_signals = [name for name in signal_names(p.value("save_on_signal")) if not hasattr(signal, name)]
    p.require("save_on_signal", not bad_signals, f"{', '.join(bad_signals)} is not a signal of this system; use "
              "names such as SIGUSR1, SIGUSR2, SIGINT, SIGHUP (SIGTERM is always handled)")
    unusable = [name for name in signal_names(p.value("save_on_signal")) if name in UNHANDLEABLE_SIGNALS]
    p.require("save_on_signal", not unusable, f"{', '.join(unusable)} cannot ask for a save (SIGKILL and SIGSTOP cannot "
              "be caught; torch's DataLoader uses SIGCHLD); use SIGUSR1, SIGUSR2 or SIGHUP")
    p.require("dataset_name", bool(p.value("dataset_name")), "must name a Hub dataset or a local path")
    p.at_least("gc_collect_steps", 0, "must be >= 0 (0: Python's automatic garbage collector)")
    backends = [name.strip() for name in (p.value("sdpa_backends") or "").split(",") if name.strip()]
    p.require("sdpa_backends", all(name in SDPA_BACKEND_NAMES for name in backends),
              f"must be a comma-separated order of {', '.join(SDPA_BACKEND_NAMES)}")


# Signals a --save_on_signal handler can never serve: the kernel does not deliver the first two to handlers, and torch's
# DataLoader installs its own SIGCHLD handler to notice dead workers.
UNHANDLEABLE_SIGNALS = ("SIGKILL", "SIGSTOP", "SIGCHLD")


def signal_names(text: str | None) -> list[str]:
    """'SIGUSR1,usr2' -> ['SIGUSR1', 'SIGUSR2']: the signals of --save_on_signal (SIGTERM, SIGINT always handled)."""
    names = [name.strip().upper() for name in (text or "").split(",") if name.strip()]
    return [name if name.startswith("SIG") else f"SIG{name}" for name in names]


def check_model_config(p: _Problems, model_args: ModelArguments) -> None:
    """Mask scales and counts, image and patch sizes: the config's own `validate_ijepa` (run at construction).
    A `--model_name_or_path` that is not a local folder is a Hub download: it is checked when the model is built."""
    from huggingface_hub.errors import StrictDataclassError

    from .building import build_config

    if model_args.model_name_or_path and not Path(model_args.model_name_or_path).exists():
        return
    try:
        build_config(model_args)
    except (ValueError, TypeError, StrictDataclassError) as error:  # @strict wraps validate_ijepa's ValueError
        cause = error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ else error
        problem = " ".join(str(cause).split()) or type(cause).__name__
        flag = "--config_overrides" if model_args.config_overrides else "--config_name"
        value = model_args.config_overrides or model_args.config_name
        p.lines.append(f"{flag} {value}: {problem}")


def validate_arguments(model_args: ModelArguments, data_args: DataTrainingArguments,
                       run_args: PretrainingArguments) -> None:
    """Raise `ArgumentError` (one line per bad argument) if these arguments cannot make a run; reads no data and
    builds no model (only the config)."""
    problems = _Problems(run_args, data_args, model_args)
    check_run_length(problems)
    check_optimization(problems)
    check_bookkeeping(problems)
    check_model_config(problems, model_args)
    if problems.lines:
        raise ArgumentError(problems.lines)


def validate_world_size(run_args: PretrainingArguments, data_args: DataTrainingArguments, world_size: int,
                        resume_path: Path | None) -> None:
    """Checks that need the launched world size, before data or model: a known epoch must hold one global batch,
    and a resumed checkpoint must come from as many processes unless --ignore_data_skip."""
    global_batch = run_args.per_device_train_batch_size * world_size * run_args.gradient_accumulation_steps
    samples = data_args.num_train_samples
    problems = []
    if samples is not None and run_args.max_steps <= 0 and samples < global_batch:
        problems.append(
            f"--num_train_samples {samples}: must be >= one global batch of {global_batch} "
            f"(--per_device_train_batch_size {run_args.per_device_train_batch_size} x {world_size} processes x "
            f"--gradient_accumulation_steps {run_args.gradient_accumulation_steps}); lower the batch or pass --max_steps"
        )
    if resume_path is not None and not run_args.ignore_data_skip:
        from .checkpoints import TRAINER_STATE_NAME

        saved_world = int(json.loads((resume_path / TRAINER_STATE_NAME).read_text()).get("world_size", world_size))
        if saved_world != world_size:
            problems.append(
                f"--resume_from_checkpoint {resume_path}: written by {saved_world} processes, this launch has "
                f"{world_size}; relaunch with {saved_world} processes, or pass --ignore_data_skip to continue with a "
                "fresh data order (batches then differ from an uninterrupted run)"
            )
    if problems:
        raise ArgumentError(problems)


# ---------------------------------------------------------------------------------------------------------------------
# Shared by the fine-tuning and probe commands: parsing, the exit-2 report, paths and checkpoints


ARGUMENT_ERROR_EXIT_CODE = 2  # argparse's
CONFIG_FILE = "config.json"  # transformers' CONFIG_NAME
IJEPA_MODEL_TYPE = "ijepa"  # `IJepaConfig.model_type`, the same in transformers and here
Problems = _Problems  # the line collector, for the other commands' checks


def parse_command_line(dataclass_types: tuple, argv: list[str]) -> tuple:
    """The dataclasses from `argv`, or from one .json/.yaml file. argparse's errors (a bad type, an unknown choice,
    a missing argument) exit 2 with one line instead of the usage; a value a dataclass refuses in its own
    `__post_init__` (TrainingArguments') or an unknown key raises `ArgumentError` with that message on one line."""
    from transformers import HfArgumentParser

    class OneLineErrorParser(HfArgumentParser):
        def error(self, message: str) -> NoReturn:
            self.exit(ARGUMENT_ERROR_EXIT_CODE, f"{self.prog}: error: {message} (--help lists the arguments)\n")

    parser = OneLineErrorParser(dataclass_types)
    try:
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            if not Path(argv[0]).is_file():
                raise ArgumentError([f"{argv[0]}: no such arguments file"])
            read = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
            return read(os.path.abspath(argv[0]))
        return parser.parse_args_into_dataclasses(args=argv)
    except ArgumentError:
        raise
    except ValueError as error:
        raise ArgumentError([" ".join(str(error).split())]) from None


def exit_for_bad_arguments(error: ArgumentError, prog: str) -> NoReturn:
    """`<prog>: error: <problem>` on stderr, one line per problem (by the first launched process only), exit 2."""
    if os.environ.get("RANK", "0") == "0":  # set by the launcher; absent in a single-process run
        print("\n".join(f"{prog}: error: {line}" for line in error.problems), file=sys.stderr)
    raise SystemExit(ARGUMENT_ERROR_EXIT_CODE)


def check_adam(p: _Problems) -> None:
    """AdamW's betas and epsilon (pretraining and fine-tuning)."""
    p.require("adam_beta1", 0 <= p.value("adam_beta1") < 1, "must be in [0, 1)")
    p.require("adam_beta2", 0 <= p.value("adam_beta2") < 1, "must be in [0, 1)")
    p.require("adam_epsilon", p.value("adam_epsilon") > 0, "must be positive")


def hub_or_local_problem(value: str, cache_file: str | None = None, cache_dir: str | None = None) -> str | None:
    """Why `value` is neither an existing local path nor a Hub id, or None. With HF_HUB_OFFLINE set, a Hub id must
    be in the local cache (`cache_file`: a file its repository holds); online it is checked when downloaded."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(value).exists():
        return None
    try:
        validate_repo_id(value)
    except HFValidationError:
        return "no such file or folder (and not a Hub id, which is 'name' or 'owner/name')"
    if cache_file and is_offline_mode() and not isinstance(try_to_load_from_cache(value, cache_file, cache_dir), str):
        return "no such folder, and not in the Hub cache (HF_HUB_OFFLINE is set: nothing can be downloaded)"
    return None


def checkpoint_config(value: str, cache_dir: str | None = None) -> tuple[dict | None, str | None]:
    """(config.json of checkpoint `value`, None), or (None, what is wrong with it); (None, None) for a Hub id that
    is checked when downloaded. Reads config.json only, never the weights."""
    from huggingface_hub import try_to_load_from_cache

    problem = hub_or_local_problem(value, CONFIG_FILE, cache_dir)
    if problem is not None:
        return None, problem
    path = Path(value)
    if path.is_file():
        return None, f"is a file; give the checkpoint's folder (the one holding {CONFIG_FILE})"
    if path.is_dir():
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            return None, (f"has no {CONFIG_FILE}: not a model folder (give a pretraining --output_dir, written when "
                          "the run ends: its checkpoint-N folders hold only the training state; or an encoder)")
    else:
        cached = try_to_load_from_cache(value, CONFIG_FILE, cache_dir)
        if not isinstance(cached, str):
            return None, None  # a Hub id, downloaded later
        config_file = Path(cached)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        return None, f"its {CONFIG_FILE} cannot be read ({error})"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != IJEPA_MODEL_TYPE:
        return None, f"is a {model_type!r} checkpoint, not I-JEPA (its {CONFIG_FILE} must say model_type 'ijepa')"
    return config, None


def check_ijepa_checkpoint(p: _Problems, name: str, cache_dir: str | None = None) -> dict | None:
    """--name must be an I-JEPA checkpoint (local folder or Hub id); returns its config when it could be read."""
    value = p.value(name)
    if value is None:
        return None
    config, problem = checkpoint_config(value, cache_dir)
    if problem is not None:
        p.lines.append(f"--{name} {value}: {problem}")
    return config


def check_hub_or_local(p: _Problems, name: str, cache_file: str | None = None, cache_dir: str | None = None) -> None:
    value = p.value(name)
    problem = None if value is None else hub_or_local_problem(value, cache_file, cache_dir)
    if problem is not None:
        p.lines.append(f"--{name} {value}: {problem}")


def check_dataset_folder_or_hub(p: _Problems, name: str) -> None:
    """--name is what `datasets.load_dataset(name)` takes: a local dataset folder or a Hub id (no file, no glob)."""
    value = p.value(name)
    if value is not None and Path(value).is_file():
        p.lines.append(f"--{name} {value}: is a file; give the folder holding it (or a Hub dataset id)")
    else:
        check_hub_or_local(p, name)


def check_existing_folder(p: _Problems, name: str) -> None:
    """--name, when given, must be an existing folder (read, not written)."""
    value = p.value(name)
    if value is not None and not Path(value).is_dir():
        problem = "is a file; give a folder" if Path(value).exists() else "no such folder"
        p.lines.append(f"--{name} {value}: {problem}")


def check_output_path(p: _Problems, name: str, folder: bool) -> None:
    """--name is written to: a folder (created if missing) or a file; refuse a path of the other kind, or one that
    cannot be created because a file stands where a parent folder must be."""
    value = p.value(name)
    if value is None:
        return
    path = Path(value)
    if folder and path.exists() and not path.is_dir():
        p.lines.append(f"--{name} {value}: is a file; give a folder (it is created if missing)")
    elif not folder and path.is_dir():
        p.lines.append(f"--{name} {value}: is a folder; give a file path")
    else:
        blocking = next((parent for parent in path.parents if parent.exists()), None)
        if blocking is not None and not blocking.is_dir():
            p.lines.append(f"--{name} {value}: cannot be created: {blocking} is a file, not a folder")
