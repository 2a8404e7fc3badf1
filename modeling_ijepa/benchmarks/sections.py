"""The sections of `scripts/benchmark.py`: their arguments, a registry name -> function, and the main table.

Each section is a function `(args, device) -> (results, table)`: `results` is a list of JSON-able dicts (each with a
`kind`), `table` a markdown table of its own or None when its rows go into the main comparison table
(`format_table`: step, inference, collator). To add a section, write its module next to this one and add one line to
`SECTIONS` (and its arguments, if any, to `BenchmarkArguments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .common import DTYPES, attn_available

# Batch sizes used when --batch_size is not given: the issue's ViT-S/16 batch 16 on CPU; big models get small
# batches on CPU so that a repetition takes seconds, not minutes.
DEFAULT_BATCH = {"cpu": {"tiny-cpu": 32, "vit-small-16": 16}, "cuda": {"tiny-cpu": 256, "vit-huge-14": 64}}
DEFAULT_BATCH_OTHER = {"cpu": 2, "cuda": 128}


@dataclass
class BenchmarkArguments:
    configs: list[str] = field(
        default_factory=lambda: ["tiny-cpu", "vit-small-16"],
        metadata={"help": "Presets of modeling_ijepa.PRESETS (tiny-cpu, vit-small-16, vit-base-16, vit-large-16, vit-huge-14)."},
    )
    batch_size: int | None = field(default=None, metadata={"help": "Batch size for every config (default: per config)."})
    dtypes: list[str] = field(default_factory=lambda: ["fp32"], metadata={"help": "fp32 and/or bf16 (autocast)."})
    attn_implementations: list[str] = field(
        default_factory=lambda: ["sdpa"],
        metadata={"help": "eager, sdpa, flash_attention_2 (skipped when not installed) for our models."},
    )
    compile: list[str] = field(default_factory=lambda: ["off"], metadata={"help": "off and/or on (torch.compile)."})
    compile_backend: str = field(
        default="inductor",
        metadata={"help": "torch.compile backend ('aot_eager' checks the compiled path quickly on CPU)."},
    )
    sections: list[str] = field(
        default_factory=lambda: ["step", "inference", "collator"],
        metadata={"help": "Which sections to run: step, inference, collator, pipeline, decode, resume, shuffle, stability, loop."},
    )
    warmup: int = field(default=1, metadata={"help": "Untimed repetitions before timing (compile needs >= 1)."})
    reps: int = field(default=3, metadata={"help": "Timed repetitions per implementation (interleaved)."})
    inference_batch_size: int | None = field(default=None, metadata={"help": "Batch for encoder inference (default: 2x step batch)."})
    collator_preset: str = field(default="vit-huge-14", metadata={"help": "Preset whose patch grid the collator uses."})
    collator_batch_size: int = field(default=128, metadata={"help": "Batch size of the collator comparison."})
    collator_reps: int = field(default=10, metadata={"help": "Timed repetitions of the collator comparison."})
    memory: bool = field(default=True, metadata={"help": "Measure peak memory (CPU: one subprocess per measurement)."})
    flops: bool = field(default=True, metadata={"help": "Count FLOPs and report MFU."})
    baseline: bool = field(default=True, metadata={"help": "Run the official-style baseline step next to ours."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Activation checkpointing in our model."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    threads: int | None = field(default=None, metadata={"help": "torch.set_num_threads (default: torch's choice)."})
    seed: int = field(default=0)
    output: str = field(default="benchmark_results.json", metadata={"help": "Where to write the JSON results."})
    memory_probe: str | None = field(default=None, metadata={"help": "Internal: run one memory measurement (JSON spec)."})
    pipeline_config: str = field(default="tiny-cpu", metadata={"help": "Preset of the `pipeline` section."})
    pipeline_batch_size: int = field(default=64, metadata={"help": "Per-device batch of the `pipeline` section."})
    pipeline_steps: int = field(default=60, metadata={"help": "Steps of the longer `pipeline` loop run."})
    decode_images: int = field(default=64, metadata={"help": "JPEGs (500x375, from skimage.data) of the `decode` section."})
    decode_passes: int = field(default=5, metadata={"help": "Timed passes over them per pipeline (median)."})
    resume_records: int = field(default=2048, metadata={"help": "Fashion-MNIST records (8 shards) of the `resume` section."})
    pipeline_settings: list[str] = field(
        default_factory=lambda: ["defaults"],
        metadata={"help": "Loop settings to compare: 'defaults' or extra arguments, e.g. '--dataloader_num_workers 0'."},
    )
    stability_label: str = field(default="default", metadata={"help": "Name of this `stability` variant."})
    stability_config: str = field(default="vit-huge-14", metadata={"help": "Preset of the `stability` section."})
    stability_batch_size: int = field(default=128, metadata={"help": "Batch of the `stability` section."})
    stability_dtype: str = field(default="bf16", metadata={"help": "fp32 or bf16 (autocast) in `stability`."})
    stability_masks: int = field(default=200, metadata={"help": "Mask sets replayed per `stability` pass."})
    stability_passes: int = field(default=2, metadata={"help": "Passes over the same mask sets (2: per-shape costs)."})
    stability_compile: bool = field(default=False, metadata={"help": "compile_regions in `stability`."})
    stability_sdpa_backends: str | None = field(
        default=None, metadata={"help": "SDPA priority order in `stability`, e.g. 'flash,efficient,cudnn,math'."}
    )
    stability_gc_collect_steps: int = field(
        default=0, metadata={"help": "`stability`: automatic GC off, gc.collect(1) every N steps (0: Python's GC)."}
    )
    stability_warm_shapes: bool = field(
        default=False, metadata={"help": "`stability`: one untimed forward+backward per distinct shape first."}
    )
    stability_compare_steps: int = field(
        default=0, metadata={"help": "`stability`: also summarise the first N steps of pass 1."}
    )
    loop_config: str = field(default="vit-huge-14", metadata={"help": "Preset of the `loop` section (real loop)."})
    loop_batch_size: int = field(default=128, metadata={"help": "Per-device batch of the `loop` section."})
    loop_steps: int = field(default=150, metadata={"help": "Optimizer steps of the `loop` run (windows of 10)."})
    loop_compile: bool = field(default=False, metadata={"help": "`loop`: --torch_compile true."})
    loop_dataset: str | None = field(
        default=None, metadata={"help": "`loop`: a JPEG parquet folder (default: made in a temporary folder)."}
    )
    loop_settings: str = field(default="", metadata={"help": "`loop`: extra pretraining arguments, e.g. "
                               "'--mixed_precision bf16 --sdpa_backends flash,efficient,cudnn,math'."})


def parse_device(args: BenchmarkArguments) -> torch.device:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    for name in args.dtypes + [args.stability_dtype]:
        if name not in DTYPES:
            raise ValueError(f"--dtypes and --stability_dtype take fp32 or bf16, got {name!r}.")
    for name in args.compile:
        if name not in ("off", "on"):
            raise ValueError(f"--compile takes off and/or on, got {name!r}.")
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}.")
    return device


def model_specs(args: BenchmarkArguments, device: torch.device) -> list[dict]:
    """Every (config, dtype, attention, compile) setting of the `step` and `inference` sections."""
    specs = []
    for preset in args.configs:
        batch = args.batch_size or DEFAULT_BATCH[device.type].get(preset, DEFAULT_BATCH_OTHER[device.type])
        for dtype_name in args.dtypes:
            for attn in args.attn_implementations:
                for compile_flag in args.compile:
                    specs.append(dict(config=preset, batch_size=batch, dtype=dtype_name, attn=attn,
                                      compile=compile_flag == "on", seed=args.seed, baseline=args.baseline,
                                      gradient_checkpointing=args.gradient_checkpointing,
                                      compile_backend=args.compile_backend))
    return specs


def over_model_specs(kind: str, bench: Callable, args, device) -> tuple[list[dict], None]:
    """`bench(spec, device, args)` for every model setting, a row printed as each finishes (skips say why)."""
    results = []
    for spec in model_specs(args, device):
        reason = attn_available(spec["attn"], device)
        if reason is not None:
            results.append({"kind": kind, **spec, "skipped": reason})
            continue
        if kind == "inference":
            spec = dict(spec, batch_size=args.inference_batch_size or 2 * spec["batch_size"])
        results.append(bench(spec, device, args))
        print(format_table(results[-1:]).splitlines()[-1], flush=True)
    return results, None


def step_section(args, device):
    from .model_step import bench_step

    return over_model_specs("step", bench_step, args, device)


def inference_section(args, device):
    from .inference import bench_inference

    return over_model_specs("inference", bench_inference, args, device)


def collator_section(args, device):
    from .collator import bench_collator

    return [bench_collator(args.collator_preset, args.collator_batch_size, args.collator_reps, args.seed)], None


def pipeline_section(args, device):
    from .pipeline import format_pipeline_table, pipeline_benchmark

    results = [pipeline_benchmark(args.pipeline_config, args.pipeline_batch_size, args.pipeline_steps,
                                  [] if setting == "defaults" else setting.split())
               for setting in args.pipeline_settings]
    return results, format_pipeline_table(results)


def decode_section(args, device):
    from .decode import decode_benchmark, format_decode_table

    result = decode_benchmark(args.decode_images, args.decode_passes, args.seed)
    return [result], format_decode_table(result)


def resume_section(args, device):
    from .resume import format_resume_table, resume_benchmark

    result = resume_benchmark(num_records=args.resume_records)
    return [result], format_resume_table(result)


def shuffle_section(args, device):
    from .shuffle import format_shuffle_table, shuffle_benchmark

    result = shuffle_benchmark()  # 1,000 classes x 128 rows, 16 files, 2 processes x 4 workers, batch 128
    return [result], format_shuffle_table(result)


def stability_section(args, device):
    from .step_stability import StabilitySettings, format_stability_table, stability_benchmark

    settings = StabilitySettings(
        label=args.stability_label, config=args.stability_config, batch_size=args.stability_batch_size,
        dtype=args.stability_dtype, masks=args.stability_masks, passes=args.stability_passes,
        compile=args.stability_compile, compile_backend=args.compile_backend,
        sdpa_backends=args.stability_sdpa_backends, gc_collect_steps=args.stability_gc_collect_steps,
        warm_shapes=args.stability_warm_shapes, compare_steps=args.stability_compare_steps, seed=args.seed,
    )
    result = stability_benchmark(settings, device)
    return [result], format_stability_table([result])


def loop_section(args, device):
    import tempfile

    from .real_loop import format_loop_table, loop_window_benchmark, make_jpeg_parquet

    with tempfile.TemporaryDirectory() as tmp:
        images = args.loop_steps * args.loop_batch_size * 11 // 10  # no epoch boundary inside the run
        dataset = args.loop_dataset or make_jpeg_parquet(Path(tmp) / "jpegs", images)
        result = loop_window_benchmark(dataset, args.loop_config, args.loop_batch_size, args.loop_steps,
                                       args.loop_compile, Path(tmp) / "run", args.loop_settings.split())
    return [result], format_loop_table([result])


# name -> (args, device) -> (results, own markdown table or None for rows of the main table); run in this order.
SECTIONS: dict[str, Callable] = {
    "step": step_section,
    "inference": inference_section,
    "collator": collator_section,
    "pipeline": pipeline_section,
    "decode": decode_section,
    "resume": resume_section,
    "shuffle": shuffle_section,
    "stability": stability_section,
    "loop": loop_section,
}


def run_sections(args: BenchmarkArguments, device: torch.device) -> tuple[list[dict], list[str]]:
    """The requested sections in registry order: all results, and the tables (the main one first)."""
    main_rows, own_results, tables = [], [], []
    for name, section in SECTIONS.items():
        if name not in args.sections:
            continue
        results, table = section(args, device)
        if table is None:
            main_rows.extend(results)
        else:
            own_results.extend(results)
            tables.append(table)
            print(table, flush=True)
    return main_rows + own_results, ([format_table(main_rows)] if main_rows else []) + tables


def format_table(results: list[dict]) -> str:
    header = (
        "| section | config | batch | dtype | attn | compile | ours (ms) | reference (ms) | ours/ref | "
        "mem ours/ref (MiB) | MFU | img/s | numerics |"
    )
    return "\n".join([header, "|" + "|".join(["---"] * 13) + "|"] + [table_row(r) for r in results])


def table_row(r: dict) -> str:
    if r.get("skipped"):
        return (f"| {r['kind']} | {r['config']} | {r.get('batch_size', '')} | {r.get('dtype', '')} | "
                f"{r.get('attn', '')} | {r.get('compile', '')} | skipped: {r['skipped']} |  |  |  |  |  |  |")
    if r["kind"] == "collator":
        return (f"| collator | {r['config']} {r['grid'][0]}x{r['grid'][1]} | {r['batch_size']} | - | - | - | "
                f"{r['ours_s'] * 1e3:.2f} | {r['loop_reference_s'] * 1e3:.2f} | {1 / r['speedup']:.3f} "
                f"({r['speedup']:.1f}x faster) | - | - | - | - |")
    ref_name = "baseline" if r["kind"] == "step" else "transformers"
    ref_s = r.get(f"{ref_name}_s")
    mem = "-"
    if f"{ref_name}_memory" in r:
        mem = (f"{r['ours_memory']['peak_step_mib']:.0f}/{r[f'{ref_name}_memory']['peak_step_mib']:.0f} "
               f"({r['memory_ratio']:.2f})")
    elif "ours_memory" in r:
        mem = f"{r['ours_memory']['peak_step_mib']:.0f}/-"
    numerics = "-"
    if "parity" in r:
        numerics = f"loss rel diff {r['parity']['max_rel_diff']:.1e} {'OK' if r['parity']['match'] else 'MISMATCH'}"
    elif "max_abs_diff" in r:
        numerics = f"max abs diff {r['max_abs_diff']:.1e}"
    mfu = f"{r['mfu'] * 100:.1f}%" if "mfu" in r else "-"
    head = f"| {r['kind']} | {r['config']} | {r['batch_size']} | {r['dtype']} | {r['attn']} | {r['compile']} | "
    if ref_s is None:
        return head + f"{r['ours_s'] * 1e3:.1f} | - | - | {mem} | {mfu} | {r['images_per_s']:.1f} | - |"
    return head + (f"{r['ours_s'] * 1e3:.1f} | {ref_s * 1e3:.1f} | {r['ratio']:.3f} | {mem} | {mfu} | "
                   f"{r['images_per_s']:.1f} | {numerics} |")
