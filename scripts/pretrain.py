#!/usr/bin/env python
"""I-JEPA pretraining with Accelerate: the recipe of Assran et al. (CVPR 2023) on any `datasets` image dataset.

The model (`IJepaForPreTraining`) owns the forward pass, the loss and the EMA update of the target encoder; this
script orchestrates: data, masks, optimizer, schedules, checkpoints and logging. Behaviour follows the official
implementation (facebookresearch/ijepa `src/train.py`, `src/helper.py`, `src/utils/schedulers.py`,
`src/transforms.py`, `configs/*.yaml`); where this script differs it says so.

Launch (see docs/pretraining.md):

    # one process (CPU or one GPU)
    accelerate launch scripts/pretrain.py scripts/configs/tiny_fashion_mnist.yaml
    # 8 GPUs on one machine
    accelerate launch --multi_gpu --num_processes 8 scripts/pretrain.py scripts/configs/in1k_vith14_ep300.yaml
    # 2 CPU processes (real DDP over gloo)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/pretrain.py ...

Arguments come from the command line, from a YAML/JSON file given as the first argument, or both (the command line
wins). Names follow transformers' `run_mae.py` / `run_image_classification_no_trainer.py`.

Design notes:

* Schedules (learning rate, weight decay, EMA momentum) are pure functions of the global optimizer step, with the
  official step semantics (see `learning_rate_at`), so a resume needs only the step; no LR scheduler object is
  prepared by Accelerate (a prepared one would step `num_processes` times per optimizer step).
* Data: every process reads its own part of the dataset (`split_dataset_by_node`: whole files when there are at
  least as many files as processes), shuffles it with a buffer, reseeded every epoch. Images are decoded here (not
  by `datasets`) so that corrupt records are skipped and counted instead of crashing the run.
* Exact resume: crops are seeded per example from `(seed, rank, epoch, index in epoch)` and masks per batch from
  `(seed, rank, batch counter)` (`IJepaMaskCollator`, called in the main process), so they do not depend on which
  process or worker decoded what. A checkpoint stores, per process, the epoch and the number of records consumed in
  it; a resume re-reads the epoch's (deterministically shuffled) stream and skips that many records *before*
  decoding them (cheap compared with training on them). Batches and masks after a resume are those an
  uninterrupted run would have seen, so the final weights are the same.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

logger = logging.getLogger("pretrain")

# ---------------------------------------------------------------------------------------------------------------------
# Constants (each with where it comes from)

# Official configs: `data.batch_size: 128` per GPU on 16 GPUs (ViT-H/14, folder name `bs.2048`). The base learning
# rates below are for this global batch; other batches scale them linearly (see `resolve_learning_rates`).
PAPER_GLOBAL_BATCH_SIZE = 2048
# Training-set sizes used when the number of samples per epoch cannot be read from the dataset (streaming).
KNOWN_TRAIN_SIZES = {
    # ILSVRC-2012 train split: 1,281,167 images (both the Hub parquet copy and timm's webdataset copy).
    "ilsvrc/imagenet-1k": 1_281_167,
    "imagenet-1k": 1_281_167,
    "timm/imagenet-1k-wds": 1_281_167,
    # ImageNet-21k "fall11" release: 14,197,122 images in total (the official code has no IN-22k loader; check the
    # count of your copy and pass --num_train_samples if it differs).
    "timm/imagenet-22k-wds": 14_197_122,
}
CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = ".tmp-checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
RANK_STATE_NAME = "data_state_rank{rank}.json"
TRAIN_LOG_NAME = "train_log.jsonl"


def _decode_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# What PIL raises for truncated, unidentifiable or otherwise undecodable files: such records are skipped and counted.
DECODE_ERRORS = _decode_errors()


# ---------------------------------------------------------------------------------------------------------------------
# Arguments


@dataclass
class DataTrainingArguments:
    """What to train on."""

    dataset_name: str = field(
        default="ILSVRC/imagenet-1k",
        metadata={
            "help": "A Hub dataset id (default: ILSVRC/imagenet-1k, gated: accept its terms on the Hub and log in), or a "
            "local path that `datasets.load_dataset` understands (a folder of images, a folder of parquet/arrow "
            "files, or a parquet/arrow file or glob)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "The split to train on."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the images; auto-detected (first `Image` feature) when absent."}
    )
    streaming: bool = field(
        default=True, metadata={"help": "Stream the dataset instead of downloading/preparing it first."}
    )
    shuffle_buffer_size: int = field(
        default=10_000, metadata={"help": "Shuffle buffer of each process (plus a shuffle of the file order)."}
    )
    num_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Samples in one epoch, to turn --num_train_epochs into steps when the dataset size is not known "
            "(streaming datasets other than ImageNet-1k/22k)."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloads."})
    token: str | None = field(
        default=None, metadata={"help": "Hub token (default: the one from `hf auth login` or $HF_TOKEN)."}
    )


@dataclass
class ModelArguments:
    """Which model to pretrain."""

    config_name: str = field(
        default="vit-huge-14",
        metadata={"help": "A preset name (vit-huge-14, vit-large-16, tiny-cpu, ...) or a path to a config file/folder."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Override config fields: 'key=value,key=value', values as Python literals, e.g. "
            "'min_keep=4,target_block_scale=(0.15, 0.2),hidden_dropout_prob=0.0'."
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from an existing checkpoint (a folder or Hub id) instead of a fresh init."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention kernel of encoders and predictor: 'sdpa' (default), 'eager' or 'flash_attention_2'."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute layer activations in backward (encoder and predictor): less memory, ~30% slower."},
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the context encoder, predictor and target encoder (dynamic shapes: mask "
                  "lengths change from batch to batch). Pays off on GPUs for long runs."},
    )


@dataclass
class PretrainingArguments:
    """How to train (the official `optimization`, `data` and `meta` yaml sections, plus run bookkeeping)."""

    output_dir: str = field(default="ijepa-pretraining", metadata={"help": "Where checkpoints and the model go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start from scratch even if output_dir holds checkpoints."}
    )
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Batch per process (official 128)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    num_train_epochs: float = field(default=300.0, metadata={"help": "Epochs (official `epochs`)."})
    max_steps: int = field(
        default=-1, metadata={"help": "If > 0: total optimizer steps, overriding --num_train_epochs for the run length."}
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Absolute peak learning rate. When absent, --base_learning_rate is scaled linearly with the global "
            "batch: lr = base_learning_rate * global_batch / reference_batch_size."
        },
    )
    base_learning_rate: float = field(
        default=1e-3, metadata={"help": "Peak learning rate at --reference_batch_size (official `lr`)."}
    )
    start_lr: float = field(
        default=2e-4, metadata={"help": "Warmup start learning rate at --reference_batch_size (official `start_lr`)."}
    )
    final_lr: float = field(
        default=1e-6, metadata={"help": "Final learning rate at --reference_batch_size (official `final_lr`)."}
    )
    reference_batch_size: int = field(
        default=PAPER_GLOBAL_BATCH_SIZE, metadata={"help": "Global batch the base learning rates are for (paper: 2048)."}
    )
    warmup_epochs: float = field(default=40.0, metadata={"help": "Linear warmup length in epochs (official `warmup`)."})
    warmup_steps: int | None = field(default=None, metadata={"help": "Warmup in optimizer steps (overrides epochs)."})
    weight_decay: float = field(default=0.04, metadata={"help": "Initial weight decay (official `weight_decay`)."})
    final_weight_decay: float = field(default=0.4, metadata={"help": "Final weight decay (official `final_weight_decay`)."})
    ema_momentum_start: float = field(default=0.996, metadata={"help": "EMA momentum at step 0 (official `ema[0]`)."})
    ema_momentum_end: float = field(default=1.0, metadata={"help": "EMA momentum at the schedule end (`ema[1]`)."})
    ipe_scale: float = field(
        default=1.0,
        metadata={"help": "Stretch of the schedules beyond the run (official `ipe_scale`; 1.0 in every released config)."},
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1 (torch default, as the official code)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (torch default)."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon (torch default)."})
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Clip gradients to this norm; 0 disables clipping (official: no clipping)."}
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "'no', 'bf16' or 'fp16' (official runs: bf16). Default: what `accelerate config` says."},
    )
    crop_scale: list[float] = field(
        default_factory=lambda: [0.3, 1.0], metadata={"help": "RandomResizedCrop scale (official `crop_scale`)."}
    )
    use_horizontal_flip: bool = field(default=False, metadata={"help": "Random horizontal flips (official: off)."})
    use_color_distortion: bool = field(default=False, metadata={"help": "Colour jitter + grayscale (official: off)."})
    color_jitter_strength: float = field(default=0.0, metadata={"help": "Colour distortion strength `s`."})
    use_gaussian_blur: bool = field(default=False, metadata={"help": "Random Gaussian blur, p=0.5 (official: off)."})
    seed: int = field(default=0, metadata={"help": "Seed of the model init, data order, crops and masks."})
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save a resumable checkpoint every N optimizer steps (and always at the end)."}
    )
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep the last K checkpoints (None: all)."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or 'latest' (the newest in output_dir; none yet starts from scratch)."},
    )
    ignore_data_skip: bool = field(
        default=False,
        metadata={
            "help": "On resume, do not restore the data position (needed when the world size changed; batches then "
            "differ from an uninterrupted run)."
        },
    )
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "Processes decoding and augmenting images (0: the training process does it)."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "Trackers: 'tensorboard', 'wandb', 'all', 'none', or a comma-separated list."},
    )
    log_batch_fingerprints: bool = field(
        default=False,
        metadata={"help": "Write a hash of each step's batch and masks to train_log.jsonl (to check exact resume)."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload output_dir to the Hub at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (default: output_dir's name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})


def parse_arguments(argv: list[str] | None = None):
    """Parse the three dataclasses from argv; a leading .yaml/.yml/.json file provides defaults the CLI overrides."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, PretrainingArguments))
    file_args: list[str] = []
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        file_args = arguments_from_file(argv.pop(0))
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=file_args + argv)
    return model_args, data_args, train_args


