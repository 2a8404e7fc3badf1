"""Run arguments of pretraining: the `HfArgumentParser` dataclasses and their YAML/JSON loading."""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Official configs: `data.batch_size: 128` per GPU on 16 GPUs (ViT-H/14, folder name `bs.2048`). The base learning
# rates below are for this global batch; other batches scale them linearly (see `schedules.scaled_learning_rates`).
PAPER_GLOBAL_BATCH_SIZE = 2048


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
        default=10_000, metadata={"help": "Streams: shuffle buffer of each reader (one per DataLoader worker), fed by "
                                  "16 of its shards at a time; map-style data uses the official sampler instead."}
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
        metadata={"help": "torch.compile each transformer layer (regional: identical layers share a graph; target "
                  "encoder static, context encoder and predictor dynamic in the token count, which the masks change "
                  "every batch). Pays off on GPUs for long runs."},
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
    ema_momentum_ramp_steps: int | None = field(
        default=None,
        metadata={"help": "Short runs: reach --ema_momentum_end after this many steps, then hold it (default: the "
                  "official ramp over the whole schedule)."},
    )
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
        metadata={"help": "'no', 'bf16', 'fp16' (official runs: bf16) or 'auto' (one process: bf16 on GPUs; on CPUs "
                  "the faster of fp32 and bf16 for this model's step at this batch, timed before training, fp32 on "
                  "CPUs without AVX-512 BF16/AMX). Default: what `accelerate config` says."},
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
    checkpoint_verification: str = field(
        default="fast",
        metadata={
            "help": "How a resume checks a checkpoint against its manifest: 'fast' (default) compares every file's "
            "size and the sha256 of files up to 64 MiB (trainer, data and RNG state; small models' weights), "
            "'full' also hashes the weights and optimizer state (reads the whole checkpoint once more)."
        },
    )
    save_on_signal: str | None = field(
        default=None,
        metadata={
            "help": "Signals besides SIGTERM and SIGINT (always handled) that make every process finish its step, "
            "save a checkpoint and exit with code 75 (comma-separated, e.g. SIGUSR1 for SLURM's --signal=USR1@120)."
        },
    )
    distributed_timeout_seconds: int = field(
        default=60,
        metadata={
            "help": "Once training starts, a collective (gradient all-reduce, preemption agreement, checkpoint "
            "barrier) that waits longer than this for a peer fails, and every process exits naming the lost rank. "
            "Raise it when writing a checkpoint (rank 0 writes while the others wait) or a step takes longer. "
            "Setup (dataset preparation on rank 0) keeps torch's default (30 min gloo, 10 min NCCL)."
        },
    )
    preemption_check_steps: int | None = field(
        default=None,
        metadata={
            "help": "Processes agree on a received signal every N optimizer steps (one all-reduce of one number, a "
            "host-device sync); default: every --logging_steps, when the loop syncs anyway. One process checks its "
            "own flag every step without any sync. Lower it if --logging_steps steps take longer than the "
            "scheduler's grace time."
        },
    )
    ignore_data_skip: bool = field(
        default=False,
        metadata={
            "help": "On resume, do not restore the data position (needed when the world size changed; batches then "
            "differ from an uninterrupted run)."
        },
    )
    dataloader_num_workers: int = field(
        default=-1,
        metadata={"help": "DataLoader worker processes per training process that read, decode, crop and sample masks "
                  "(0: the training process does it; -1: automatic, the CPUs per process minus one, at least 1)."},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    # Step steadiness (issue 20, modeling_ijepa/cuda_settings.py, docs/performance.md).
    sdpa_backends: str | None = field(
        default=None,
        metadata={"help": "Order in which SDPA attention tries its kernels, comma-separated from flash, efficient, "
                  "cudnn, math (e.g. 'flash,efficient,cudnn,math'); default: torch's own order."},
    )
    gc_collect_steps: int = field(
        default=50,
        metadata={"help": "Python's automatic garbage collector off while training, gc.collect(1) every N steps "
                  "(torchtitan's default 50); 0: Python's automatic collector, as before this option."},
    )
    cuda_allocator_settings: str | None = field(
        default=None,
        metadata={"help": "PYTORCH_CUDA_ALLOC_CONF for this run (e.g. 'expandable_segments:True'), set before CUDA "
                  "initialises; refused if CUDA already runs with another value. Default: the environment's."},
    )
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "Trackers: 'tensorboard', 'wandb', 'all', 'none', or a comma-separated list."},
    )
    log_batch_fingerprints: bool = field(
        default=False,
        metadata={"help": "Write a hash of each step's batch and masks to train_log.jsonl (to check exact resume)."},
    )
    monitor_label_column: str | None = field(
        default=None,
        metadata={"help": "Label column for the online k-NN monitor (off when absent): k-NN accuracy of the target "
                  "encoder every --monitor_steps, and at the end against the same architecture at random init."},
    )
    monitor_steps: int = field(default=0, metadata={"help": "k-NN monitor every N steps (0: only at the end)."})
    monitor_train_split: str = field(default="train", metadata={"help": "Split of the k-NN monitor's bank."})
    monitor_eval_split: str = field(default="test", metadata={"help": "Split the k-NN monitor is evaluated on."})
    monitor_train_samples: int = field(default=2000, metadata={"help": "Images in the k-NN monitor's bank."})
    monitor_eval_samples: int = field(default=1000, metadata={"help": "Images the k-NN monitor evaluates."})
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




def resolve_learning_rates(args: PretrainingArguments, global_batch_size: int) -> tuple[float, float, float, str]:
    """(peak, start, final) learning rates of this run and the rule that produced them (`scaled_learning_rates`)."""
    from .schedules import scaled_learning_rates

    return scaled_learning_rates(
        base_lr=args.base_learning_rate, start_lr=args.start_lr, final_lr=args.final_lr,
        reference_batch_size=args.reference_batch_size, global_batch_size=global_batch_size,
        learning_rate=args.learning_rate,
    )


def resolve_schedules(
    args: PretrainingArguments, num_train_samples: int | None, global_batch_size: int, dataset_name: str = ""
):
    """This run's `schedules.Schedules`: its length from --max_steps or epochs x samples per epoch (official `ipe`),
    its learning rates from `resolve_learning_rates`."""
    from .schedules import plan_schedules, run_length

    train_steps, steps_per_epoch = run_length(
        num_train_epochs=args.num_train_epochs, max_steps=args.max_steps, num_train_samples=num_train_samples,
        global_batch_size=global_batch_size, dataset_name=dataset_name,
    )
    return plan_schedules(
        train_steps=train_steps, steps_per_epoch=steps_per_epoch, warmup_epochs=args.warmup_epochs,
        warmup_steps=args.warmup_steps, ipe_scale=args.ipe_scale,
        learning_rates=resolve_learning_rates(args, global_batch_size)[:3], weight_decay=args.weight_decay,
        final_weight_decay=args.final_weight_decay, ema_momentum_start=args.ema_momentum_start,
        ema_momentum_end=args.ema_momentum_end, ema_momentum_ramp_steps=args.ema_momentum_ramp_steps,
    )
