"""Schedules of pretraining: learning rate, weight decay and EMA momentum as pure functions of the global step.

Everything here takes numbers (not argument objects), so a sweep, a notebook or a test can call it directly;
`arguments.resolve_schedules` turns the command line's `PretrainingArguments` into these numbers.

Step semantics of the official code: at iteration i (0-based) `WarmupCosineSchedule.step()` and
`CosineWDSchedule.step()` are called *before* the optimizer step, so iteration i uses their value for counter i + 1;
the momentum generator yields `ema0 + i * (ema1 - ema0) / (ipe * epochs * ipe_scale)` for iteration i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..modeling_ijepa import ema_momentum


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


def ema_momentum_at(step: int, *, start: float, end: float, total_steps: float, ramp_steps: int | None = None) -> float:
    """EMA momentum for the target update after optimizer step `step` (0-based). Default (`ramp_steps=None`): the
    official linear ramp from `start` at step 0 to `end` at `total_steps` (`ema_momentum`). With `ramp_steps` (a
    short-run option): linear from `start` to `end` over the first `ramp_steps` steps, then held at `end`
    (`ramp_steps=0`: `end` from the first step)."""
    if ramp_steps is None:
        return ema_momentum(step, total_steps, start=start, end=end)
    if ramp_steps <= 0:
        return end
    return start + min(step, ramp_steps) * (end - start) / ramp_steps


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
    ema_ramp_steps: int | None = None  # None: the official ramp over momentum_steps; else over these steps, then held

    def at(self, step: int) -> dict[str, float]:
        """`{"lr", "weight_decay", "momentum"}` for optimizer step `step` (0-based)."""
        return {
            "lr": learning_rate_at(
                step, peak_lr=self.peak_lr, start_lr=self.start_lr, final_lr=self.final_lr,
                warmup_steps=self.warmup_steps, total_steps=self.schedule_steps,
            ),
            "weight_decay": weight_decay_at(
                step, start_wd=self.start_wd, final_wd=self.final_wd, total_steps=self.schedule_steps
            ),
            "momentum": ema_momentum_at(step, start=self.ema_start, end=self.ema_end, total_steps=self.momentum_steps,
                                        ramp_steps=self.ema_ramp_steps),
        }


def scaled_learning_rates(
    *, base_lr: float, start_lr: float, final_lr: float, reference_batch_size: int, global_batch_size: int,
    learning_rate: float | None = None,
) -> tuple[float, float, float, str]:
    """(peak, start, final) learning rates and a sentence stating the rule that produced them.

    Rule: the official rates are for a global batch of `reference_batch_size` (2048); with another global batch they
    are scaled linearly (`lr * global_batch / 2048`, the linear scaling rule of Goyal et al. 2017). An explicit
    `learning_rate` is used as is, and `start_lr`/`final_lr` keep their ratio to the base rate.
    """
    if learning_rate is not None:
        factor = learning_rate / base_lr
        rule = (
            f"--learning_rate {learning_rate:g} given: used as is (start/final lr keep their ratio to the base "
            f"rate {base_lr:g})"
        )
    else:
        factor = global_batch_size / reference_batch_size
        rule = (
            f"linear scaling: lr = {base_lr:g} x global batch {global_batch_size} / "
            f"{reference_batch_size} = {base_lr * factor:.4g}"
        )
    return base_lr * factor, start_lr * factor, final_lr * factor, rule


def run_length(
    *, num_train_epochs: float, max_steps: int, num_train_samples: int | None, global_batch_size: int,
    dataset_name: str = "",
) -> tuple[int, float]:
    """(optimizer steps of the run, steps per epoch = official `ipe`), from `max_steps` or epochs x samples.

    With `max_steps > 0` the schedules are shaped as if those steps were `num_train_epochs` epochs (so a warmup
    given in epochs keeps its share of the run).
    """
    if num_train_epochs <= 0:
        raise ValueError(f"--num_train_epochs must be positive, got {num_train_epochs}.")
    if max_steps > 0:
        return max_steps, max_steps / num_train_epochs
    if num_train_samples is None:
        raise ValueError(
            f"Cannot tell how many steps to train: the number of samples in {dataset_name or 'the dataset'} is not "
            "known (streaming). Pass --max_steps N, or --num_train_samples N together with --num_train_epochs."
        )
    # Official loader: drop_last=True, so ipe = samples // global batch.
    steps_per_epoch = num_train_samples // global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{num_train_samples} samples per epoch are fewer than one global batch of {global_batch_size}; "
            "lower --per_device_train_batch_size or pass --max_steps."
        )
    return int(num_train_epochs * steps_per_epoch), steps_per_epoch


def plan_schedules(
    *, train_steps: int, steps_per_epoch: float, warmup_epochs: float, warmup_steps: int | None, ipe_scale: float,
    learning_rates: tuple[float, float, float], weight_decay: float, final_weight_decay: float,
    ema_momentum_start: float, ema_momentum_end: float, ema_momentum_ramp_steps: int | None = None,
) -> Schedules:
    """The run's `Schedules`; learning rate and weight decay end at `ipe_scale * train_steps` (official `T_max`)."""
    peak_lr, start_lr, final_lr = learning_rates
    return Schedules(
        train_steps=train_steps,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup_steps if warmup_steps is not None else int(warmup_epochs * steps_per_epoch),
        schedule_steps=max(1, int(ipe_scale * train_steps)),
        momentum_steps=ipe_scale * train_steps,
        peak_lr=peak_lr,
        start_lr=start_lr,
        final_lr=final_lr,
        start_wd=weight_decay,
        final_wd=final_weight_decay,
        ema_start=ema_momentum_start,
        ema_end=ema_momentum_end,
        ema_ramp_steps=ema_momentum_ramp_steps,
    )


