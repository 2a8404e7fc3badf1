#!/usr/bin/env python
"""Screen a small-scale I-JEPA recipe quickly: an in-process pretraining loop on Fashion-MNIST, then linear probes.

    python scripts/screen_recipe.py --run_name control --max_steps 300
    python scripts/screen_recipe.py --run_name long --max_steps 1500 --config_overrides initializer_range=0.05
    python scripts/screen_recipe.py --run_name random --max_steps 0        # probes of the untrained encoder + pixels

This is the loop behind the recipe tables in docs/evaluation.md. It uses exactly the package's pieces
(`IJepaForPreTraining`, `IJepaMaskCollator`, `update_target_encoder`) but skips what makes `scripts/pretrain.py` a
production trainer (datasets, Accelerate, checkpoints), so one run of 300 steps takes about 3 minutes on one CPU
thread. Images stay one-channel, normalised with the dataset's statistics and zero-padded from 28 to 32 px (or
resized to `--image_size`); a random resized crop (bilinear, aspect ratio 3/4 to 4/3) is applied per image. The
schedules are simpler than the pretraining script's: linear warmup from 0 then cosine to 0 for the lr, constant
weight decay, EMA momentum linear from `--ema_momentum_start` to `--ema_momentum_end`. All randomness comes from
`--seed`, so a run is reproducible.

Probes (`modeling_ijepa.evaluation.linear_probe`, standardised features, L2 sweep picked on held-out train) on the
first `--probe_train_samples` training images and `--probe_test_samples` test images:
* `target_last`, `target_last4`: average-pooled last layer / last 4 layers of the EMA target encoder (the paper's);
* `target_grid`: the last layer average-pooled on a 2x2 grid of patches (keeps the coarse layout pixels have);
* `context_last`, `context_grid`: the same for the context encoder;
* with `--max_steps 0`: the untrained encoder and the raw pixels.
One JSON line per run is appended to `--results_file`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

SCRIPTS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS_DIR))

from modeling_ijepa.training.fashion_mnist import DEFAULT_SOURCE_DIR, IDX_FILES, read_idx_images, read_idx_labels  # noqa: E402
from modeling_ijepa.training.arguments import parse_config_overrides  # noqa: E402

from modeling_ijepa import IJepaForPreTraining, IJepaMaskCollator, IJepaModel, ijepa_config_from_preset  # noqa: E402
from modeling_ijepa.evaluation import linear_probe, pooled_features  # noqa: E402

logger = logging.getLogger("screen_recipe")

# Fashion-MNIST training-set pixel statistics (images scaled to [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FEATURE_BATCH_SIZE = 500


@dataclass
class ScreenArguments:
    run_name: str = field(metadata={"help": "Name of the run in the results file."})
    source_dir: str = field(default=DEFAULT_SOURCE_DIR, metadata={"help": "Directory with the Fashion-MNIST IDX files."})
    config_name: str = field(default="tiny-cpu", metadata={"help": "Preset of the model."})
    config_overrides: str | None = field(
        default="initializer_range=0.05", metadata={"help": "Comma-separated key=value config overrides."}
    )
    image_size: int = field(default=32, metadata={"help": "32: zero-pad 28 -> 32; any other size: resize."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps; 0 probes the untrained encoder."})
    batch_size: int = field(default=64)
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    warmup_fraction: float = field(default=0.1, metadata={"help": "Share of the steps spent in linear warmup."})
    weight_decay: float = field(default=0.04, metadata={"help": "AdamW weight decay of weight matrices (constant)."})
    ema_momentum_start: float = field(default=0.996)
    ema_momentum_end: float = field(default=1.0)
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0], metadata={"help": "RandomResizedCrop scale; 1 1 = no crop."})
    probe_train_samples: int = field(default=5000)
    probe_test_samples: int = field(default=2000)
    threads: int = field(default=1, metadata={"help": "torch.set_num_threads."})
    seed: int = field(default=0)
    log_every: int = field(default=50)
    results_file: str = field(default="screen_results.jsonl", metadata={"help": "JSON lines, one per run."})


def load_split(source_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_file, labels_file = IDX_FILES[split]
    images = torch.from_numpy(read_idx_images(Path(source_dir) / images_file).copy())
    labels = torch.from_numpy(read_idx_labels(Path(source_dir) / labels_file).astype("int64"))
    return images, labels


def to_model_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 `(N, 28, 28)` -> normalised float `(N, 1, image_size, image_size)`."""
    pixels = images.float().div(255).unsqueeze(1)
    if image_size == 32:
        pixels = F.pad(pixels, (2, 2, 2, 2))
    elif image_size != pixels.size(-1):
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (pixels - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


@torch.no_grad()
def probe_features(encoder: IJepaModel, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Average-pooled last layer and last 4 layers (as `scripts/linear_probe.py`), and the last layer average-pooled
    on a 2x2 grid of patches, for every image."""
    encoder.eval()
    last, last4, grid = [], [], []
    for start in range(0, len(pixels), FEATURE_BATCH_SIZE):
        batch = pixels[start:start + FEATURE_BATCH_SIZE]
        pooled = pooled_features(encoder, batch, num_layers=4)  # (B, 4 * D), the last layer first
        last4.append(pooled)
        last.append(pooled[:, :encoder.config.hidden_size])
        tokens = encoder(batch).last_hidden_state  # (B, N, D)
        side = math.isqrt(tokens.size(1))
        grid.append(F.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(len(tokens), -1, side, side), 2).flatten(1))
    return {"last": torch.cat(last), "last4": torch.cat(last4), "grid": torch.cat(grid)}


def probe_encoder(encoder, train_pixels, train_labels, test_pixels, test_labels, kinds) -> dict[str, float]:
    train, test = probe_features(encoder, train_pixels), probe_features(encoder, test_pixels)
    return {
        kind: round(100 * linear_probe(train[kind], train_labels, test[kind], test_labels).test_accuracy, 2)
        for kind in kinds
    }


def random_resized_crops(pixels: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Per image: a crop of `scale` times the area, aspect ratio log-uniform in [3/4, 4/3], resized back (bilinear)."""
    _, _, height, width = pixels.shape
    out = torch.empty_like(pixels)
    for i in range(len(pixels)):
        area = scale[0] + torch.rand(1, generator=generator).item() * (scale[1] - scale[0])
        ratio = math.exp(math.log(3 / 4) + torch.rand(1, generator=generator).item() * math.log(16 / 9))
        crop_h = min(height, max(1, round(math.sqrt(area * height * width / ratio))))
        crop_w = min(width, max(1, round(math.sqrt(area * height * width * ratio))))
        top = torch.randint(0, height - crop_h + 1, (1,), generator=generator).item()
        left = torch.randint(0, width - crop_w + 1, (1,), generator=generator).item()
        crop = pixels[i:i + 1, :, top:top + crop_h, left:left + crop_w]
        out[i] = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
    return out


def learning_rate_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def pretrain(args: ScreenArguments, model: IJepaForPreTraining, train_images: torch.Tensor) -> dict:
    collator = IJepaMaskCollator(model.config, seed=args.seed)
    decay = [p for p in model.trainable_parameters() if p.ndim > 1]
    no_decay = [p for p in model.trainable_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(0.9, 0.95),
    )
    warmup_steps = int(args.warmup_fraction * args.max_steps)
    crop_scale = tuple(args.crop_scale)
    generator = torch.Generator().manual_seed(args.seed)  # batches and crops
    model.check_mask_values = False
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.max_steps):
        index = torch.randint(0, len(train_images), (args.batch_size,), generator=generator)
        pixels = to_model_input(train_images[index], args.image_size)
        if crop_scale[0] < 1:
            pixels = random_resized_crops(pixels, crop_scale, generator)
        batch = collator([{"pixel_values": image} for image in pixels])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args.learning_rate, warmup_steps, args.max_steps)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target_encoder(
            args.ema_momentum_start + step * (args.ema_momentum_end - args.ema_momentum_start) / args.max_steps
        )
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.max_steps - 1:
            recent = losses[-args.log_every:]
            logger.info("step %d loss %.4f (%.0f s)", step, sum(recent) / len(recent), time.perf_counter() - start)
    seconds = time.perf_counter() - start
    tail = losses[-args.log_every:]
    return {"train_seconds": round(seconds, 1), "images_per_second": round(args.max_steps * args.batch_size / seconds, 1),
            "first_loss": round(losses[0], 4), "final_loss": round(sum(tail) / len(tail), 4)}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(ScreenArguments).parse_args_into_dataclasses(args=argv)
    if len(args.crop_scale) != 2 or not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise ValueError(f"--crop_scale takes two numbers 0 < low <= high <= 1, got {args.crop_scale}.")
    if not Path(args.source_dir, IDX_FILES["train"][0]).is_file():
        raise FileNotFoundError(
            f"No Fashion-MNIST IDX files in {args.source_dir}: install Debian's package "
            "(apt-get install -y dataset-fashion-mnist) or pass --source_dir."
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = parse_config_overrides(args.config_overrides)
    config = ijepa_config_from_preset(args.config_name, num_channels=1, image_size=args.image_size, **overrides)
    train_images, train_labels = load_split(args.source_dir, "train")
    test_images, test_labels = load_split(args.source_dir, "test")
    probe_train = to_model_input(train_images[:args.probe_train_samples], args.image_size)
    probe_test = to_model_input(test_images[:args.probe_test_samples], args.image_size)
    probe_train_labels, probe_test_labels = train_labels[:args.probe_train_samples], test_labels[:args.probe_test_samples]

    model = IJepaForPreTraining(config)
    result = {"run_name": args.run_name, "arguments": asdict(args)}
    kinds = ("last", "last4", "grid")
    if args.max_steps > 0:
        result.update(pretrain(args, model, train_images))
        target = probe_encoder(model.ijepa, probe_train, probe_train_labels, probe_test, probe_test_labels, kinds)
        context = probe_encoder(model.context_encoder, probe_train, probe_train_labels, probe_test, probe_test_labels,
                                ("last", "grid"))
        result.update({f"target_{k}": v for k, v in target.items()})
        result.update({f"context_{k}": v for k, v in context.items()})
    else:
        untrained = probe_encoder(model.ijepa, probe_train, probe_train_labels, probe_test, probe_test_labels, kinds)
        result.update({f"random_init_{k}": v for k, v in untrained.items()})
        pixels = linear_probe(
            train_images[:args.probe_train_samples].flatten(1).float() / 255, probe_train_labels,
            test_images[:args.probe_test_samples].flatten(1).float() / 255, probe_test_labels,
        )
        result["raw_pixels"] = round(100 * pixels.test_accuracy, 2)
    print(json.dumps(result))
    with open(args.results_file, "a") as handle:
        handle.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