def arguments_from_file(path: str) -> list[str]:
    """Turn a YAML/JSON mapping of argument names to values into command-line tokens."""
    import yaml

    text = Path(path).read_text()
    values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values, got {type(values).__name__}.")
    tokens: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        tokens.append(f"--{key}")
        if isinstance(value, bool):
            tokens.append(str(value).lower())
        elif isinstance(value, (list, tuple)):
            tokens.extend(str(v) for v in value)
        else:
            tokens.append(str(value))
    return tokens


# ---------------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the global optimizer step.
#
# Step semantics of the official code: at iteration i (0-based) `WarmupCosineSchedule.step()` and
# `CosineWDSchedule.step()` are called *before* the optimizer step, so iteration i uses their value for counter i + 1;
# the momentum generator yields `ema0 + i * (ema1 - ema0) / (ipe * epochs * ipe_scale)` for iteration i.


def learning_rate_at(
    step: int, *, peak_lr: float, start_lr: float, final_lr: float, warmup_steps: int, total_steps: int
) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup `start_lr -> peak_lr` over `warmup_steps`,
    then cosine to `final_lr` at `total_steps` (official `WarmupCosineSchedule`, whose `T_max` is `total_steps`)."""
    counter = step + 1
    if counter < warmup_steps:
        progress = counter / max(1, warmup_steps)
        return start_lr + progress * (peak_lr - start_lr)
    progress = (counter - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(final_lr, final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def weight_decay_at(step: int, *, start_wd: float, final_wd: float, total_steps: int) -> float:
    """Weight decay for optimizer step `step` (0-based): cosine from `start_wd` to `final_wd` over `total_steps`
    (official `CosineWDSchedule`), clamped at `final_wd`."""
    progress = (step + 1) / total_steps
    value = final_wd + (start_wd - final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(final_wd, value) if final_wd <= start_wd else min(final_wd, value)


@dataclass(frozen=True)
class Schedules:
    """Lengths of the run and its schedules, all in optimizer steps."""

    train_steps: int  # steps this run trains for
    steps_per_epoch: float  # official `ipe` (iterations per epoch)
    warmup_steps: int  # official `int(warmup * ipe)`
    schedule_steps: int  # official `T_max = int(ipe_scale * epochs * ipe)` for lr and wd
    momentum_steps: float  # official `ipe * epochs * ipe_scale` (not truncated) for the EMA momentum
    peak_lr: float
    start_lr: float
    final_lr: float
    start_wd: float
    final_wd: float
    ema_start: float
    ema_end: float

    def at(self, step: int) -> dict[str, float]:
        """`{"lr", "weight_decay", "momentum"}` for optimizer step `step` (0-based)."""
        from modeling_ijepa import ema_momentum

        return {
            "lr": learning_rate_at(
                step, peak_lr=self.peak_lr, start_lr=self.start_lr, final_lr=self.final_lr,
                warmup_steps=self.warmup_steps, total_steps=self.schedule_steps,
            ),
            "weight_decay": weight_decay_at(
                step, start_wd=self.start_wd, final_wd=self.final_wd, total_steps=self.schedule_steps
            ),
            "momentum": ema_momentum(step, self.momentum_steps, start=self.ema_start, end=self.ema_end),
        }


def resolve_learning_rates(args: PretrainingArguments, global_batch_size: int) -> tuple[float, float, float, str]:
    """(peak, start, final) learning rates and a sentence stating the rule that produced them.

    Rule: the official rates are for a global batch of `reference_batch_size` (2048); with another global batch they
    are scaled linearly (`lr * global_batch / 2048`, the linear scaling rule of Goyal et al. 2017). An explicit
    `--learning_rate` is used as is, and `start_lr`/`final_lr` keep their ratio to the base rate.
    """
    if args.learning_rate is not None:
        factor = args.learning_rate / args.base_learning_rate
        rule = (
            f"--learning_rate {args.learning_rate:g} given: used as is (start/final lr keep their ratio to the base "
            f"rate {args.base_learning_rate:g})"
        )
    else:
        factor = global_batch_size / args.reference_batch_size
        rule = (
            f"linear scaling: lr = {args.base_learning_rate:g} x global batch {global_batch_size} / "
            f"{args.reference_batch_size} = {args.base_learning_rate * factor:.4g}"
        )
    return args.base_learning_rate * factor, args.start_lr * factor, args.final_lr * factor, rule


def resolve_schedules(
    args: PretrainingArguments, num_train_samples: int | None, global_batch_size: int, dataset_name: str = ""
) -> Schedules:
    """Run and schedule lengths from --max_steps, or from epochs x samples per epoch (official `ipe`).

    With --max_steps the schedules are shaped as if those steps were --num_train_epochs epochs (so --warmup_epochs
    keeps its share of the run). The learning rate and weight decay schedules end at `ipe_scale * train_steps`.
    """
    if args.num_train_epochs <= 0:
        raise ValueError(f"--num_train_epochs must be positive, got {args.num_train_epochs}.")
    if args.max_steps > 0:
        train_steps = args.max_steps
        steps_per_epoch = train_steps / args.num_train_epochs
    elif num_train_samples is not None:
        # Official loader: drop_last=True, so ipe = samples // global batch.
        steps_per_epoch = num_train_samples // global_batch_size
        if steps_per_epoch < 1:
            raise ValueError(
                f"{num_train_samples} samples per epoch are fewer than one global batch of {global_batch_size}; "
                "lower --per_device_train_batch_size or pass --max_steps."
            )
        train_steps = int(args.num_train_epochs * steps_per_epoch)
    else:
        raise ValueError(
            f"Cannot tell how many steps to train: the number of samples in {dataset_name or 'the dataset'} is not "
            "known (streaming). Pass --max_steps N, or --num_train_samples N together with --num_train_epochs."
        )
    if args.warmup_steps is not None:
        warmup_steps = args.warmup_steps
    else:
        warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    peak_lr, start_lr, final_lr, _ = resolve_learning_rates(args, global_batch_size)
    return Schedules(
        train_steps=train_steps,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup_steps,
        schedule_steps=max(1, int(args.ipe_scale * train_steps)),
        momentum_steps=args.ipe_scale * train_steps,
        peak_lr=peak_lr,
        start_lr=start_lr,
        final_lr=final_lr,
        start_wd=args.weight_decay,
        final_wd=args.final_weight_decay,
        ema_start=args.ema_momentum_start,
        ema_end=args.ema_momentum_end,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Model and optimizer


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """'a=1,b=(0.1, 0.2),c=gelu' -> {'a': 1, 'b': (0.1, 0.2), 'c': 'gelu'} (commas inside brackets are kept)."""
    if not text:
        return {}
    overrides: dict[str, Any] = {}
    for item in re.split(r",\s*(?=[A-Za-z_][A-Za-z0-9_]*\s*=)", text.strip()):
        if "=" not in item:
            raise ValueError(f"--config_overrides item {item!r} is not 'key=value'.")
        key, raw = (part.strip() for part in item.split("=", 1))
        try:
            overrides[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            overrides[key] = raw
    return overrides


def build_config(model_args: ModelArguments):
    from modeling_ijepa import PRESETS, IJepaConfig, ijepa_config_from_preset

    overrides = parse_config_overrides(model_args.config_overrides)
    if model_args.model_name_or_path and model_args.config_name in PRESETS and not overrides:
        return IJepaConfig.from_pretrained(model_args.model_name_or_path)
    if model_args.config_name in PRESETS:
        return ijepa_config_from_preset(model_args.config_name, **overrides)
    if os.path.exists(model_args.config_name):
        config = IJepaConfig.from_pretrained(model_args.config_name)
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"--config_overrides: IJepaConfig has no field {key!r}.")
            setattr(config, key, value)
        config.validate_ijepa()
        return config
    raise ValueError(
        f"--config_name {model_args.config_name!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing "
        "config file/folder."
    )


def build_model(model_args: ModelArguments, config):
    from modeling_ijepa import IJepaForPreTraining

    if not model_args.model_name_or_path:
        model = IJepaForPreTraining(config)
        model.set_attn_implementation(model_args.attn_implementation)
    else:
        model, info = IJepaForPreTraining.from_pretrained(
            model_args.model_name_or_path, config=config, output_loading_info=True,
            attn_implementation=model_args.attn_implementation,
        )
        if any(key.startswith("context_encoder.") for key in info["missing_keys"]):
            # An encoder-only checkpoint (e.g. facebook/ijepa_vith14_1k) loads into the target encoder only: start the
            # context encoder from the same weights, as the official code deep-copies encoder -> target encoder.
            logger.info("Checkpoint has no context encoder: copying its encoder into the context encoder.")
            model.context_encoder.load_state_dict(model.ijepa.state_dict())
    if model_args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if model_args.torch_compile:
        # Module.compile() compiles in place and keeps parameter names (checkpoints stay loadable).
        for part in (model.context_encoder, model.predictor, model.ijepa):
            part.compile(dynamic=True)
    return model


def optimizer_param_groups(model) -> list[dict]:
    """Official `init_opt` grouping: no weight decay on biases and 1-D parameters (norms); everything else decays
    (including the 3-D predictor mask token). The frozen target encoder and fixed tables are not in the optimizer."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("bias") or param.ndim == 1:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "apply_weight_decay": True},
        {"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0},
    ]