# Between two global batches, epoch-based run lengths differ by the images `drop_last` discards (up to one batch per
# epoch), so schedules planned from the same epochs agree in images only to this fraction.
RESUME_SCHEDULE_TOLERANCE = 0.01


def step_for_global_batch(
    step: int, *, saved_global_batch: int, saved_schedules: dict | None, schedules: Schedules, global_batch: int
) -> int:
    """The optimizer step at `global_batch` that has consumed as many images as `step` steps at
    `saved_global_batch` (a resume on another world size), so the schedules continue from the same point.

    The schedules, planned again at the new batch, must describe the same run in images (true when the run length and
    warmup come from epochs); otherwise continuing is ambiguous and a `ValueError` says which `--max_steps` and
    `--warmup_steps` would make it the same run. The step is rounded down (less than one batch of images).
    """
    if saved_global_batch == global_batch:
        return step
    mismatched, suggestions = [], []
    for name, flag in (("train_steps", "--max_steps"), ("warmup_steps", "--warmup_steps")):
        if saved_schedules is None:
            break
        saved_images, new_images = saved_schedules[name] * saved_global_batch, getattr(schedules, name) * global_batch
        if abs(saved_images - new_images) > RESUME_SCHEDULE_TOLERANCE * max(saved_images, global_batch):
            mismatched.append(f"{name} {saved_schedules[name]} x {saved_global_batch} = {saved_images} images, now "
                              f"{getattr(schedules, name)} x {global_batch} = {new_images}")
            suggestions.append(f"{flag} {round(saved_images / global_batch)}")
    if mismatched:
        raise ValueError(
            f"Resuming at global batch {global_batch} a run trained at global batch {saved_global_batch}: the "
            f"schedules describe another run in images ({'; '.join(mismatched)}), so the learning rate, weight "
            f"decay and EMA momentum would jump. Pass {' '.join(suggestions)} (steps at the new batch) to continue "
            f"the same run, or relaunch with global batch {saved_global_batch}."
        )
    return step * saved_global_batch // global_batch
