"""The `loop` section (issue 20): the real pretraining loop (`modeling_ijepa.training.pretrain`, what
`scripts/pretrain.py` runs) on a synthetic ImageNet-like JPEG parquet dataset, timed by its logging windows from
step 0 (`all_results.json`'s `images_per_second_by_window`: wall clock per window, start-up and compilation
included), eager or with `--torch_compile`.

Reported: every window's images/s, the rate of the first `FIRST_STEPS` steps, the steady rate over the windows after
them, and the seconds dynamo spent compiling (`torch._dynamo.utils.compilation_time_metrics`; 0 when eager), so
compilation is reported apart from the rates. The dataset: 500x375 and 375x500 JPEGs (ImageNet's typical sizes) in
parquet shards (at least as many shards as DataLoader workers, so every worker reads), made of `distinct` smooth
random colour fields with noise, repeated to `num_images` rows (decoding cost does not depend on repetition).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch

FIRST_STEPS = 20  # issue 20: "its first 20 steps at >= half the steady rate"
JPEG_QUALITY = 90
IMAGE_SIZES = ((500, 375), (375, 500))  # (width, height), landscape and portrait


def synthetic_jpegs(distinct: int, seed: int = 0) -> list[bytes]:
    """`distinct` JPEG files: smooth random colour fields (upsampled 12x16 noise) plus fine noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for index in range(distinct):
        width, height = IMAGE_SIZES[index % 2]
        coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((width, height),
                                                                                          Image.BILINEAR)
        pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0.0, 12.0, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        files.append(buffer.getvalue())
    return files


def make_jpeg_parquet(root: str | Path, num_images: int, num_shards: int = 32, distinct: int = 64,
                      seed: int = 0) -> str:
    """Write `num_images` JPEG records as `root/data/train-XXXXX-of-YYYYY.parquet`; returns `root` (pass it as
    `--dataset_name`)."""
    import datasets

    if num_images < num_shards:
        raise ValueError(f"num_images ({num_images}) must be >= num_shards ({num_shards}).")
    files = synthetic_jpegs(distinct, seed)
    data_dir = Path(root) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image()})
    bounds = np.linspace(0, num_images, num_shards + 1).astype(int)
    for shard in range(num_shards):
        rows = [{"bytes": files[i % distinct], "path": None} for i in range(bounds[shard], bounds[shard + 1])]
        path = data_dir / f"train-{shard:05d}-of-{num_shards:05d}.parquet"
        datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(str(path))
    return str(root)


def compile_seconds() -> float:
    """Seconds dynamo has spent compiling in this process (0.0 when nothing was compiled)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(times) for name, times in compilation_time_metrics.items() if "compile_inner" in name))


def window_rates(windows: list, batch_size: int, first_steps: int = FIRST_STEPS) -> dict:
    """Images/s of the first `first_steps` steps and of the steps after them, from the loop's (end step, images/s)
    window pairs (windows start at step 0); both are totals (images over seconds), not means of rates."""
    spans, previous = [], 0  # (end step, steps, seconds)
    for end, speed in windows:
        spans.append((end, end - previous, (end - previous) * batch_size / speed))
        previous = end

    def total(selected):
        seconds = sum(span[2] for span in selected)
        return sum(span[1] for span in selected) * batch_size / seconds if seconds else None

    first = total([span for span in spans if span[0] <= first_steps])
    steady = total([span for span in spans if span[0] > first_steps])
    return {"first_images_per_s": first, "steady_images_per_s": steady,
            "first_over_steady": first / steady if first and steady else None}


def loop_window_benchmark(dataset_dir: str, config: str, batch_size: int, steps: int, compile_model: bool,
                          output_dir: str | Path, extra: list[str] | None = None, logging_steps: int = 10) -> dict:
    """Run the real loop once (in this process) and report its window rates and compile time."""
    from ..training import parse_arguments, pretrain

    argv = ["--dataset_name", dataset_dir, "--streaming", "true", "--config_name", config,
            "--per_device_train_batch_size", str(batch_size), "--max_steps", str(steps),
            "--logging_steps", str(logging_steps), "--report_to", "none", "--output_dir", str(output_dir),
            "--overwrite_output_dir", "true", "--torch_compile", str(compile_model).lower(), *(extra or [])]
    compiled_before, started = compile_seconds(), time.perf_counter()
    results = pretrain(*parse_arguments(argv))
    windows = [tuple(w) for w in results["images_per_second_by_window"]]
    return {"kind": "loop", "config": config, "batch_size": batch_size, "steps": steps, "compile": compile_model,
            "extra": " ".join(extra or []) or "defaults", "device": "cuda" if torch.cuda.is_available() else "cpu",
            "windows": windows, **window_rates(windows, batch_size),
            "compile_s": compile_seconds() - compiled_before, "total_s": time.perf_counter() - started,
            "train_runtime_s": results["train_runtime"]}


def format_loop_table(results: list[dict]) -> str:
    lines = ["| loop | batch | steps | compile | settings | first 20 steps img/s | steady img/s | first/steady | "
             "compile s | img/s per window |", "|" + "---|" * 10]

    def number(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    for r in results:
        windows = " ".join(f"{speed:.0f}" for _, speed in r["windows"])
        lines.append(f"| {r['config']} | {r['batch_size']} | {r['steps']} | {r['compile']} | {r['extra']} | "
                     f"{number(r['first_images_per_s'])} | {number(r['steady_images_per_s'])} | "
                     f"{number(r['first_over_steady'], 2)} | {r['compile_s']:.1f} | {windows} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m modeling_ijepa.benchmarks.real_loop ROOT NUM_IMAGES: make the dataset
    import sys

    started = time.perf_counter()
    print(make_jpeg_parquet(sys.argv[1], int(sys.argv[2])), f"({time.perf_counter() - started:.1f} s)")