def tensor_checksum(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape and bytes), to check processes agree bitwise."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Data


class DatasetAccessError(RuntimeError):
    """The dataset could not be opened; the message says what to do."""


def access_instructions(dataset_name: str) -> str:
    return (
        f"Could not open the dataset {dataset_name!r} on the Hugging Face Hub. If it is gated (ILSVRC/imagenet-1k is):\n"
        f"  1. open https://huggingface.co/datasets/{dataset_name} while logged in and accept its terms of access;\n"
        "  2. log in on this machine: `hf auth login` (or set HF_TOKEN, or pass --token);\n"
        "  3. check the name and that this machine can reach huggingface.co (HF_HUB_OFFLINE must not be set).\n"
        "Alternatives: --dataset_name timm/imagenet-1k-wds (also gated, webdataset copy), or a local copy, e.g. "
        "--dataset_name /data/imagenet/train (a folder of images or parquet files)."
    )


# Hub ids of Fashion-MNIST; when Debian's `dataset-fashion-mnist` is installed the same images are read from it.
FASHION_MNIST_HUB_IDS = ("zalando-datasets/fashion_mnist", "fashion_mnist")


def local_fashion_mnist(data_args: DataTrainingArguments) -> str | None:
    """Folder of parquet shards exported from Debian's Fashion-MNIST (same images and labels as the Hub copy),
    or None when `--dataset_name` is not Fashion-MNIST or the Debian files are missing."""
    if data_args.dataset_name.lower() not in FASHION_MNIST_HUB_IDS:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fashion_mnist import DEFAULT_SOURCE_DIR, IDX_FILES, export_fashion_mnist

    split = data_args.train_split
    if split not in IDX_FILES or not all((Path(DEFAULT_SOURCE_DIR) / f).exists() for f in IDX_FILES[split]):
        return None
    import datasets

    root = Path(data_args.cache_dir or datasets.config.HF_DATASETS_CACHE) / "ijepa_fashion_mnist_debian"
    path = export_fashion_mnist(root, split=split)
    logger.info("Fashion-MNIST: using Debian's copy (%s), exported to %s; no network needed.", DEFAULT_SOURCE_DIR, path)
    return path


