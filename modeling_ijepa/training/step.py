"""One optimizer step of pretraining (micro-batches, backward, AdamW, EMA) and the metrics logged about it."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from .data import DataState, normalize


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
