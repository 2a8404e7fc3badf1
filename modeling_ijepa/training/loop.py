"""The pretraining loop: `pretrain(model_args, data_args, run_args) -> results`, callable from Python.

The model (`IJepaForPreTraining`) owns the forward pass, the loss and the EMA update of the target encoder; this
module orchestrates: Accelerate, data, masks, optimizer, schedules, checkpoints and logging, in the order

    set up the output folder -> build model, optimizer, data -> restore a checkpoint -> train -> save and publish.

Exact resume: crops are seeded per record, masks per batch (`IJepaMaskCollator`'s batch counter); a checkpoint
stores each process's data position and collator state, so batches after a resume are those an uninterrupted run
would have seen and the final weights are the same.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .arguments import (
    DataTrainingArguments, ModelArguments, PretrainingArguments, resolve_learning_rates, resolve_schedules,
)
from .building import build_config, build_model, optimizer_param_groups
from .checkpoints import (
    RANK_STATE_NAME, TRAINER_STATE_NAME, list_checkpoints, resolve_resume_path_once, save_checkpoint, tensor_checksum,
)
from .data import (
    AugmentationSettings, BatchIndexedMaskCollator, DataState, ImageBatchStream, PixelNormalizer, count_train_samples,
    data_state_from_dict, default_num_workers, detect_image_column, load_training_images, shard_for_process,
)
from . import monitoring
from .publish import push_run_to_hub, write_model_card
from .schedules import Schedules, step_for_global_batch
from .preemption import Preempted, PreemptionGuard, stop_signals
from . import workers
from ..cuda_settings import StepSettings, apply_allocator_settings
from .step import step_metrics, train_step
from .validation import validate_arguments, validate_world_size

logger = logging.getLogger(__name__)

TRAIN_LOG_NAME = "train_log.jsonl"


class TrainingStopped(RuntimeError):
    """Training stopped early (a non-finite loss); the last good state was saved and the message says how to go on."""


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


@dataclass
class PretrainingRun:
    """What one pretraining run holds while it trains (built by `build_run`, advanced by `train`)."""

    accelerator: Any
    model: Any
    optimizer: torch.optim.Optimizer
    collator: Any
    stream: ImageBatchStream
    schedules: Schedules
    lr_rule: str
    image_processor: Any
    output_dir: Path
    world_size: int
    global_batch_size: int
    data_state: DataState = field(default_factory=DataState)
    global_step: int = 0
    run_losses: list[float] = field(default_factory=list)
    knn_monitor: monitoring.KnnMonitor | None = None  # set when --monitor_label_column names a label column
    rankme_history: list[tuple[int, float]] = field(default_factory=list)  # (step, RankMe) at logging steps
    # (step, images/s of the logging window ending there, wall clock: start-up and compilation included)
    throughput_history: list[tuple[int, float]] = field(default_factory=list)
    preemption: PreemptionGuard | None = None  # set by `pretrain` while training

    def trainer_state(self) -> dict:
        return {"global_step": self.global_step, "world_size": self.world_size,
                "global_batch_size": self.global_batch_size, "epoch": self.data_state.epoch,
                "schedules": asdict(self.schedules)}

    def save(self, save_total_limit: int | None, export_model: bool = True) -> Path:
        """A resumable checkpoint; with `export_model` also the loadable model folder in `output_dir`."""
        return save_checkpoint(
            self.accelerator, self.model, self.output_dir, self.global_step, self.trainer_state(), self.data_state,
            self.collator.state_dict(), self.image_processor, save_total_limit, export_model=export_model,
        )


# torch's default DDP bucket size; the one-layer graphs of `compile_regions` fit in it. Unmeasured on multi-GPU runs:
# change it only with a measurement.
DDP_BUCKET_CAP_MB = 25


def ddp_kwargs():
    """DDP options: gradients are views into the all-reduce buckets (one copy of the gradients less: 2.6 GB for
    ViT-H/14); `static_graph` stays off (valid for this model, every step uses the same parameters, but unmeasured
    with gradient accumulation and compiled layers); no unused-parameter search (the frozen target encoder has no
    gradients and is not registered with the reducer)."""
    from accelerate import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(
        gradient_as_bucket_view=True, static_graph=False, bucket_cap_mb=DDP_BUCKET_CAP_MB, find_unused_parameters=False,
    )


def refuse_unsupported_distribution(accelerator) -> None:
    """FSDP is not supported: the predictor's last layer (`layer_outputs_for_trailing_tokens`) calls its submodules
    directly, past FSDP's parameter all-gather, and the EMA update and the end-of-run checksum pair local shards."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        raise RuntimeError(
            "FSDP is not supported by this pretraining script (the predictor's trimmed last layer bypasses FSDP's "
            "parameter gathering, and the EMA update and checksums would pair sharded tensors). Launch with DDP "
            "(`accelerate launch --multi_gpu ...`, no FSDP plugin in `accelerate config`); to fit a larger model per "
            "GPU use --gradient_checkpointing or a smaller --per_device_train_batch_size with "
            "--gradient_accumulation_steps."
        )


