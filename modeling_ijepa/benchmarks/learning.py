"""Does pretraining learn? The engine of `scripts/benchmark_learning.py` (and of its screening runs).

Pretrain a tiny I-JEPA on Fashion-MNIST for a fixed budget with the package's own loop
(`modeling_ijepa.training.pretrain`, in this process; the same loop `scripts/pretrain.py` runs), then probe (a) the
pretrained EMA target encoder, (b) the same architecture at random init and (c) the raw pixels with each probe of
`--probes` (`probe_run.run_probes`: linear, the paper's BatchNorm protocol on the last 4 layers, V-JEPA's attentive
probe, k-NN), and print one table. Data: Debian's `dataset-fashion-mnist`, exported once to parquet; nothing is
downloaded. One JSON line per run is appended to `--results_file` when given (the screening tables of
docs/evaluation.md are such lines).
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Rows of the table: (name, how to probe it). Raw pixels have no patch tokens: the attentive probe skips them.
PRETRAINED, RANDOM_INIT, PIXELS = "(a) I-JEPA target encoder, pretrained", "(b) same architecture, random init", \
    "(c) raw pixels (28x28)"


@dataclass
class BenchmarkArguments:
    """The pretraining budget and recipe, and the probe protocol."""

    output_dir: str = field(default="outputs/benchmark_learning", metadata={"help": "Where runs and results go."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Where the Fashion-MNIST parquet export goes (default: output_dir/data)."}
    )
    max_dataset_samples: int | None = field(
        default=None, metadata={"help": "Export only the first N images of each split (quick tests)."}
    )
    run_name: str = field(default="default", metadata={"help": "Name of this run in --results_file."})
    results_file: str | None = field(default=None, metadata={"help": "Append one JSON line per run to this file."})
    # ---- pretraining budget and recipe (see docs/evaluation.md for why each value)
    config_name: str = field(default="tiny-cpu", metadata={"help": "Preset of the pretrained model."})
    # 0.05 instead of 0.02: with 4 px patches the position embeddings otherwise dominate the target features at init
    # (23% of their variance depends on the image; 57% at 0.05). See docs/evaluation.md.
    config_overrides: str = field(
        default="initializer_range=0.05",
        metadata={"help": "pretrain.py --config_overrides (masking scales, predictor size, loss, ...)."},
    )
    max_steps: int = field(default=2000, metadata={"help": "Pretraining optimizer steps (the budget)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Pretraining batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak pretraining learning rate."})
    warmup_steps: int = field(default=200, metadata={"help": "Linear warmup steps."})
    ema_momentum_start: float = field(default=0.996, metadata={"help": "EMA momentum at step 0."})
    ema_momentum_end: float = field(default=1.0, metadata={"help": "EMA momentum at the end of its ramp."})
    ema_momentum_ramp_steps: int | None = field(
        default=None, metadata={"help": "Reach --ema_momentum_end after this many steps, then hold (default: the run)."}
    )
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0], metadata={"help": "RandomResizedCrop scale."})
    extra_pretrain_args: str = field(
        default="", metadata={"help": "More pretrain.py arguments, as one shell-quoted string."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of pretraining and of the random-init encoder."})
    skip_pretraining: bool = field(
        default=False, metadata={"help": "Reuse output_dir/pretrain from an earlier run (probe only)."}
    )
    # ---- probes
    probes: list[str] = field(
        default_factory=lambda: ["linear"],
        metadata={"help": "Probes to run on every row: linear, batchnorm (paper, last 4 layers), attentive, knn."},
    )
    probe_train_samples: int = field(default=10_000, metadata={"help": "Training images of the probes."})
    probe_test_samples: int | None = field(default=None, metadata={"help": "Test images (default: all 10,000)."})
    probe_num_layers: int = field(default=1, metadata={"help": "Concatenate the pooled outputs of the last N layers."})
    probe_batch_size: int = field(default=256, metadata={"help": "Feature-extraction batch size."})
    probe_baselines: bool = field(
        default=True,
        metadata={"help": "Also probe rows (b) random init and (c) raw pixels. They do not depend on the recipe's "
                  "training settings (same architecture and seed), so the runs of a screen after the first can "
                  "skip them (--probe_baselines false)."},
    )


def pretrain_argv(args: BenchmarkArguments, dataset_dir: str, output_dir: Path) -> list[str]:
    """The `scripts/pretrain.py` arguments of the pretraining stage."""
    argv = [
        "--dataset_name", dataset_dir, "--streaming", "false", "--config_name", args.config_name,
        "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
        "--per_device_train_batch_size", str(args.per_device_train_batch_size),
        "--max_steps", str(args.max_steps), "--num_train_epochs", "1",
        "--learning_rate", str(args.learning_rate), "--warmup_steps", str(args.warmup_steps),
        "--ema_momentum_start", str(args.ema_momentum_start), "--ema_momentum_end", str(args.ema_momentum_end),
        "--crop_scale", *(str(v) for v in args.crop_scale),
        "--seed", str(args.seed), "--report_to", "none", "--logging_steps", "50",
    ]
    if args.ema_momentum_ramp_steps is not None:
        argv += ["--ema_momentum_ramp_steps", str(args.ema_momentum_ramp_steps)]
    if args.config_overrides:
        argv += ["--config_overrides", args.config_overrides]
    return argv + shlex.split(args.extra_pretrain_args)


def run_pretraining(args: BenchmarkArguments, dataset_dir: str, output_dir: Path) -> dict:
    """Pretraining stage, in this process: returns `{"wall_s", "images_per_s", "final_loss", ...}`."""
    from ..training import parse_arguments, pretrain

    argv = pretrain_argv(args, dataset_dir, output_dir)
    logger.info("Pretraining: scripts/pretrain.py %s", shlex.join(argv))
    start = time.perf_counter()
    results = pretrain(*parse_arguments(argv))
    return {
        "command": "scripts/pretrain.py " + shlex.join(argv),
        "steps": results["global_step"],
        "images_seen": results["global_step"] * results["global_batch_size"],
        "wall_s": time.perf_counter() - start,
        "train_runtime_s": results["train_runtime"],
        "images_per_s": results["train_samples_per_second"],
        "final_loss": results["final_loss"],
    }


def save_random_init(pretrained_dir: Path, output_dir: Path, seed: int) -> Path:
    """The pretrained model's architecture (and image processor) at random init, saved as an encoder."""
    import torch
    from transformers import AutoImageProcessor

    from .. import IJepaConfig, IJepaModel

    config = IJepaConfig.from_pretrained(pretrained_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        IJepaModel(config).save_pretrained(output_dir)
    AutoImageProcessor.from_pretrained(pretrained_dir).save_pretrained(output_dir)
    return output_dir


def probe_rows(args: BenchmarkArguments, dataset_dir: str, pretrained_dir: Path, random_dir: Path) -> list[dict]:
    """One row per (features, probe): accuracy, feature size, probe sizes."""
    from ..probe_run import ProbeArguments, run_probes

    rows = []
    sources = [
        (PRETRAINED, {"model_name_or_path": str(pretrained_dir)}),
        (RANDOM_INIT, {"model_name_or_path": str(random_dir)}),
        (PIXELS, {"raw_pixels": True, "image_size": 28}),
    ]
    for name, source in sources if args.probe_baselines else sources[:1]:
        probes = tuple(p for p in args.probes if not (source.get("raw_pixels") and p == "attentive"))
        probe_args = ProbeArguments(
            dataset_name=dataset_dir, max_train_samples=args.probe_train_samples,
            max_test_samples=args.probe_test_samples, num_layers=args.probe_num_layers,
            batch_size=args.probe_batch_size, seed=args.seed, **source,
        )
        for probe, result in run_probes(probe_args, probes).items():
            rows.append({"name": name, **result})
            logger.info("%s, %s probe: %.2f%%", name, probe, 100 * result["test_accuracy"])
    return rows


def format_table(rows: list[dict], pretraining: dict) -> str:
    probes = list(dict.fromkeys(row["probe"] for row in rows))
    lines = [
        "| features | " + " | ".join(f"{probe} probe (test top-1)" for probe in probes) + " | pretraining |",
        "| --- | " + " | ".join("---" for _ in probes) + " | --- |",
    ]
    wall = (f"{pretraining['wall_s'] / 60:.1f} min, {pretraining['steps']} steps, {pretraining['images_seen']} "
            f"images, {pretraining['images_per_s']:.1f} img/s")
    for name in dict.fromkeys(row["name"] for row in rows):
        cells = {row["probe"]: f"{100 * row['test_accuracy']:.1f}%" for row in rows if row["name"] == name}
        lines.append(f"| {name} | " + " | ".join(cells.get(probe, "-") for probe in probes) + " | "
                     + (wall if name == PRETRAINED else "-") + " |")
    return "\n".join(lines)


def validate_benchmark_arguments(args: BenchmarkArguments) -> None:
    """Raise `ArgumentError` (one line per bad argument) before the export and the pretraining: the pretraining
    arguments as `scripts/pretrain.py` checks them (`--extra_pretrain_args` included), the probe settings, and what
    --skip_pretraining needs. `probe_run.run_probes` checks each row again before it loads an encoder."""
    from ..probe_run import PROBES
    from ..training import parse_arguments
    from ..training.validation import ArgumentError, Problems, check_output_path, validate_arguments

    p = Problems(args)
    p.lines += [f"--probes {probe}: must be one of {', '.join(PROBES)}" for probe in args.probes if probe not in PROBES]
    for name in ("probe_train_samples", "probe_num_layers", "probe_batch_size"):
        p.at_least(name, 1, "must be a positive number")
    for name in ("probe_test_samples", "max_dataset_samples"):
        p.at_least(name, 1, "must be a positive number of images (or absent: all)", optional=True)
    check_output_path(p, "output_dir", folder=True)
    check_output_path(p, "results_file", folder=False)
    output_dir = Path(args.output_dir)
    if args.skip_pretraining and not (output_dir / "results.json").is_file():
        p.lines.append(f"--skip_pretraining: needs an earlier run in --output_dir {output_dir} (its results.json and "
                       "pretrain/); run once without it")
    elif not args.skip_pretraining:
        data_dir = str(Path(args.data_dir) if args.data_dir else output_dir / "data")
        try:
            validate_arguments(*parse_arguments(pretrain_argv(args, data_dir, output_dir / "pretrain")))
        except ArgumentError as error:
            p.lines += error.problems
        except ValueError as error:  # an unknown flag or a lone quote in --extra_pretrain_args
            p.lines.append(f"--extra_pretrain_args {args.extra_pretrain_args}: {' '.join(str(error).split())}")
    if p.lines:
        raise ArgumentError(p.lines)


def run_benchmark(args: BenchmarkArguments) -> dict:
    """Pretrain (unless --skip_pretraining), probe the three rows, write results.json/results.md, return the summary."""
    from ..training.fashion_mnist import export_fashion_mnist

    validate_benchmark_arguments(args)  # before the export and the pretraining
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else output_dir / "data"
    dataset_dir = export_fashion_mnist(data_dir, split="train", max_samples=args.max_dataset_samples, num_shards=1)
    export_fashion_mnist(data_dir, split="test", max_samples=args.max_dataset_samples)
    pretrained_dir = output_dir / "pretrain"
    if args.skip_pretraining:
        pretraining = json.loads((output_dir / "results.json").read_text())["pretraining"]
    else:
        pretraining = run_pretraining(args, dataset_dir, pretrained_dir)
    random_dir = save_random_init(pretrained_dir, output_dir / "random_init", args.seed)
    probe_start = time.perf_counter()
    rows = probe_rows(args, dataset_dir, pretrained_dir, random_dir)
    summary = {
        "run_name": args.run_name,
        "table": format_table(rows, pretraining),
        "pretraining": pretraining,
        "probes": rows,
        "probe_wall_s": time.perf_counter() - probe_start,
        "total_wall_s": time.perf_counter() - start,
        "args": asdict(args),
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "results.md").write_text(summary["table"] + "\n")
    if args.results_file:
        with open(args.results_file, "a") as f:
            f.write(json.dumps({k: summary[k] for k in ("run_name", "pretraining", "probes", "total_wall_s")}) + "\n")
    return summary