def load_train_dataset(data_args: DataTrainingArguments):
    """`datasets.load_dataset` with clear errors for gated, missing or unreachable datasets."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    name = local_fashion_mnist(data_args) or data_args.dataset_name
    builder, data_files = name, None
    if os.path.isfile(name) or any(ch in name for ch in "*?["):
        suffix = name.rsplit(".", 1)[-1]
        formats = {"parquet": "parquet", "arrow": "arrow"}
        if suffix not in formats:
            raise ValueError(f"--dataset_name {name!r}: only .parquet/.arrow files or globs are supported as files.")
        builder, data_files = formats[suffix], name
    elif not os.path.exists(name) and (name.startswith((".", "/")) or os.sep in name and name.count("/") > 1):
        raise DatasetAccessError(f"--dataset_name {name!r} looks like a local path but does not exist.")
    try:
        return datasets.load_dataset(
            builder,
            data_args.dataset_config_name,
            data_files=data_files,
            split=data_args.train_split,
            streaming=data_args.streaming,
            cache_dir=data_args.cache_dir,
            token=data_args.token,
        )
    except (DatasetNotFoundError, GatedRepoError, RepositoryNotFoundError, LocalEntryNotFoundError) as err:
        raise DatasetAccessError(f"{access_instructions(name)}\n(datasets said: {err})") from err
    except ConnectionError as err:  # datasets' "Couldn't reach '<id>' on the Hub" (offline, no network)
        if os.path.exists(name):
            raise
        raise DatasetAccessError(f"{access_instructions(name)}\n(datasets said: {err})") from err


def count_train_samples(dataset, data_args: DataTrainingArguments) -> int | None:
    """Samples per epoch when they can be known without reading the data: the length of a downloaded dataset, the
    split size recorded in a Hub dataset's metadata, or the known ImageNet sizes; None otherwise."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return len(dataset)
    splits = getattr(dataset.info, "splits", None) or {}
    split_info = splits.get(data_args.train_split) if hasattr(splits, "get") else None
    if split_info is not None and getattr(split_info, "num_examples", 0):
        return int(split_info.num_examples)
    if data_args.train_split == "train":
        return KNOWN_TRAIN_SIZES.get(data_args.dataset_name.lower())
    return None


def detect_image_column(features, requested: str | None) -> str:
    import datasets

    names = list(features or {})
    if requested is not None:
        if features is not None and requested not in features:
            raise ValueError(f"--image_column_name {requested!r} is not a column; columns: {names}.")
        return requested
    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img", "jpg", "jpeg", "png", "webp"):
        if name in names:
            return name
    raise ValueError(f"No image column found among {names}; pass --image_column_name.")


