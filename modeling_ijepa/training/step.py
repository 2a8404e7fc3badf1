"""One optimizer step of pretraining (micro-batches, backward, AdamW, EMA) and the metrics logged about it.

No host-device synchronisation happens here between logging steps: the loss stays on the device (all-reduced once
per step, asynchronously on GPUs), the gradient norm is computed only when clipping or logging, and the non-finite
guard runs on the device. A non-finite loss sets a sticky `halted` flag that the fused AdamW reads as `found_inf`, so
that step and every later one leave the weights, the optimizer moments and its step counts untouched; the loop reads
the flag at its next logging step and stops there, saving the last good state. (The EMA update is the model's own
`update_target_encoder`, which takes a host number: between the bad step and that logging step it keeps pulling the
target encoder towards the unchanged, still good, context encoder. With `--logging_steps 1` the check is every step.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from ..masking_ijepa import derive_seed
from .data import DataState, PixelNormalizer, batch_fingerprint

__all__ = ["StepOutcome", "batch_fingerprint", "step_metrics", "train_step"]


@dataclass
class StepOutcome:
    """What one optimizer step produced. `loss` and `grad_norm` are device tensors (means over micro-batches and
    processes); read them only at logging steps."""

    loss: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    outputs: Any = None  # the last micro-batch's `IJepaForPreTrainingOutput`, at logging steps only
    context_length: int = 0
    target_length: int = 0
    fingerprint: str | None = None


# Salt of the SIGReg direction seeds (`derive_seed(seed, SIGREG_SEED_SALT, step, micro_batch)`), apart from the masks'.
SIGREG_SEED_SALT = -2


def forward_micro_batch(model, batch: dict, normalizer: PixelNormalizer, sigreg_seed: int | None = None):
    """The model on one batch from the DataLoader (uint8 pixels and masks moved without blocking); `sigreg_seed`
    (the same on every process) seeds the SIGReg directions when the model's config enables SIGReg."""
    device = normalizer.device
    extra = {"allow_overlap": True} if batch.get("allow_overlap") else {}
    if sigreg_seed is not None:
        extra["sigreg_seed"] = sigreg_seed
    return model(
        pixel_values=normalizer(batch["pixel_values"]),
        context_mask=[m.to(device, non_blocking=True) for m in batch["context_mask"]],
        target_mask=[m.to(device, non_blocking=True) for m in batch["target_mask"]],
        **extra,
    )


def skip_if_halted(optimizer, halted: torch.Tensor) -> None:
    """Let the fused AdamW skip its update on the device when `halted` (its `found_inf` input, as under a
    GradScaler); optimizers without that input check on the host (one sync per step)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if inner.defaults.get("fused"):
        inner.found_inf = halted.float()
    elif bool(halted):
        raise FloatingPointError("non-finite loss")  # the loop turns this into a stop at this step


def train_step(accelerator, model, optimizer, batches, stream, normalizer: PixelNormalizer, values: dict, args,
               parameters, halted: torch.Tensor, logging_step: bool, global_step: int = 0) -> StepOutcome:
    """One optimizer step: `gradient_accumulation_steps` micro-batches, then the EMA update of the target encoder.

    The learning rate and weight decay come from `values` (the schedules at this step). Masks come with the batches
    (sampled in the DataLoader workers from the batch counter). `halted` (a device bool) is or-ed with "this step's
    loss, all-reduced, is not finite"; once set no update changes the weights (see the module docstring).
    """
    for group in optimizer.param_groups:
        group["lr"] = values["lr"]
        if group["apply_weight_decay"]:
            group["weight_decay"] = values["weight_decay"]
    outcome, loss_sum, fingerprints = StepOutcome(), None, []
    sigreg = getattr(accelerator.unwrap_model(model).config, "sigreg_weight", 0) > 0
    for micro_batch in range(args.gradient_accumulation_steps):
        batch = next(batches)
        fingerprints.append(stream.last_fingerprint)
        with accelerator.accumulate(model):
            sigreg_seed = derive_seed(args.seed, SIGREG_SEED_SALT, global_step, micro_batch) if sigreg else None
            outputs = forward_micro_batch(model, batch, normalizer, sigreg_seed)
            loss = outputs.loss.detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients:
                outcome.loss = accelerator.reduce(loss_sum / args.gradient_accumulation_steps, reduction="mean")
                torch.logical_or(halted, ~torch.isfinite(outcome.loss), out=halted)
                if args.max_grad_norm > 0:
                    outcome.grad_norm = accelerator.clip_grad_norm_(parameters, args.max_grad_norm)
                elif logging_step:  # measured for the log only: no rescaling of every gradient by 1.0
                    outcome.grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
                skip_if_halted(optimizer, halted)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    # One EMA update per real optimizer step, on every process with the same momentum.
    accelerator.unwrap_model(model).update_target_encoder(values["momentum"])
    # Kept only where the loop reads it (metrics and RankMe at logging steps): otherwise this step's variable-length
    # activations (~0.3 GB at ViT-H/14 batch 128) would stay allocated through the next step's forward.
    outcome.outputs = outputs if logging_step else None
    outcome.context_length, outcome.target_length = batch["context_mask"][0].size(1), batch["target_mask"][0].size(1)
    if args.log_batch_fingerprints:
        outcome.fingerprint = hashlib.sha256("".join(fingerprints).encode()).hexdigest()[:16]
    return outcome


def step_metrics(accelerator, outcome: StepOutcome, values: dict, window_loss: float, images_per_second: float,
                 data_state: DataState) -> dict[str, float]:
    """Tracker metrics at a logging step (reads the device values: the one sync of the logging window; the
    corrupt-image count is summed over processes)."""
    batch = outcome.outputs.context_hidden_states.size(0) // max(1, len(outcome.outputs.context_mask))
    target = outcome.outputs.target_hidden_states.detach().float()  # (T*C*B, Kt, D)
    target = target.view(-1, batch, *target.shape[1:])  # (T*C, B, Kt, D)
    corrupt = accelerator.reduce(
        torch.tensor(float(data_state.corrupt_images), device=accelerator.device), reduction="sum"
    ).item()
    return {
        "train/loss": window_loss,
        "train/learning_rate": values["lr"],
        "train/weight_decay": values["weight_decay"],
        "train/ema_momentum": values["momentum"],
        "train/grad_norm": float(outcome.grad_norm) if outcome.grad_norm is not None else float("nan"),
        "train/context_length": outcome.context_length,
        "train/target_length": outcome.target_length,
        "train/images_per_second": images_per_second,
        # Collapse monitor: std across the images of the batch of each (normalised) target feature, averaged over
        # blocks, patches and features; it falls towards 0 if the representations collapse.
        "train/target_feature_std": target.std(dim=1).mean().item(),
        "data/epoch": data_state.epoch,
        "data/corrupt_images": corrupt,
    }
