#!/usr/bin/env python
"""Benchmark the I-JEPA pretraining step, encoder inference and mask collator against reference implementations.

Three comparisons, each measured in one process with warm-up, interleaved repetitions and medians:

* **step**: one full pretraining step (forward -> backward -> AdamW -> EMA) of `IJepaForPreTraining` against
  `modeling_ijepa/benchmarks/official_style.py`, a baseline written in the style of the official implementation, from
  the same weights, both fed the same pre-drawn masks so both do identical work; the losses of the first steps are
  compared numerically. Each mask sampler is timed apart (`ours_sampler_s`, `baseline_sampler_s`): both trainings
  sample masks in their data-loader workers, so a sampler inside the timed step would charge the training process
  for work it does not do (the baseline's Python-loop sampler takes 30-60 ms a batch at ViT-H/14).
* **inference**: `modeling_ijepa.IJepaModel` against `transformers.IJepaModel` with the same weights and outputs.
* **collator**: the vectorised `IJepaMaskCollator` against the Python-loop sampler of the official algorithm.

Memory: on CUDA, `torch.cuda.max_memory_allocated` over one step after a warm-up step. On CPU, each measurement runs
in a fresh subprocess (glibc told to `mmap` every large buffer, so freed memory leaves the resident set): after
setup and one warm-up step, the kernel's peak-RSS counter is reset (`/proc/self/clear_refs`) and the peak of the
next step is read back (`VmHWM`); `peak_step_mib` is that peak minus the resident set at the reset (activations,
gradients, temporaries), `peak_rss_mib` the absolute peak (weights, optimizer state, interpreter included).

FLOPs: counted once per configuration with `torch.utils.flop_counter.FlopCounterMode` over forward + backward of
our step (matmuls, convolutions, attention; elementwise ops are not counted). MFU = FLOPs / median step time /
the best dense-matmul FLOP/s measured in the same run at the same dtype.

Examples:
    python scripts/benchmark.py                                   # tiny + ViT-S/16, fp32, sdpa (a few minutes)
    python scripts/benchmark.py --dtypes fp32 bf16 --reps 5 --threads 1
    python scripts/benchmark.py --configs vit-huge-14 --batch_size 2 --reps 2 --sections step
    python scripts/benchmark.py --attn_implementations eager sdpa --compile off on --configs tiny-cpu
    python scripts/benchmark.py --sections decode resume     # data path: JPEG decode per core, resume start-up
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import HfArgumentParser

import transformers
from modeling_ijepa import (
    IJepaForPreTraining,
    IJepaMaskCollator,
    IJepaModel,
    MaskSamplingSettings,
    ema_momentum,
    ijepa_config_from_preset,
    sample_masks,
)
from modeling_ijepa.benchmarks.official_style import LoopMaskSampler, OfficialStylePretraining, load_from_ours
from modeling_ijepa.compilation import compile_regions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Official configs: AdamW with weight decay 0.04 (ramped to 0.4) and lr up to 1e-3; the values only need to be
# identical for both steps, they do not affect speed.
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.04
# Number of optimizer steps whose losses are compared between our step and the baseline.
PARITY_STEPS = 3
# fp32 differs only by summation order (fused vs separate q/k/v, SDPA vs naive softmax); bf16 autocast rounds
# every matmul input to 8 mantissa bits.
PARITY_RTOL = {"fp32": 1e-4, "bf16": 3e-2}
# Batch sizes used when --batch_size is not given: the issue's ViT-S/16 batch 16 on CPU; big models get small
# batches on CPU so that a repetition takes seconds, not minutes.
DEFAULT_BATCH = {"cpu": {"tiny-cpu": 32, "vit-small-16": 16}, "cuda": {"tiny-cpu": 256, "vit-huge-14": 64}}
DEFAULT_BATCH_OTHER = {"cpu": 2, "cuda": 128}
MIB = 2**20


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
        default_factory=lambda: ["step", "inference", "collator"], metadata={"help": "Which comparisons to run."}
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


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(fns: dict, warmup: int, reps: int, device) -> dict[str, float]:
    """Run each callable `warmup` times, then `reps` times alternating the order; median seconds per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            times[name].append(timed(fns[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def autocast(device, dtype_name):
    if dtype_name == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype_name])


def attn_available(name: str, device) -> str | None:
    """None when usable, else why not."""
    if name == "flash_attention_2":
        if device.type != "cuda":
            return "flash_attention_2 needs CUDA"
        if not transformers.utils.is_flash_attn_2_available():
            return "flash_attn is not installed"
    return None


def matmul_peak_flops(device, dtype, reps: int = 5) -> float:
    """Best dense-matmul FLOP/s at this dtype, measured now (so it reflects the machine's current load)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(reps))
    return 2 * n**3 / best


def weight_decay_groups(parameters):
    """Official `init_opt`: no weight decay on biases and 1-D parameters."""
    parameters = [p for p in parameters if p.requires_grad]
    decay = [p for p in parameters if p.ndim > 1]
    no_decay = [p for p in parameters if p.ndim <= 1]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------------------------
# The two steps


class OurStep:
    """Our training step as the pretraining script runs it: vectorised masks, fused AdamW, foreach EMA."""

    def __init__(self, config, device, dtype_name, compile_model, gradient_checkpointing, total_steps=1000,
                 compile_backend="inductor"):
        with device:  # initialise directly on the device (ViT-H has 1.3B parameters to initialise)
            self.model = IJepaForPreTraining(config).train()
        # What the pretraining script does once it feeds masks from IJepaMaskCollator: no value checks (GPU syncs).
        self.model.check_mask_values = False
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        if compile_model:  # as --torch_compile does: per layer
            compile_regions(self.model, backend=compile_backend)
        self.settings = MaskSamplingSettings.from_config(config)
        self.optimizer = torch.optim.AdamW(
            weight_decay_groups(self.model.parameters()), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
            fused=True,  # one kernel for all parameters (CPU and CUDA)
        )
        self.device, self.dtype_name, self.total_steps, self.step_index = device, dtype_name, total_steps, 0

    def sample(self, batch_size, generator):
        return sample_masks(self.settings, batch_size, generator)[:2]

    def loss(self, pixel_values, context_mask, target_mask):
        with autocast(self.device, self.dtype_name):
            return self.model(pixel_values, context_mask=context_mask, target_mask=target_mask).loss

    def __call__(self, pixel_values, masks, generator):
        loss = self.loss(pixel_values, *masks)  # masks: drawn by the loader's workers in training (timed apart here)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_target_encoder(ema_momentum(self.step_index, self.total_steps))
        self.step_index += 1
        return loss.detach()


class BaselineStep:
    """The official-style step: Python-loop masks, naive attention, per-tensor AdamW, per-parameter EMA loop."""

    def __init__(self, ours: IJepaForPreTraining, config, device, dtype_name, compile_model, total_steps=1000,
                 compile_backend="inductor"):
        with device:
            self.model = OfficialStylePretraining(config)
        load_from_ours(self.model, ours)
        self.model.train()
        if compile_model:
            for module in (self.model.encoder, self.model.predictor, self.model.target_encoder):
                module.compile(backend=compile_backend)
        self.sampler = LoopMaskSampler.from_config(config)
        # torch's default AdamW implementation for these tensors (what `torch.optim.AdamW(param_groups)` gives).
        self.optimizer = torch.optim.AdamW(
            weight_decay_groups(list(self.model.encoder.parameters()) + list(self.model.predictor.parameters())),
            lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
        )
        self.device, self.dtype_name, self.total_steps, self.step_index = device, dtype_name, total_steps, 0

    def sample(self, batch_size, generator):
        return self.sampler(batch_size, generator)

    def loss(self, pixel_values, context_mask, target_mask):
        with autocast(self.device, self.dtype_name):
            return self.model.loss(pixel_values, context_mask, target_mask)

    def __call__(self, pixel_values, masks, generator):
        loss = self.loss(pixel_values, *masks)  # the official loader's workers sample masks (timed apart here)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.momentum_update(ema_momentum(self.step_index, self.total_steps))
        self.step_index += 1
        return loss.detach()


def make_inputs(config, batch_size, device, seed, count):
    """`count` (pixel_values, masks) pairs, masks on `device`, drawn by our sampler."""
    generator = torch.Generator().manual_seed(seed)
    settings = MaskSamplingSettings.from_config(config)
    height, width = config.image_size_hw
    inputs = []
    for _ in range(count):
        pixel_values = torch.randn(batch_size, config.num_channels, height, width, generator=generator).to(device)
        context_mask, target_mask, _ = sample_masks(settings, batch_size, generator)
        masks = ([m.to(device) for m in context_mask], [m.to(device) for m in target_mask])
        inputs.append((pixel_values, masks))
    return inputs


def build_steps(spec, device):
    torch.manual_seed(spec["seed"])
    config = ijepa_config_from_preset(spec["config"], attn_implementation=spec["attn"])
    backend = spec.get("compile_backend", "inductor")
    ours = OurStep(config, device, spec["dtype"], spec["compile"], spec["gradient_checkpointing"],
                   compile_backend=backend)
    baseline = BaselineStep(ours.model, config, device, spec["dtype"], spec["compile"],
                            compile_backend=backend) if spec["baseline"] else None
    return config, ours, baseline


def count_flops(step, pixel_values, masks) -> int:
    """Forward + backward FLOPs of one step (no optimizer update), leaving no gradients behind."""
    counter = FlopCounterMode(display=False)
    with counter:
        step.loss(pixel_values, *masks).backward()
    step.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def check_parity(spec, config, ours, baseline, device) -> dict:
    """Losses of the first PARITY_STEPS steps of ours and the baseline, from identical weights and masks (call it on
    freshly built steps)."""
    inputs = make_inputs(config, spec["batch_size"], device, spec["seed"] + 1, PARITY_STEPS)
    generator = torch.Generator().manual_seed(0)
    ours_losses = [float(ours(p, m, generator)) for p, m in inputs]
    base_losses = [float(baseline(p, m, generator)) for p, m in inputs]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours_losses, base_losses))
    return {
        "ours_losses": ours_losses,
        "baseline_losses": base_losses,
        "max_rel_diff": rel,
        "rtol": PARITY_RTOL[spec["dtype"]],
        "match": rel <= PARITY_RTOL[spec["dtype"]],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def read_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}; CPU memory needs Linux.")


def run_memory_probe(spec: dict) -> dict:
    """In this (fresh) process: build one implementation, warm it up, reset the peak counter, run one repetition."""
    device = torch.device(spec["device"])
    kind = spec["kind"]
    if kind == "inference":
        config, ours_encoder, theirs_encoder, pixel_values = build_inference(spec, device)
        model = ours_encoder if spec["impl"] == "ours" else theirs_encoder
        del ours_encoder, theirs_encoder

        def run():
            with torch.inference_mode(), autocast(device, spec["dtype"]):
                model(pixel_values)
    else:
        config, ours, baseline = build_steps(spec, device)
        step = ours if spec["impl"] == "ours" else baseline
        del ours, baseline
        (pixel_values, masks), = make_inputs(config, spec["batch_size"], device, spec["seed"] + 1, 1)
        generator = torch.Generator().manual_seed(0)

        def run():
            step(pixel_values, masks, generator)

    for _ in range(max(spec["warmup"], 1)):  # allocates optimizer state; compiles
        run()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_step_mib": (peak - before) / MIB, "peak_allocated_mib": peak / MIB, "method": "cuda_max_allocated"}
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    before = read_status_kib("VmRSS")
    run()
    peak = read_status_kib("VmHWM")
    return {"peak_step_mib": (peak - before) / 1024, "peak_rss_mib": peak / 1024, "method": "cpu_vmhwm_subprocess"}


def measure_memory(spec: dict) -> dict:
    env = dict(os.environ)
    # Serve every allocation above 64 KiB by mmap (and so return it to the OS on free): the resident set then tracks
    # live tensors instead of glibc's free lists.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    result = subprocess.run(
        [sys.executable, __file__, "--memory_probe", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {spec['kind']}/{spec['impl']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# Sections


def bench_step(spec, device, args) -> dict:
    config, ours, baseline = build_steps(spec, device)
    result = {"kind": "step", **spec}
    if baseline is not None:
        result["parity"] = check_parity(spec, config, ours, baseline, device)  # also warms both up
    inputs = make_inputs(config, spec["batch_size"], device, spec["seed"] + 1, 1)
    pixel_values, masks = inputs[0]
    generator = torch.Generator().manual_seed(1)
    fns = {"ours": partial(ours, pixel_values, masks, generator)}
    if baseline is not None:
        fns["baseline"] = partial(baseline, pixel_values, masks, generator)
    times = interleaved_medians(fns, args.warmup, args.reps, device)
    result.update(ours_s=times["ours"], images_per_s=spec["batch_size"] / times["ours"])
    if baseline is not None:
        result.update(baseline_s=times["baseline"], ratio=times["ours"] / times["baseline"])
    samplers = {"ours": partial(ours.sample, spec["batch_size"], generator)}
    if baseline is not None:
        samplers["baseline"] = partial(baseline.sample, spec["batch_size"], generator)
    for impl, seconds in interleaved_medians(samplers, 1, args.reps, torch.device("cpu")).items():
        result[f"{impl}_sampler_s"] = seconds  # CPU work of the data-loader workers, not of the step
    if args.flops:
        flops = count_flops(ours, pixel_values, masks)
        peak = matmul_peak_flops(device, DTYPES[spec["dtype"]])
        result.update(
            flops_per_step=flops,
            achieved_flops=flops / times["ours"],
            matmul_peak_flops=peak,
            mfu=flops / times["ours"] / peak,
        )
        # Above 1 means the square-matmul probe is slower than the model's GEMMs (seen with bf16 on CPUs without a
        # fast bf16 GEMM path): the MFU is then not meaningful.
        result["mfu_valid"] = result["mfu"] <= 1.0
        if baseline is not None:
            result["baseline_mfu"] = flops / times["baseline"] / peak
    if args.memory and device.type == "cuda":
        # The caching allocator's counters are exact, so measure in this process: the step's own peak above what
        # was allocated before it (both models' weights and optimizer states stay resident).
        for impl, fn in fns.items():
            gc.collect()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            result[f"{impl}_memory"] = {
                "peak_step_mib": (peak - before) / MIB, "peak_allocated_mib": peak / MIB, "method": "cuda_max_allocated",
            }
    del ours, baseline, fns
    gc.collect()
    if args.memory and device.type == "cpu":
        for impl in ("ours", "baseline") if spec["baseline"] else ("ours",):
            probe = measure_memory(dict(spec, kind="step", impl=impl, device=device.type, warmup=args.warmup))
            result[f"{impl}_memory"] = probe
    if args.memory and spec["baseline"]:
        result["memory_ratio"] = result["ours_memory"]["peak_step_mib"] / max(
            result["baseline_memory"]["peak_step_mib"], 1e-9
        )
    return result


def build_inference(spec, device):
    torch.manual_seed(spec["seed"])
    config = ijepa_config_from_preset(spec["config"], attn_implementation=spec["attn"])
    ours = IJepaModel(config).to(device).eval()
    encoder_fields = transformers.IJepaConfig().to_dict()
    theirs_config = transformers.IJepaConfig(**{k: v for k, v in config.to_dict().items() if k in encoder_fields})
    theirs_config._attn_implementation = spec["attn"]
    theirs = transformers.IJepaModel(theirs_config).to(device).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    if spec["compile"]:
        ours.compile()
        theirs.compile()
    height, width = config.image_size_hw
    generator = torch.Generator().manual_seed(spec["seed"] + 2)
    pixel_values = torch.randn(spec["batch_size"], config.num_channels, height, width, generator=generator).to(device)
    return config, ours, theirs, pixel_values


def bench_inference(spec, device, args) -> dict:
    config, ours, theirs, pixel_values = build_inference(spec, device)

    def run(model):
        with torch.inference_mode(), autocast(device, spec["dtype"]):
            return model(pixel_values).last_hidden_state

    difference = (run(ours).float() - run(theirs).float()).abs().max().item()
    times = interleaved_medians({"ours": partial(run, ours), "transformers": partial(run, theirs)}, args.warmup,
                                args.reps, device)
    result = {
        "kind": "inference", **spec, "ours_s": times["ours"], "transformers_s": times["transformers"],
        "ratio": times["ours"] / times["transformers"], "images_per_s": spec["batch_size"] / times["ours"],
        "max_abs_diff": difference,
    }
    del ours, theirs
    gc.collect()
    if args.memory:
        for impl in ("ours", "transformers"):
            result[f"{impl}_memory"] = measure_memory(dict(spec, kind="inference", impl=impl, device=device.type, warmup=args.warmup))
        result["memory_ratio"] = result["ours_memory"]["peak_step_mib"] / max(result["transformers_memory"]["peak_step_mib"], 1e-9)
    return result


def bench_collator(args) -> dict:
    config = ijepa_config_from_preset(args.collator_preset)
    collator = IJepaMaskCollator(config, seed=args.seed)
    reference = LoopMaskSampler.from_config(config)
    generator = torch.Generator().manual_seed(args.seed)
    batch = args.collator_batch_size
    times = interleaved_medians(
        {"ours": lambda: collator.sample(batch), "loop_reference": lambda: reference(batch, generator)},
        1, args.collator_reps, torch.device("cpu"),
    )
    return {
        "kind": "collator", "config": args.collator_preset, "grid": list(config.patch_grid), "batch_size": batch,
        "ours_s": times["ours"], "loop_reference_s": times["loop_reference"],
        "speedup": times["loop_reference"] / times["ours"],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Report


def format_table(results: list[dict]) -> str:
    header = (
        "| section | config | batch | dtype | attn | compile | ours (ms) | reference (ms) | ours/ref | "
        "mem ours/ref (MiB) | MFU | img/s | numerics |"
    )
    lines = [header, "|" + "|".join(["---"] * 13) + "|"]
    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['kind']} | {r['config']} | {r.get('batch_size', '')} | {r.get('dtype', '')} | "
                         f"{r.get('attn', '')} | {r.get('compile', '')} | skipped: {r['skipped']} |  |  |  |  |  |  |")
            continue
        if r["kind"] == "collator":
            lines.append(
                f"| collator | {r['config']} {r['grid'][0]}x{r['grid'][1]} | {r['batch_size']} | - | - | - | "
                f"{r['ours_s'] * 1e3:.2f} | {r['loop_reference_s'] * 1e3:.2f} | {1 / r['speedup']:.3f} "
                f"({r['speedup']:.1f}x faster) | - | - | - | - |"
            )
            continue
        ref_s = r.get("baseline_s", r.get("transformers_s"))
        ref_name = "baseline" if r["kind"] == "step" else "transformers"
        mem = "-"
        if f"{ref_name}_memory" in r:
            mem = f"{r['ours_memory']['peak_step_mib']:.0f}/{r[f'{ref_name}_memory']['peak_step_mib']:.0f} ({r['memory_ratio']:.2f})"
        elif "ours_memory" in r:
            mem = f"{r['ours_memory']['peak_step_mib']:.0f}/-"
        numerics = "-"
        if "parity" in r:
            numerics = f"loss rel diff {r['parity']['max_rel_diff']:.1e} {'OK' if r['parity']['match'] else 'MISMATCH'}"
        elif "max_abs_diff" in r:
            numerics = f"max abs diff {r['max_abs_diff']:.1e}"
        mfu = f"{r['mfu'] * 100:.1f}%" if "mfu" in r else "-"
        lines.append(
            f"| {r['kind']} | {r['config']} | {r['batch_size']} | {r['dtype']} | {r['attn']} | {r['compile']} | "
            f"{r['ours_s'] * 1e3:.1f} | {ref_s * 1e3:.1f} | {r['ratio']:.3f} | {mem} | {mfu} | "
            f"{r['images_per_s']:.1f} | {numerics} |" if ref_s is not None else
            f"| {r['kind']} | {r['config']} | {r['batch_size']} | {r['dtype']} | {r['attn']} | {r['compile']} | "
            f"{r['ours_s'] * 1e3:.1f} | - | - | {mem} | {mfu} | {r['images_per_s']:.1f} | - |"
        )
    return "\n".join(lines)


def parse_device(args) -> torch.device:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    for name in args.dtypes:
        if name not in DTYPES:
            raise ValueError(f"--dtypes takes fp32 and/or bf16, got {name!r}.")
    for name in args.compile:
        if name not in ("off", "on"):
            raise ValueError(f"--compile takes off and/or on, got {name!r}.")
    return device


def model_sections(args, device) -> list[dict]:
    """The `step` and `inference` sections over every config, dtype, attention and compile setting."""
    results = []
    for preset in args.configs:
        batch = args.batch_size or DEFAULT_BATCH[device.type].get(preset, DEFAULT_BATCH_OTHER[device.type])
        for dtype_name in args.dtypes:
            for attn in args.attn_implementations:
                for compile_flag in args.compile:
                    spec = dict(config=preset, batch_size=batch, dtype=dtype_name, attn=attn,
                                compile=compile_flag == "on", seed=args.seed, baseline=args.baseline,
                                gradient_checkpointing=args.gradient_checkpointing,
                                compile_backend=args.compile_backend)
                    reason = attn_available(attn, device)
                    for section in ("step", "inference"):
                        if section not in args.sections:
                            continue
                        if reason is not None:
                            results.append({"kind": section, **spec, "skipped": reason})
                            continue
                        if section == "step":
                            result = bench_step(spec, device, args)
                        else:
                            result = bench_inference(dict(spec, batch_size=args.inference_batch_size or 2 * batch), device, args)
                        results.append(result)
                        print(format_table([result]).splitlines()[-1], flush=True)
    return results


def data_sections(args) -> tuple[list[dict], list[str]]:
    """The `pipeline`, `decode` and `resume` sections: their results and their markdown tables."""
    results, tables = [], []
    if "pipeline" in args.sections:
        from modeling_ijepa.benchmarks.pipeline import format_pipeline_table, pipeline_benchmark

        pipeline = [pipeline_benchmark(args.pipeline_config, args.pipeline_batch_size, args.pipeline_steps,
                                       [] if setting == "defaults" else setting.split())
                    for setting in args.pipeline_settings]
        results.extend(pipeline)
        tables.append(format_pipeline_table(pipeline))
    if "decode" in args.sections:
        from modeling_ijepa.benchmarks.decode import decode_benchmark, format_decode_table

        results.append(decode_benchmark(args.decode_images, args.decode_passes, args.seed))
        tables.append(format_decode_table(results[-1]))
    if "resume" in args.sections:
        from modeling_ijepa.benchmarks.resume import format_resume_table, resume_benchmark

        results.append(resume_benchmark(num_records=args.resume_records))
        tables.append(format_resume_table(results[-1]))
    for table in tables:
        print(table, flush=True)
    return results, tables


def main():
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:
        print(json.dumps(run_memory_probe(json.loads(args.memory_probe))))
        return
    device = parse_device(args)
    results = model_sections(args, device)
    if "collator" in args.sections:
        results.append(bench_collator(args))
    data_results, data_tables = data_sections(args)
    environment = {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    print()
    print(format_table(results))
    for table in data_tables:
        print()
        print(table)
    results.extend(data_results)
    Path(args.output).write_text(json.dumps({"arguments": asdict(args), "environment": environment, "results": results}, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