def shard_for_process(dataset, rank: int, world_size: int, seed: int, buffer_size: int):
    """This process's part of the dataset, shuffled.

    Iterable datasets with at least `world_size` files get whole files per process (strategy "shards"; with a file
    count that is not a multiple of the world size some processes get one file more, and since training is counted
    in steps, not epochs, each process simply starts its next epoch when its files are done). With fewer files than
    processes every process reads everything and keeps one example in `world_size` (strategy "examples").
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    if isinstance(dataset, datasets.Dataset):
        # Map-style (downloaded) data: many virtual shards, so shard-order shuffling mixes well.
        dataset = dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 1024)))
    if world_size > 1:
        strategy = "shards" if dataset.num_shards >= world_size else "examples"
        if strategy == "examples":
            logger.warning(
                "The dataset has %d file(s) for %d processes: every process reads all of them and keeps 1 example in "
                "%d. For large datasets use at least as many files as processes.",
                dataset.num_shards, world_size, world_size,
            )
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size, strategy=strategy)
    return dataset.shuffle(seed=seed, buffer_size=buffer_size)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes, workers and Python versions."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


def decode_image(value) -> Any:
    """PIL image from a `datasets` image record (`{"bytes", "path"}`, a PIL image, or raw bytes)."""
    from PIL import Image

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
    image.load()
    return to_rgb(image)


def augment(image, settings: AugmentationSettings, seed: int):
    """Official `make_transforms` up to `ToTensor`, with all randomness from `seed`. Returns a uint8 numpy array
    `(H, W, 3)` (numpy, not torch, so worker processes return it without shared-memory file descriptors)."""
    import numpy as np
    from PIL import ImageFilter
    from torchvision import transforms

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image = transforms.RandomResizedCrop(settings.crop_size, scale=settings.crop_scale)(image)
        if settings.horizontal_flip:
            image = transforms.RandomHorizontalFlip()(image)
        if settings.color_distortion:
            s = settings.color_jitter_strength
            jitter = transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
            image = transforms.RandomApply([jitter], p=0.8)(image)
            image = transforms.RandomGrayscale(p=0.2)(image)
        if settings.gaussian_blur:
            # Official `GaussianBlur(p=0.5, radius_min=0.1, radius_max=2.0)`.
            if torch.rand(1).item() < 0.5:
                radius = 0.1 + torch.rand(1).item() * (2.0 - 0.1)
                image = image.filter(ImageFilter.GaussianBlur(radius=radius))
    return np.array(image, dtype=np.uint8)


def decode_and_augment(job: tuple[Any, AugmentationSettings, int]) -> tuple[Any, str | None]:
    """(uint8 image, None) or (None, reason) for a record that cannot be decoded."""
    value, settings, seed = job
    try:
        image = decode_image(value)
    except DECODE_ERRORS as err:
        return None, f"{type(err).__name__}: {err}"
    return augment(image, settings, seed), None


def record_name(value) -> str:
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return "<bytes>"


@dataclass
class DataState:
    """Position of one process in its data stream; saved with each checkpoint (one file per process)."""

    epoch: int = 0
    position: int = 0  # records of this epoch consumed into yielded batches (including skipped corrupt ones)
    corrupt_images: int = 0  # corrupt records skipped so far, all epochs, this process
    batches: int = 0  # micro-batches yielded so far


class ImageBatchStream:
    """Fixed-size uint8 batches `(B, 3, H, W)` from one process's shuffled stream, skipping corrupt records.

    Crops are seeded per record from `(seed, rank, epoch, index)`, so the output does not depend on how many worker
    processes decode. An epoch's leftover partial batch is dropped (official `drop_last=True`).
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        batch_size: int,
        settings: AugmentationSettings,
        seed: int,
        rank: int,
        num_workers: int = 0,
        state: DataState | None = None,
        max_logged_corrupt: int = 20,
    ):
        self.dataset = dataset
        self.image_column = image_column
        self.batch_size = batch_size
        self.settings = settings
        self.seed = seed
        self.rank = rank
        self.num_workers = num_workers
        self.state = state or DataState()
        self.max_logged_corrupt = max_logged_corrupt
        self._pool = None

    def _records(self, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)  # reseeds the file order and the shuffle buffer: seed + epoch
        for index, example in enumerate(self.dataset):
            if index < start:
                continue  # resume: skip what was consumed, before any decoding
            yield index, example[self.image_column]

    def _decoded(self, epoch: int, start: int) -> Iterator[tuple[int, Any, Any, str | None]]:
        jobs = (
            (index, value, (value, self.settings, derive_seed(self.seed, self.rank, epoch, index)))
            for index, value in self._records(epoch, start)
        )
        if self.num_workers <= 0:
            for index, value, job in jobs:
                yield (index, value, *decode_and_augment(job))
            return
        if self._pool is None:
            # spawn: safe after CUDA initialisation; workers only run `decode_and_augment`.
            self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
        # Bounded read-ahead (Pool.imap would read the whole stream into memory): chunks of one batch.
        pending: deque = deque()
        max_pending = 2 * self.num_workers
        exhausted = False
        while True:
            while not exhausted and len(pending) < max_pending:
                chunk = [next(jobs, None) for _ in range(self.batch_size)]
                chunk = [item for item in chunk if item is not None]
                if len(chunk) < self.batch_size:
                    exhausted = True
                if chunk:
                    result = self._pool.map_async(decode_and_augment, [job for _, _, job in chunk])
                    pending.append((chunk, result))
            if not pending:
                return
            chunk, result = pending.popleft()
            for (index, value, _), decoded in zip(chunk, result.get()):
                yield (index, value, *decoded)

    def __iter__(self) -> Iterator[torch.Tensor]:
        import numpy as np

        state = self.state
        while True:
            images: list = []
            produced_in_epoch = state.position > 0
            for index, value, image, error in self._decoded(state.epoch, state.position):
                if image is None:
                    state.corrupt_images += 1
                    if state.corrupt_images <= self.max_logged_corrupt:
                        logger.warning(
                            "Skipping undecodable image %s (epoch %d, record %d, process %d): %s",
                            record_name(value), state.epoch, index, self.rank, error,
                        )
                    continue
                images.append(image)
                if len(images) == self.batch_size:
                    state.position = index + 1
                    state.batches += 1
                    produced_in_epoch = True
                    yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
                    images = []
            if not produced_in_epoch:
                raise ValueError(
                    f"Process {self.rank} found fewer than {self.batch_size} decodable images in its part of the "
                    f"dataset (epoch {state.epoch}): lower --per_device_train_batch_size or use more data."
                )
            state.epoch += 1
            state.position = 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def normalize(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 `(B, 3, H, W)` -> float normalised with ImageNet statistics (official `ToTensor` + `Normalize`, the
    default of `src/transforms.py::make_transforms`)."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    return (pixels.to(device, non_blocking=True).float() / 255.0 - mean) / std


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`checkpoint-<step>` folders), oldest first. Temporary folders are not listed."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and path.is_dir() and (path / TRAINER_STATE_NAME).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume_path(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting from scratch.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_NAME).exists():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is not a complete checkpoint (no {TRAINER_STATE_NAME}); pass a "
            f"{CHECKPOINT_PREFIX}<step> folder or 'latest'."
        )
    return path


