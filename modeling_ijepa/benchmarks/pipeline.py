"""The `pipeline` benchmark: images/s of the real pretraining loop (`modeling_ijepa.training.pretrain`, data streamed
from a parquet dataset through the DataLoader, default settings) against the model-only step on pre-made uint8
batches (IJepaForPreTraining + IJepaMaskCollator + fused AdamW + EMA), same config, batch and threads.

The loop's rate is taken between two runs of different lengths (`long - short` steps over the difference of their
times), so start-up (workers, dataset opening) and the final save cancel out.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def model_only_images_per_second(config_name: str, batch_size: int, steps: int, seed: int = 0) -> float:
    """The step alone: normalise pre-made uint8 batches, masks from `IJepaMaskCollator`, forward, backward, fused
    AdamW, EMA (what the loop does per step, without data)."""
    from .. import IJepaForPreTraining, IJepaMaskCollator, ijepa_config_from_preset
    from ..training.data import PixelNormalizer

    torch.manual_seed(seed)
    config = ijepa_config_from_preset(config_name)
    model = IJepaForPreTraining(config).train()
    model.check_mask_values = False
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.04, fused=True)
    collator, normalizer = IJepaMaskCollator(config, seed=seed), PixelNormalizer(torch.device("cpu"))
    height, width = config.image_size_hw
    generator = torch.Generator().manual_seed(seed)
    pixels = [torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, generator=generator)
              for _ in range(4)]

    def step(i: int) -> None:
        context_mask, target_mask = collator.sample(batch_size)
        loss = model(pixel_values=normalizer(pixels[i % 4]), context_mask=context_mask, target_mask=target_mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target_encoder(0.996)

    for i in range(2):  # warm-up
        step(i)
    started = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * batch_size / (time.perf_counter() - started)


def loop_seconds(dataset_dir: str, config_name: str, batch_size: int, steps: int, output_dir: Path,
                 extra: list[str]) -> float:
    from ..training import parse_arguments, pretrain

    args = ["--dataset_name", dataset_dir, "--streaming", "true", "--config_name", config_name,
            "--per_device_train_batch_size", str(batch_size), "--max_steps", str(steps), "--report_to", "none",
            "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--logging_steps", "10", *extra]
    started = time.perf_counter()
    pretrain(*parse_arguments(args))
    return time.perf_counter() - started


def pipeline_benchmark(config_name: str = "tiny-cpu", batch_size: int = 64, steps: int = 60,
                       extra: list[str] | None = None, dataset_dir: str | None = None) -> dict:
    """`{"loop_images_per_s", "model_only_images_per_s", "ratio", ...}` measured in this process."""
    from ..training.fashion_mnist import export_fashion_mnist

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset_dir = dataset_dir or export_fashion_mnist(root / "fashion_mnist", split="train")
        short = loop_seconds(dataset_dir, config_name, batch_size, steps // 3, root / "short", extra or [])
        long = loop_seconds(dataset_dir, config_name, batch_size, steps, root / "long", extra or [])
    loop_rate = (steps - steps // 3) * batch_size / max(long - short, 1e-9)
    model_rate = model_only_images_per_second(config_name, batch_size, steps)
    return {"kind": "pipeline", "config": config_name, "batch_size": batch_size, "steps": steps,
            "extra": " ".join(extra or []) or "defaults", "loop_images_per_s": loop_rate,
            "model_only_images_per_s": model_rate, "ratio": loop_rate / model_rate,
            "threads": torch.get_num_threads()}


def format_pipeline_table(results: list[dict]) -> str:
    lines = ["| config | batch | loop settings | threads | loop (img/s) | model-only step (img/s) | loop/model |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['config']} | {r['batch_size']} | {r['extra']} | {r['threads']} | "
                     f"{r['loop_images_per_s']:.1f} | {r['model_only_images_per_s']:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines)