def resolve_mixed_precision(args: PretrainingArguments, model_args: ModelArguments | None) -> tuple[str | None, str]:
    """--mixed_precision as Accelerate takes it; `auto` is decided by timing this run's step (`precision`)."""
    if args.mixed_precision != "auto":
        return args.mixed_precision, ""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or model_args is None:
        raise ValueError(
            "--mixed_precision auto times the step in one process, and every process must agree: run once with one "
            "process (it prints its choice and both timings), then launch with --mixed_precision bf16 or no."
        )
    from .precision import choose_mixed_precision

    return choose_mixed_precision(model_args, args.per_device_train_batch_size)


def make_accelerator(args: PretrainingArguments, model_args: ModelArguments | None = None):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    mixed_precision, why = resolve_mixed_precision(args, model_args)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=tracker_names(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        kwargs_handlers=[ddp_kwargs()],
    )
    refuse_unsupported_distribution(accelerator)
    if why:
        accelerator.print(why)
    return accelerator


def prepare_output_dir(accelerator, args: PretrainingArguments) -> Path | None:
    """Create `output_dir` and return the checkpoint to resume from (None: a fresh start). A fresh start into a
    folder that holds checkpoints is refused unless --overwrite_output_dir, which then removes them."""
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    resume_path = resolve_resume_path_once(accelerator, args.resume_from_checkpoint, str(output_dir),
                                           args.checkpoint_verification)
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
    return resume_path


def open_dataset(accelerator, data_args: DataTrainingArguments):
    """(dataset with only its image column, undecoded; that column's name; samples per epoch or None)."""
    import datasets as hf_datasets

    with accelerator.main_process_first():
        dataset = load_training_images(data_args)
    image_column = detect_image_column(dataset.features, data_args.image_column_name)
    dataset = dataset.select_columns([image_column]).cast_column(image_column, hf_datasets.Image(decode=False))
    return dataset, image_column, data_args.num_train_samples or count_train_samples(dataset, data_args)