def save_pretrained_files(accelerator, model, config_dir: Path, image_processor) -> None:
    """`save_pretrained` of the pretraining model plus the image processor config into `config_dir`, written to a
    temporary folder first and moved file by file, so a crash never leaves half-written weights (main process)."""
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    tmp = config_dir / ".tmp-save-pretrained"
    if tmp.exists():
        shutil.rmtree(tmp)
    unwrapped.save_pretrained(tmp, state_dict=state_dict, save_function=accelerator.save)
    image_processor.save_pretrained(tmp)
    for path in tmp.iterdir():
        os.replace(path, config_dir / path.name)
    tmp.rmdir()


def save_checkpoint(
    accelerator, model, output_dir: Path, step: int, trainer_state: dict, data_state: DataState,
    collator_state: dict, image_processor, save_total_limit: int | None,
) -> Path:
    """`accelerator.save_state` into `.tmp-checkpoint-<step>`, plus our state files, then an atomic rename to
    `checkpoint-<step>`: a crash mid-write leaves only a temporary folder, never a checkpoint that looks complete."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{TMP_CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank_state = {"data": asdict(data_state), "mask_collator": collator_state}
    (tmp / RANK_STATE_NAME.format(rank=accelerator.process_index)).write_text(json.dumps(rank_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Written last: its presence marks the folder complete (list_checkpoints requires it).
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # same step saved again (e.g. a resume with nothing left to do): swap, then delete
            old = output_dir / f".old-{CHECKPOINT_PREFIX}{step}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    accelerator.wait_for_everyone()
    save_pretrained_files(accelerator, model, output_dir, image_processor)
    if accelerator.is_main_process and save_total_limit is not None and save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------------------
# Hub


def _hub_id_or_none(name: str | None) -> str | None:
    """`name` when it looks like a Hub repo id rather than a local path (card metadata wants Hub ids only)."""
    if not name or os.path.exists(name) or name.count("/") != 1:
        return None
    return name


def write_model_card(output_dir: Path, config, model_args, data_args, args, results: dict, lr_rule: str) -> Path:
    """Write `output_dir/README.md`: a pretraining model card filled with this run's facts."""
    from modeling_ijepa.cards import PROJECT_LICENSE, Provenance, TrainingFacts, pretraining_card, save_card

    training = TrainingFacts(
        dataset=f"{data_args.dataset_name} (split {data_args.train_split})",
        dataset_id=_hub_id_or_none(data_args.dataset_name),
        steps=results["global_step"],
        batch_size=results["global_batch_size"],
        recipe=(
            f"AdamW, {lr_rule}; weight decay cosine {args.weight_decay} -> {args.final_weight_decay}; EMA "
            f"{args.ema_momentum_start} -> {args.ema_momentum_end}; multi-block masks "
            f"({config.num_target_blocks} targets of scale {tuple(config.target_block_scale)}, context scale "
            f"{tuple(config.context_block_scale)}); {config.loss_type} loss on layer-normed targets; "
            f"precision {args.mixed_precision or 'no'}"
        ),
        final_loss=results["final_loss"],
        hardware=f"{results['world_size']} process(es)",
    )
    provenance = Provenance(source="trained with scripts/pretrain.py of modeling-ijepa", license=PROJECT_LICENSE,
                            base_model=_hub_id_or_none(model_args.model_name_or_path))
    card = pretraining_card(config, provenance=provenance, training=training, repo_id=args.hub_model_id)
    return save_card(card, output_dir)


def push_run_to_hub(output_dir: Path, args) -> str:
    """Upload the run's model directory (resumable `checkpoint-*` states excluded) in one commit."""
    from modeling_ijepa.hub import push_folder_to_hub

    repo_id = args.hub_model_id or output_dir.resolve().name
    info = push_folder_to_hub(
        output_dir, repo_id, private=args.hub_private_repo or None, token=args.hub_token,
        commit_message="Upload I-JEPA pretraining run",
        exclude=(f"{CHECKPOINT_PREFIX}*", f"{TMP_CHECKPOINT_PREFIX}*", ".old-*", "runs"),
    )
    return info.commit_url


# ---------------------------------------------------------------------------------------------------------------------
# Training


def check_world_size(accelerator) -> int:
    """Log the world size and refuse launches where processes do not form one group."""
    world_size = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    logger.info(
        "World size %d (process %d, device %s, distributed type %s).",
        world_size, accelerator.process_index, accelerator.device, accelerator.distributed_type,
    )
    if launched != world_size:
        raise RuntimeError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but this process trains with world "
            f"size {world_size}: they would train {launched} independent models. On CPU use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` (or torchrun); on GPUs check "
            "that every process sees a GPU."
        )
    return world_size


def setup_logging(accelerator) -> None:
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO,
        stream=sys.stdout,
    )
    if accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        logger.setLevel(logging.WARNING)
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def tracker_names(report_to: str) -> list[str] | str | None:
    if report_to in ("none", ""):
        return None
    if report_to == "all":
        return "all"
    return [name.strip() for name in report_to.split(",") if name.strip()]