def build_run(model_args: ModelArguments, data_args: DataTrainingArguments, args: PretrainingArguments,
              accelerator) -> PretrainingRun:
    """Model, optimizer, schedules, mask collator and batch stream of a fresh run (a resume restores into it)."""
    from accelerate.utils import set_seed

    from ..evaluation import default_image_processor

    world_size = accelerator.num_processes
    set_seed(args.seed)  # same init on every process (DDP also broadcasts rank 0's weights)
    config = build_config(model_args)
    model = build_model(model_args, config)
    # Masks come from IJepaMaskCollator (valid by construction): skip the forward's value checks, each a GPU->CPU sync.
    model.check_mask_values = False
    dataset, image_column, num_train_samples = open_dataset(accelerator, data_args)
    global_batch_size = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
    schedules = resolve_schedules(args, num_train_samples, global_batch_size, data_args.dataset_name)
    # torch AdamW defaults, as the official code; lr and wd are set every step from the schedules.
    optimizer = torch.optim.AdamW(
        optimizer_param_groups(model), lr=schedules.peak_lr, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon, weight_decay=args.weight_decay,
        # One fused kernel for all parameters (same update rule); it also takes the non-finite guard's flag as
        # `found_inf`, so a bad step is skipped on the device without a sync (step.py).
        fused=accelerator.device.type in ("cuda", "cpu"),
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    num_workers = resolve_num_workers(args.dataloader_num_workers)
    shard = shard_for_process(dataset, rank, world_size, args.seed, data_args.shuffle_buffer_size, num_workers)
    data_state = DataState()
    collator = BatchIndexedMaskCollator(config, seed=args.seed, rank=rank)  # runs in the DataLoader workers
    stream = ImageBatchStream(
        shard, image_column, args.per_device_train_batch_size, augmentation_settings(args, config.image_size_hw),
        seed=args.seed, rank=rank, num_workers=num_workers, state=data_state,
        collator=collator, pin_memory=accelerator.device.type == "cuda",
        log_batch_fingerprints=args.log_batch_fingerprints,
        worker_init_fn=workers.WorkerSignals(stop_signals(args)),  # workers never act on a stop signal
    )
    return PretrainingRun(
        accelerator=accelerator, model=model, optimizer=optimizer, collator=collator, stream=stream,
        schedules=schedules,
        lr_rule=resolve_learning_rates(args, global_batch_size)[3],
        image_processor=default_image_processor(config.image_size_hw),  # what evaluation of this checkpoint uses
        output_dir=Path(args.output_dir), world_size=world_size, global_batch_size=global_batch_size,
        data_state=data_state,
    )


def resolve_num_workers(requested: int) -> int:
    """`--dataloader_num_workers`: -1 (the default) picks `default_num_workers()` for this machine and launch."""
    workers = default_num_workers() if requested < 0 else requested
    logger.info("DataLoader workers per process: %d%s.", workers, " (automatic)" if requested < 0 else "")
    return workers


def augmentation_settings(args: PretrainingArguments, crop_size: tuple[int, int]) -> AugmentationSettings:
    return AugmentationSettings(
        crop_size=crop_size, crop_scale=tuple(args.crop_scale), horizontal_flip=args.use_horizontal_flip,
        color_distortion=args.use_color_distortion, color_jitter_strength=args.color_jitter_strength,
        gaussian_blur=args.use_gaussian_blur,
    )


def restore(run: PretrainingRun, resume_path: Path, ignore_data_skip: bool) -> None:
    """Load a checkpoint into `run`: weights, optimizer and RNGs (Accelerate), the step, and unless
    `ignore_data_skip` this process's data position and mask-collator state."""
    trainer_state = json.loads((resume_path / TRAINER_STATE_NAME).read_text())
    saved_world = int(trainer_state["world_size"])
    if saved_world != run.world_size and not ignore_data_skip:
        raise RuntimeError(
            f"{resume_path} was written by {saved_world} processes, this run has {run.world_size}: the data position "
            "cannot be restored. Relaunch with the same number of processes, or pass --ignore_data_skip to "
            "continue with fresh data order (batches then differ from an uninterrupted run)."
        )
    # Another global batch (world size): continue from the same number of images, not the same step count; checked
    # before loading, so that a refusal costs no read of the checkpoint.
    saved_step, saved_batch = int(trainer_state["global_step"]), int(trainer_state["global_batch_size"])
    global_step = step_for_global_batch(
        saved_step, saved_global_batch=saved_batch, saved_schedules=trainer_state.get("schedules"),
        schedules=run.schedules, global_batch=run.global_batch_size,
    )
    run.accelerator.load_state(str(resume_path))
    run.global_step = global_step
    if saved_batch != run.global_batch_size:
        logger.info("Checkpoint step %d at global batch %d = step %d at global batch %d (%d images seen).",
                    saved_step, saved_batch, global_step, run.global_batch_size, saved_step * saved_batch)
    if not ignore_data_skip:
        rank_file = resume_path / RANK_STATE_NAME.format(rank=run.accelerator.process_index)
        rank_state = json.loads(rank_file.read_text())
        restored = data_state_from_dict(rank_state["data"])
        for name, value in asdict(restored).items():  # in place: the stream holds this object
            setattr(run.data_state, name, value)
        run.collator.load_state_dict(rank_state["mask_collator"])
    logger.info("Resumed from %s at step %d (epoch %d of process 0).", resume_path, run.global_step,
                run.data_state.epoch)


def start_trackers(run: PretrainingRun, model_args, data_args, args, config_name: str) -> None:
    accelerator = run.accelerator
    if accelerator.is_main_process:
        logger.info("Model: %s, %.1fM trainable parameters.", config_name,
                    sum(p.numel() for p in accelerator.unwrap_model(run.model).trainable_parameters()) / 1e6)
        logger.info(
            "Global batch %d = %d per device x %d processes x %d accumulation steps; learning rate: %s.",
            run.global_batch_size, args.per_device_train_batch_size, run.world_size, args.gradient_accumulation_steps,
            run.lr_rule,
        )
        logger.info("Schedules: %s", run.schedules)
    if accelerator.log_with:
        tracker_config = {k: v for k, v in {**asdict(model_args), **asdict(data_args), **asdict(args)}.items()
                          if isinstance(v, (int, float, str, bool)) and k not in ("token", "hub_token")}
        tracker_config.update(world_size=run.world_size, global_batch_size=run.global_batch_size)
        accelerator.init_trackers("ijepa_pretraining", config=tracker_config)


@dataclass
class _LoggedStep:
    step: int
    loss: torch.Tensor  # on the device, all-reduced
    values: dict
    fingerprint: str | None
    data_state: DataState  # this process's position after the step


@dataclass
class LogWindow:
    """The steps since the last flush: their losses stay on the device and their `train_log.jsonl` lines are written
    together at the next logging step (or checkpoint, or the end), the only points where the loop reads the device."""

    start_state: DataState
    started: float = field(default_factory=time.perf_counter)
    steps: list[_LoggedStep] = field(default_factory=list)

    def add(self, run: PretrainingRun, loss: torch.Tensor, values: dict, fingerprint: str | None) -> None:
        self.steps.append(_LoggedStep(run.global_step, loss, values, fingerprint, DataState(**asdict(run.data_state))))


def flush_window(run: PretrainingRun, window: LogWindow) -> tuple[str | None, list[float]]:
    """Read the window's losses (one sync), write its log lines; on a non-finite loss roll the step counter and data
    position back to the last good step (the weights stayed there, see `step.py`) and return why training stops."""
    losses = torch.stack([s.loss for s in window.steps]).tolist() if window.steps else []
    bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
    kept = window.steps if bad is None else window.steps[:bad]
    if run.accelerator.is_main_process and kept:
        lines = []
        for logged, loss in zip(kept, losses):
            record = {"step": logged.step, "loss": loss, **logged.values}
            if logged.fingerprint is not None:
                record["batch_fingerprint"] = logged.fingerprint
            lines.append(json.dumps(record) + "\n")
        with (run.output_dir / TRAIN_LOG_NAME).open("a") as f:
            f.writelines(lines)
    run.run_losses.extend(losses[:len(kept)])
    last_state = kept[-1].data_state if kept else window.start_state
    bad_step = window.steps[bad].step if bad is not None else None
    window.steps, window.started, window.start_state = [], time.perf_counter(), last_state
    if bad_step is None:
        return None, losses
    for name, value in asdict(last_state).items():  # in place: the stream holds this object
        setattr(run.data_state, name, value)
    run.global_step = bad_step  # steps done with a finite loss: the weights are still those after them
    return f"non-finite loss ({losses[bad]}) at step {bad_step}", losses[:len(kept)]


def log_window(run: PretrainingRun, args, outcome, values: dict, losses: list[float], seconds: float,
               progress) -> None:
    """Tracker metrics and the progress bar at a logging step."""
    images_per_second = len(losses) * run.global_batch_size / max(seconds, 1e-9)
    window_loss = sum(losses) / len(losses)
    metrics = step_metrics(run.accelerator, outcome, values, window_loss, images_per_second, run.data_state)
    run.throughput_history.append((run.global_step, images_per_second))
    run.accelerator.log(metrics, step=run.global_step)
    progress.set_postfix(loss=f"{window_loss:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{images_per_second:.1f}")


def train(run: PretrainingRun, args: PretrainingArguments) -> str | None:
    """Optimizer steps until the schedule's end; returns why it stopped early (None when it did not).

    Between logging steps nothing here waits for the device (see `step.py`); the window of steps is read at logging
    steps, checkpoints and the end."""
    from tqdm.auto import tqdm

    accelerator, schedules = run.accelerator, run.schedules
    progress = tqdm(total=schedules.train_steps, initial=run.global_step, desc="pretraining", dynamic_ncols=True,
                    disable=not accelerator.is_local_main_process)
    run.model.train()
    parameters = [p for p in run.model.parameters() if p.requires_grad]
    normalizer = PixelNormalizer(accelerator.device)  # device constants made once
    halted = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # a non-finite loss was seen (sticky)
    window = LogWindow(DataState(**asdict(run.data_state)))
    with workers.signals_blocked(stop_signals(args)):  # a signal while workers start reaches only this process
        batches = iter(run.stream)
    settings = StepSettings.from_arguments(args)  # SDPA kernel order, garbage collection (cuda_settings.py)
    try:
        settings.start()
        while run.global_step < schedules.train_steps:
            values, step = schedules.at(run.global_step), run.global_step + 1
            logging_step = step % args.logging_steps == 0 or step == schedules.train_steps
            checkpoint_step = bool(args.checkpointing_steps) and step % args.checkpointing_steps == 0 and (
                step < schedules.train_steps)
            outcome = train_step(accelerator, run.model, run.optimizer, batches, run.stream, normalizer, values,
                                 args, parameters, halted, logging_step, global_step=run.global_step)
            window.add(run, outcome.loss, values, outcome.fingerprint)
            run.global_step += 1
            settings.after_step(run.global_step)
            progress.update(1)
            if logging_step or checkpoint_step:
                seconds = time.perf_counter() - window.started
                stop_reason, losses = flush_window(run, window)
                if stop_reason is not None:
                    return stop_reason
                if logging_step:
                    log_window(run, args, outcome, values, losses, seconds, progress)
            monitor_health(run, args, outcome)
            if run.preemption is not None and run.preemption.should_stop(accelerator, run.global_step,
                                                                         schedules.train_steps):
                stop_reason, _ = flush_window(run, window)
                return stop_reason or run.preemption.stop_reason()  # `pretrain` saves this step's checkpoint
            if checkpoint_step:
                logger.info("Saved checkpoint %s", run.save(args.save_total_limit, export_model=False))
        return None
    finally:
        settings.stop()
        batches.close()  # stops the DataLoader workers before the interpreter tears pyarrow down
        run.stream.close()
        progress.close()


def monitor_health(run: PretrainingRun, args: PretrainingArguments, outcome) -> None:
    """RankMe of the target features at logging steps; the k-NN monitor every --monitor_steps (main process logs)."""
    step = run.global_step
    metrics = {}
    if step % args.logging_steps == 0:
        value, threshold = monitoring.rankme_of_step(outcome.outputs)
        monitoring.warn_if_collapsing(value, threshold, step)
        metrics["health/rankme"] = value
        run.rankme_history.append((step, value))
    if run.knn_monitor is not None and args.monitor_steps and step % args.monitor_steps == 0:
        target_encoder = run.accelerator.unwrap_model(run.model).ijepa
        metrics["health/knn_accuracy"] = run.knn_monitor.accuracy(target_encoder, run.accelerator.device)
        logger.info("Step %d: k-NN accuracy of the target encoder %.2f%%.", step, 100 * metrics["health/knn_accuracy"])
    if metrics:
        run.accelerator.log(metrics, step=step)


def final_knn(run: PretrainingRun, seed: int) -> dict:
    """`{"knn_accuracy", "knn_accuracy_random_init"}` of the target encoder at the end (empty without labels)."""
    if run.knn_monitor is None:
        return {}
    unwrapped = run.accelerator.unwrap_model(run.model)
    device = run.accelerator.device
    return {
        "knn_accuracy": run.knn_monitor.accuracy(unwrapped.ijepa, device),
        "knn_accuracy_random_init": run.knn_monitor.random_init_accuracy(unwrapped.config, seed, device),
    }


def run_results(run: PretrainingRun, checkpoint: Path, start_step: int, runtime: float) -> dict:
    """The run's summary (also `all_results.json`); checks that every process ends with the same target encoder."""
    from accelerate.utils import gather_object

    accelerator = run.accelerator
    checksums = gather_object([tensor_checksum(accelerator.unwrap_model(run.model).target_encoder)])
    corrupt_total = int(accelerator.reduce(
        torch.tensor(float(run.data_state.corrupt_images), device=accelerator.device), reduction="sum"
    ).item())
    losses = run.run_losses
    results = {
        "global_step": run.global_step,
        "train_loss": sum(losses) / len(losses) if losses else float("nan"),
        "final_loss": losses[-1] if losses else float("nan"),
        "world_size": run.world_size,
        "global_batch_size": run.global_batch_size,
        "train_runtime": runtime,
        "train_samples_per_second": (run.global_step - start_step) * run.global_batch_size / max(runtime, 1e-9),
        "epoch": run.data_state.epoch,
        "corrupt_images_skipped": corrupt_total,
        "target_encoder_sha256": checksums,
        "checkpoint": str(checkpoint),
        "output_dir": str(run.output_dir),
    }
    if len(set(checksums)) != 1:
        raise RuntimeError(f"The target encoder differs between processes: {checksums}. Please report this bug.")
    return results


def train_and_save(run: PretrainingRun, args: PretrainingArguments) -> tuple[str | None, Path]:
    """`train`, then the end-of-run checkpoint (also after a non-finite loss or a preemption: the weights are those of
    the last good step), under the preemption guard. Faults are named wherever torch raises them: a dead DataLoader
    worker (torch's SIGCHLD handler raises at whatever line runs) and a lost rank (a collective fails or times out
    after --distributed_timeout_seconds)."""
    run.preemption = PreemptionGuard.from_arguments(args)
    workers.set_collective_timeout(args.distributed_timeout_seconds)  # setup ran under torch's default timeout
    try:
        with run.preemption:  # a repeated SIGTERM does not stop the save; a second Ctrl-C abandons it
            stop_reason = train(run, args)
            return stop_reason, run.save(args.save_total_limit)
    except RuntimeError as err:
        known = run.stream.data_error(err) or workers.lost_process_error(err, run.accelerator)
        if known is None:
            raise
        logger.error("%s", known)
        raise known from err


def pretrain(model_args: ModelArguments, data_args: DataTrainingArguments, args: PretrainingArguments) -> dict:
    """Run I-JEPA pretraining with these arguments (the `scripts/pretrain.py` command line's dataclasses) and return
    the results (`all_results.json`). Raises `validation.ArgumentError` before anything is built for arguments that
    cannot make a run, `TrainingStopped` after saving the last good state on a non-finite loss, `preemption.Preempted`
    after saving on SIGTERM or --save_on_signal, `checkpoints.CheckpointSpaceError` when the disk fills up.
    """
    validate_arguments(model_args, data_args, args)  # before any data is read or model built
    apply_allocator_settings(args.cuda_allocator_settings)  # before anything initialises CUDA
    accelerator = make_accelerator(args, model_args)
    setup_logging(accelerator)
    world_size = check_world_size(accelerator)
    resume_path = prepare_output_dir(accelerator, args)
    validate_world_size(args, data_args, world_size, resume_path)
    run = build_run(model_args, data_args, args, accelerator)
    run.knn_monitor = monitoring.build_knn_monitor(
        data_args, args, run.image_processor, accelerator.unwrap_model(run.model).config.num_channels
    )
    if resume_path is not None:
        restore(run, resume_path, args.ignore_data_skip)
    start_trackers(run, model_args, data_args, args, model_args.config_name)
    start_step, start_time = run.global_step, time.perf_counter()
    stop_reason, checkpoint = train_and_save(run, args)
    results = run_results(run, checkpoint, start_step, time.perf_counter() - start_time)
    results.update(final_knn(run, args.seed))
    results["rankme"] = run.rankme_history
    results["images_per_second_by_window"] = run.throughput_history
    if accelerator.is_main_process:
        (run.output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
    results["is_main_process"] = accelerator.is_main_process  # not in the file: which process returned these
    accelerator.end_training()
    if run.preemption.agreed_step is not None:
        logger.warning(run.preemption.message(checkpoint))
        raise Preempted(run.preemption.message(checkpoint))
    if stop_reason is not None:
        message = (
            f"Training stopped: {stop_reason}. The last good state is saved in {checkpoint}; resume from it with "
            "--resume_from_checkpoint after lowering the learning rate or enabling --max_grad_norm."
        )
        logger.error(message)
        raise TrainingStopped(message)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(run.model)
        write_model_card(run.output_dir, unwrapped.config, model_args, data_args, args, results, run.lr_rule)
        if args.push_to_hub:
            logger.info("Pushed to %s", push_run_to_hub(run.output_dir, args))
    return results