def batch_fingerprint(pixels: torch.Tensor, context_mask, target_mask) -> str:
    digest = hashlib.sha256(pixels.cpu().contiguous().numpy().tobytes())
    for mask in [*context_mask, *target_mask]:
        digest.update(mask.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class StepOutcome:
    """What one optimizer step produced (values are means over micro-batches and processes)."""

    loss: float | None = None
    grad_norm: float | None = None
    outputs: Any = None  # the last micro-batch's `IJepaForPreTrainingOutput`
    context_length: int = 0
    target_length: int = 0
    fingerprint: str | None = None
    stop_reason: str | None = None


def train_step(accelerator, model, optimizer, batches, collator, values: dict, args, parameters) -> StepOutcome:
    """One optimizer step: `gradient_accumulation_steps` micro-batches, then the EMA update of the target encoder.

    The learning rate and weight decay come from `values` (the schedules at this step). Masks are sampled here, in
    the training process, from the collator's batch counter. A non-finite loss (agreed by all processes, the loss is
    all-reduced) stops before its backward pass, so the weights stay those of the last good step.
    """
    for group in optimizer.param_groups:
        group["lr"] = values["lr"]
        if group["apply_weight_decay"]:
            group["weight_decay"] = values["weight_decay"]
    fingerprint = hashlib.sha256() if args.log_batch_fingerprints else None
    outcome, losses = StepOutcome(), []
    for _ in range(args.gradient_accumulation_steps):
        pixels = next(batches)  # uint8 (B, 3, H, W)
        context_mask, target_mask = collator.sample(pixels.size(0))
        if fingerprint is not None:
            fingerprint.update(batch_fingerprint(pixels, context_mask, target_mask).encode())
        with accelerator.accumulate(model):
            outputs = model(
                pixel_values=normalize(pixels, accelerator.device),
                context_mask=[m.to(accelerator.device) for m in context_mask],
                target_mask=[m.to(accelerator.device) for m in target_mask],
            )
            loss = accelerator.reduce(outputs.loss.detach().float(), reduction="mean").item()
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                return StepOutcome(stop_reason=f"non-finite loss ({loss})")
            losses.append(loss)
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients:
                max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")  # inf: measure only
                outcome.grad_norm = float(accelerator.clip_grad_norm_(parameters, max_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    # One EMA update per real optimizer step, on every process with the same momentum.
    accelerator.unwrap_model(model).update_target_encoder(values["momentum"])
    outcome.loss = sum(losses) / len(losses)
    outcome.outputs = outputs
    outcome.context_length, outcome.target_length = context_mask[0].size(1), target_mask[0].size(1)
    outcome.fingerprint = fingerprint.hexdigest()[:16] if fingerprint is not None else None
    return outcome


def step_metrics(accelerator, outcome: StepOutcome, values: dict, window_losses: list[float],
                 images_per_second: float, data_state: DataState) -> dict[str, float]:
    """Tracker metrics at a logging step (the corrupt-image count is summed over processes)."""
    batch = outcome.outputs.context_hidden_states.size(0) // max(1, len(outcome.outputs.context_mask))
    target = outcome.outputs.target_hidden_states.detach().float()  # (T*C*B, Kt, D)
    target = target.view(-1, batch, *target.shape[1:])  # (T*C, B, Kt, D)
    corrupt = accelerator.reduce(
        torch.tensor(float(data_state.corrupt_images), device=accelerator.device), reduction="sum"
    ).item()
    return {
        "train/loss": sum(window_losses) / len(window_losses),
        "train/learning_rate": values["lr"],
        "train/weight_decay": values["weight_decay"],
        "train/ema_momentum": values["momentum"],
        "train/grad_norm": outcome.grad_norm if outcome.grad_norm is not None else float("nan"),
        "train/context_length": outcome.context_length,
        "train/target_length": outcome.target_length,
        "train/images_per_second": images_per_second,
        # Collapse monitor: std across the images of the batch of each (normalised) target feature, averaged over
        # blocks, patches and features; it falls towards 0 if the representations collapse.
        "train/target_feature_std": target.std(dim=1).mean().item(),
        "data/epoch": data_state.epoch,
        "data/corrupt_images": corrupt,
    }


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, args = parse_arguments(argv)

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, gather_object, set_seed
    from tqdm.auto import tqdm
    from modeling_ijepa.evaluation import default_image_processor

    from modeling_ijepa import IJepaMaskCollator

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=tracker_names(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
    )
    setup_logging(accelerator)
    world_size = check_world_size(accelerator)
    rank = accelerator.process_index
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    resume_path = resolve_resume_path(args.resume_from_checkpoint, str(output_dir))
    if resume_path is None and list_checkpoints(output_dir):
        if not args.overwrite_output_dir:
            raise RuntimeError(
                f"{output_dir} already holds checkpoints. Pass --resume_from_checkpoint latest to continue, "
                "--overwrite_output_dir to start again, or another --output_dir."
            )
        if accelerator.is_main_process:
            # Starting again: stale checkpoints of the old run would otherwise be picked up by a later `latest`.
            logger.info("--overwrite_output_dir: removing the previous run's checkpoints in %s.", output_dir)
            for old in list_checkpoints(output_dir):
                shutil.rmtree(old)
    if resume_path is None and accelerator.is_main_process:
        (output_dir / TRAIN_LOG_NAME).unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    # ---- model
    set_seed(args.seed)  # same init on every process (DDP also broadcasts rank 0's weights)
    config = build_config(model_args)
    model = build_model(model_args, config)
    # Masks come from IJepaMaskCollator (valid by construction): skip the forward's value checks, each a GPU->CPU sync.
    model.check_mask_values = False
    crop_size = config.image_size_hw
    image_processor = default_image_processor(crop_size)  # what evaluation of this checkpoint should use

    # ---- data
    with accelerator.main_process_first():
        dataset = load_train_dataset(data_args)
    image_column = detect_image_column(dataset.features, data_args.image_column_name)
    import datasets as hf_datasets

    dataset = dataset.select_columns([image_column]).cast_column(image_column, hf_datasets.Image(decode=False))
    num_train_samples = data_args.num_train_samples or count_train_samples(dataset, data_args)
    global_batch_size = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
    schedules = resolve_schedules(args, num_train_samples, global_batch_size, data_args.dataset_name)
    _, _, _, lr_rule = resolve_learning_rates(args, global_batch_size)

    # ---- optimizer (torch AdamW defaults, as the official code); lr and wd are set every step from the schedules
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model), lr=schedules.peak_lr, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon, weight_decay=args.weight_decay,
        # One fused kernel for all parameters on GPUs (same update rule); the foreach path elsewhere.
        fused=accelerator.device.type == "cuda",
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    # ---- resume
    global_step = 0
    data_state = DataState()
    collator = IJepaMaskCollator(config, seed=args.seed, rank=rank)
    if resume_path is not None:
        trainer_state = json.loads((resume_path / TRAINER_STATE_NAME).read_text())
        accelerator.load_state(str(resume_path))
        global_step = int(trainer_state["global_step"])
        rank_file = resume_path / RANK_STATE_NAME.format(rank=rank)
        saved_world = int(trainer_state["world_size"])
        if saved_world != world_size and not args.ignore_data_skip:
            raise RuntimeError(
                f"{resume_path} was written by {saved_world} processes, this run has {world_size}: the data position "
                "cannot be restored. Relaunch with the same number of processes, or pass --ignore_data_skip to "
                "continue with fresh data order (batches then differ from an uninterrupted run)."
            )
        if not args.ignore_data_skip:
            rank_state = json.loads(rank_file.read_text())
            data_state = DataState(**rank_state["data"])
            collator.load_state_dict(rank_state["mask_collator"])
        logger.info("Resumed from %s at step %d (epoch %d of process 0).", resume_path, global_step, data_state.epoch)

    shard = shard_for_process(dataset, rank, world_size, args.seed, data_args.shuffle_buffer_size)
    stream = ImageBatchStream(
        shard, image_column, args.per_device_train_batch_size,
        AugmentationSettings(
            crop_size=crop_size, crop_scale=tuple(args.crop_scale), horizontal_flip=args.use_horizontal_flip,
            color_distortion=args.use_color_distortion, color_jitter_strength=args.color_jitter_strength,
            gaussian_blur=args.use_gaussian_blur,
        ),
        seed=args.seed, rank=rank, num_workers=args.dataloader_num_workers, state=data_state,
    )

    # ---- trackers and run summary
    if accelerator.is_main_process:
        logger.info("Model: %s, %.1fM trainable parameters.", model_args.config_name,
                    sum(p.numel() for p in accelerator.unwrap_model(model).trainable_parameters()) / 1e6)
        logger.info(
            "Global batch %d = %d per device x %d processes x %d accumulation steps; learning rate: %s.",
            global_batch_size, args.per_device_train_batch_size, world_size, args.gradient_accumulation_steps, lr_rule,
        )
        logger.info("Schedules: %s", schedules)
    if accelerator.log_with:
        tracker_config = {k: v for k, v in {**asdict(model_args), **asdict(data_args), **asdict(args)}.items()
                          if isinstance(v, (int, float, str, bool)) and k not in ("token", "hub_token")}
        tracker_config.update(world_size=world_size, global_batch_size=global_batch_size)
        accelerator.init_trackers("ijepa_pretraining", config=tracker_config)

    train_log = output_dir / TRAIN_LOG_NAME
    progress = tqdm(
        total=schedules.train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
        desc="pretraining", dynamic_ncols=True,
    )
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    start_step = global_step
    start_time = time.perf_counter()
    window_start, window_losses = time.perf_counter(), []
    run_losses: list[float] = []
    stop_reason = None
    batches = iter(stream)

    def trainer_state_now() -> dict:
        return {"global_step": global_step, "world_size": world_size, "global_batch_size": global_batch_size,
                "epoch": data_state.epoch, "schedules": asdict(schedules)}

    try:
        while global_step < schedules.train_steps:
            values = schedules.at(global_step)
            outcome = train_step(accelerator, model, optimizer, batches, collator, values, args, parameters)
            if outcome.stop_reason is not None:
                stop_reason = f"{outcome.stop_reason} at step {global_step}"
                break
            window_losses.append(outcome.loss)
            run_losses.append(outcome.loss)
            if accelerator.is_main_process:
                record = {"step": global_step, "loss": outcome.loss, **values}
                if outcome.fingerprint is not None:
                    record["batch_fingerprint"] = outcome.fingerprint
                with train_log.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            global_step += 1
            progress.update(1)

            if global_step % args.logging_steps == 0 or global_step == schedules.train_steps:
                elapsed = time.perf_counter() - window_start
                images_per_second = len(window_losses) * global_batch_size / max(elapsed, 1e-9)
                metrics = step_metrics(accelerator, outcome, values, window_losses, images_per_second, data_state)
                accelerator.log(metrics, step=global_step)
                progress.set_postfix(
                    loss=f"{metrics['train/loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{images_per_second:.1f}"
                )
                window_start, window_losses = time.perf_counter(), []

            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0 and (
                global_step < schedules.train_steps
            ):
                path = save_checkpoint(
                    accelerator, model, output_dir, global_step, trainer_state_now(), data_state,
                    collator.state_dict(), image_processor, args.save_total_limit,
                )
                logger.info("Saved checkpoint %s", path)
    finally:
        batches.close()  # closes the dataset readers before the interpreter tears pyarrow down
        stream.close()
        progress.close()

    # ---- end of run (also after a non-finite loss: the weights are those before the failing step)
    checkpoint = save_checkpoint(
        accelerator, model, output_dir, global_step, trainer_state_now(), data_state, collator.state_dict(),
        image_processor, args.save_total_limit,
    )
    runtime = time.perf_counter() - start_time
    checksum = tensor_checksum(accelerator.unwrap_model(model).target_encoder)
    checksums = gather_object([checksum])
    corrupt_total = int(accelerator.reduce(
        torch.tensor(float(data_state.corrupt_images), device=accelerator.device), reduction="sum"
    ).item())
    results = {
        "global_step": global_step,
        "train_loss": sum(run_losses) / len(run_losses) if run_losses else float("nan"),
        "final_loss": run_losses[-1] if run_losses else float("nan"),
        "world_size": world_size,
        "global_batch_size": global_batch_size,
        "train_runtime": runtime,
        "train_samples_per_second": (global_step - start_step) * global_batch_size / max(runtime, 1e-9),
        "epoch": data_state.epoch,
        "corrupt_images_skipped": corrupt_total,
        "target_encoder_sha256": checksums,
        "checkpoint": str(checkpoint),
    }
    if len(set(checksums)) != 1:
        raise RuntimeError(f"The target encoder differs between processes: {checksums}. Please report this bug.")
    if accelerator.is_main_process:
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
    accelerator.end_training()

    if stop_reason is not None:
        message = (
            f"Training stopped: {stop_reason}. The last good state is saved in {checkpoint}; resume from it with "
            "--resume_from_checkpoint after lowering the learning rate or enabling --max_grad_norm."
        )
        logger.error(message)
        raise SystemExit(message)
    if accelerator.is_main_process:
        write_model_card(
            output_dir, accelerator.unwrap_model(model).config, model_args, data_args, args, results, lr_rule
        )
    if args.push_to_hub and accelerator.is_main_process:
        url = push_run_to_hub(output_dir, args)
        logger.info("Pushed to %s", url)
    if accelerator.is_main_process:
        print(
            f"\nPretraining done: {global_step} steps, final loss {results['final_loss']:.4f}.\n"
            f"The model is in {output_dir.resolve()} (resumable checkpoint: {checkpoint.resolve()}).\n"
            "Load the target encoder (the one the paper evaluates) with:\n"
            "    from transformers import AutoModel\n"
            f"    model = AutoModel.from_pretrained({str(output_dir.resolve())!r})\n"
        )
    return results


if __name__ == "__main__":
    main()
