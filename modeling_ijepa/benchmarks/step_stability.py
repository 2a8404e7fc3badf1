"""The `stability` section (issue 20): why some pretraining steps take twice as long as others.

The model-only step of `model_step.OurStep` (forward, backward, fused AdamW, EMA; what the pretraining loop does per
step) runs over the same `masks` pre-drawn mask sets (our sampler = the official MaskCollator's statistics) `passes`
times in one process. A cost paid only on pass 1 is a per-shape cost (kernel plans, autotuning, allocator growth);
a cost on both passes is not. Per step it records:

* `step_ms`: CUDA-event time of the step (device synchronised after each step; on CPU, `perf_counter`), and `wall_ms`;
* `context_length`, `target_length`, and `new_shape` (this (context, target) pair first seen in this process);
* `sdpa`: the kernel SDPA chose for each attention call of the step, on the first step of each shape (the
  dispatcher's own choice function, `torch._fused_sdp_choice`, called with the exact query/key/value under the
  active `sdpa_kernel` settings); on CUDA a profiled extra step also lists the attention kernels that really ran;
* `device_allocs`, `device_frees`, `alloc_retries`: deltas of `torch.cuda.memory_stats` (cudaMalloc/cudaFree calls
  of the caching allocator, and retries after freeing its cache), `reserved_mib` after the step;
* `gc_collections`, `gc_ms`: Python garbage collections during the step and their pause (`gc.callbacks`);
* `sm_clock_mhz`: the SM clock after the step (`torch.cuda.clock_rate`, needs `pynvml`).
CUDA-only counters read "n/a" on CPU. Switches: `sdpa_backends` (priority order), `gc_collect_steps` (automatic GC
off, `gc.collect(1)` every N steps: `modeling_ijepa.cuda_settings`), `warm_shapes` (one untimed forward+backward per
distinct shape before pass 1), and the allocator setting through `PYTORCH_CUDA_ALLOC_CONF` (set by the caller
before the process starts: the allocator reads it once; recorded in the result).
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from .. import MaskSamplingSettings, ijepa_config_from_preset, sample_masks
from ..cuda_settings import ALLOCATOR_ENV, StepSettings
from .model_step import OurStep

SLOW_FACTOR = 1.3  # a step slower than 1.3x the pass median counts as slow
WARMUP_STEPS = 2  # untimed steps with masks of their own: optimizer state, cuBLAS handles, first compilations
ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries")
NOT_AVAILABLE = "n/a"


@dataclass
class StabilitySettings:
    label: str = "default"
    config: str = "vit-huge-14"
    batch_size: int = 128
    dtype: str = "bf16"
    masks: int = 200  # mask sets replayed per pass
    passes: int = 2
    compile: bool = False
    compile_backend: str = "inductor"
    sdpa_backends: str | None = None  # e.g. "flash,efficient,cudnn,math"; None: torch's order
    gc_collect_steps: int = 0  # 0: Python's automatic collector
    warm_shapes: bool = False
    compare_steps: int = 0  # also summarise the first N steps of pass 1 (to compare with shorter variants)
    seed: int = 0


class SdpaChoiceRecorder:
    """While `recording`, asks the SDPA dispatcher which kernel each call gets (`torch._fused_sdp_choice` with the
    call's own tensors and options) and counts the answers; installed in place of
    `torch.nn.functional.scaled_dot_product_attention` (transformers' `sdpa` attention looks it up per call)."""

    def __init__(self, enabled: bool = True):
        from torch.nn.attention import SDPBackend

        # Off for compiled layers: dynamo would trace the wrapper and recompile whenever `recording` flips.
        self.enabled = enabled
        self.names = {int(member): name for name, member in SDPBackend.__members__.items()}
        self.recording, self.choices = False, Counter()

    def _record(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
        kind = query.device.type
        if torch.is_autocast_enabled(kind) and query.dtype == torch.float32:  # what autocast will hand the kernel
            dtype = torch.get_autocast_dtype(kind)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
        self.choices[self.names.get(int(choice), str(choice))] += 1

    def __enter__(self):
        self.original = torch.nn.functional.scaled_dot_product_attention
        if not self.enabled:
            return self

        def recorded_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, **extra):
            if self.recording:
                self._record(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            return self.original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                 scale=scale, enable_gqa=enable_gqa, **extra)

        torch.nn.functional.scaled_dot_product_attention = recorded_sdpa
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self.original

    def take(self) -> dict[str, int]:
        if not self.enabled:
            return {f"{NOT_AVAILABLE} (compiled)": 1}
        choices, self.choices = dict(self.choices), Counter()
        return choices


class GcPauses:
    """Python garbage collections and their pause times, via `gc.callbacks`, since the last `take()`."""

    def __init__(self):
        self.count, self.seconds, self._started = 0, 0.0, None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.count, self.seconds, self._started = self.count + 1, self.seconds + time.perf_counter() - self._started, None

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)

    def take(self) -> tuple[int, float]:
        taken, self.count, self.seconds = (self.count, self.seconds * 1e3), 0, 0.0
        return taken


def sm_clock_reader(device: torch.device):
    """(a callable returning the SM clock in MHz, or None; why not when None)."""
    if device.type != "cuda":
        return None, f"{NOT_AVAILABLE} (CPU)"
    try:
        import pynvml
    except ImportError:
        return None, f"{NOT_AVAILABLE} (pynvml not installed: nvidia-ml-py in scripts/gpu_wheels.txt)"
    try:
        torch.cuda.clock_rate(device)
    except pynvml.NVMLError as error:
        return None, f"{NOT_AVAILABLE} (NVML: {error})"
    return (lambda: torch.cuda.clock_rate(device)), None


def allocator_counters(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    counters = {name: stats.get(name) for name in ALLOCATOR_COUNTERS}
    counters["reserved_bytes"] = stats.get("reserved_bytes.all.current")
    return counters


def replay_masks(config, batch_size: int, count: int, seed: int, device) -> list[tuple[list, list]]:
    """`count` (context_mask, target_mask) sets from our sampler, on `device`."""
    generator = torch.Generator().manual_seed(seed)
    settings = MaskSamplingSettings.from_config(config)
    masks = []
    for _ in range(count):
        context_mask, target_mask, _ = sample_masks(settings, batch_size, generator)
        masks.append(([m.to(device) for m in context_mask], [m.to(device) for m in target_mask]))
    return masks


def shape_of(masks) -> tuple[int, int]:
    context_mask, target_mask = masks
    return int(context_mask[0].size(1)), int(target_mask[0].size(1))


def counter_deltas(before: dict | None, after: dict | None) -> dict:
    if before is None or after is None:
        return {"device_allocs": NOT_AVAILABLE, "device_frees": NOT_AVAILABLE, "alloc_retries": NOT_AVAILABLE,
                "reserved_mib": NOT_AVAILABLE}

    def delta(name):
        return NOT_AVAILABLE if after[name] is None or before[name] is None else after[name] - before[name]

    return {"device_allocs": delta("num_device_alloc"), "device_frees": delta("num_device_free"),
            "alloc_retries": delta("num_alloc_retries"),
            "reserved_mib": NOT_AVAILABLE if after["reserved_bytes"] is None else after["reserved_bytes"] / 2**20}


class StepTimer:
    """Times one step and gathers what happened in it (see the module docstring for the fields)."""

    def __init__(self, device: torch.device, recorder: SdpaChoiceRecorder, pauses: GcPauses):
        self.device, self.recorder, self.pauses = device, recorder, pauses
        self.clock, self.clock_reason = sm_clock_reader(device)

    def __call__(self, run_step, new_shape: bool) -> dict:
        cuda = self.device.type == "cuda"
        before = allocator_counters(self.device)
        self.pauses.take()
        self.recorder.recording = new_shape
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        started = time.perf_counter()
        run_step()
        if cuda:
            end.record()
            torch.cuda.synchronize(self.device)
        wall_ms = (time.perf_counter() - started) * 1e3
        self.recorder.recording = False
        gc_collections, gc_ms = self.pauses.take()
        return {
            "step_ms": start.elapsed_time(end) if cuda else wall_ms, "wall_ms": wall_ms,
            "sdpa": self.recorder.take() if new_shape else {},
            **counter_deltas(before, allocator_counters(self.device)),
            "gc_collections": gc_collections, "gc_ms": gc_ms,
            "sm_clock_mhz": self.clock() if self.clock is not None else NOT_AVAILABLE,
        }


def warm_distinct_shapes(step: OurStep, pixel_values, masks, seen: set) -> float:
    """One untimed forward + backward (no optimizer update) per shape not yet seen; seconds spent."""
    started = time.perf_counter()
    for mask_set in masks:
        if shape_of(mask_set) in seen:
            continue
        seen.add(shape_of(mask_set))
        step.loss(pixel_values, *mask_set).backward()
        step.optimizer.zero_grad(set_to_none=True)
    if step.device.type == "cuda":
        torch.cuda.synchronize(step.device)
    return time.perf_counter() - started


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def numeric_sum(records: list[dict], name: str):
    values = [r[name] for r in records]
    return NOT_AVAILABLE if any(v == NOT_AVAILABLE for v in values) else sum(values)


def summarize(records: list[dict], batch_size: int) -> dict:
    """p10/p50/p90/max/mean of `step_ms`, images/s at the mean, slow and new-shape steps, counter totals."""
    times = sorted(r["step_ms"] for r in records)
    p50, mean = quantile(times, 0.5), sum(times) / len(times)
    new = [r["step_ms"] for r in records if r["new_shape"]]
    repeat = [r["step_ms"] for r in records if not r["new_shape"]]
    clocks = [r["sm_clock_mhz"] for r in records if r["sm_clock_mhz"] != NOT_AVAILABLE]
    backends = Counter()
    for r in records:
        backends.update(r["sdpa"])
    return {
        "steps": len(times), "p10_ms": quantile(times, 0.1), "p50_ms": p50, "p90_ms": quantile(times, 0.9),
        "max_ms": times[-1], "mean_ms": mean, "p90_over_p50": quantile(times, 0.9) / p50,
        "images_per_s": batch_size * 1e3 / mean, "slow_steps": sum(t > SLOW_FACTOR * p50 for t in times),
        "new_shape_steps": len(new), "new_shape_mean_ms": sum(new) / len(new) if new else None,
        "repeat_shape_mean_ms": sum(repeat) / len(repeat) if repeat else None,
        "device_allocs": numeric_sum(records, "device_allocs"), "device_frees": numeric_sum(records, "device_frees"),
        "alloc_retries": numeric_sum(records, "alloc_retries"),
        "gc_collections": sum(r["gc_collections"] for r in records), "gc_ms": sum(r["gc_ms"] for r in records),
        "sm_clock_mhz": [min(clocks), max(clocks)] if clocks else NOT_AVAILABLE, "sdpa": dict(backends),
    }


def profiled_attention_kernels(step: OurStep, pixel_values, masks) -> list[str] | str:
    """CUDA kernels of one extra (untimed) step whose names say attention (flash, fmha, cudnn, sdpa, softmax)."""
    if step.device.type != "cuda":
        return f"{NOT_AVAILABLE} (CPU)"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(pixel_values, masks)
        torch.cuda.synchronize(step.device)
    words = ("flash", "fmha", "cudnn", "attention", "sdpa", "softmax")
    names = {event.key for event in prof.key_averages() if any(w in event.key.lower() for w in words)}
    return sorted(names)[:12]


def run_passes(settings: StabilitySettings, step: OurStep, pixel_values, masks, timer: StepTimer,
               runtime: StepSettings, seen: set) -> list[dict]:
    """Every mask set `settings.passes` times, one record per step."""
    records, index = [], 0
    for pass_index in range(1, settings.passes + 1):
        for mask_index, mask_set in enumerate(masks):
            context_length, target_length = shape_of(mask_set)
            new_shape = (context_length, target_length) not in seen
            seen.add((context_length, target_length))
            index += 1

            def run_step():
                step(pixel_values, mask_set)
                runtime.after_step(index)  # a scheduled collection belongs to the step it follows

            record = timer(run_step, new_shape)
            records.append({"pass": pass_index, "mask": mask_index, "context_length": context_length,
                            "target_length": target_length, "new_shape": new_shape, **record})
    return records


def stability_benchmark(settings: StabilitySettings, device: torch.device) -> dict:
    """The section's result: settings, environment, per-pass summaries and every step's record."""
    torch.manual_seed(settings.seed)
    config = ijepa_config_from_preset(settings.config, attn_implementation="sdpa")
    step = OurStep(config, device, settings.dtype, settings.compile, False, compile_backend=settings.compile_backend)
    masks = replay_masks(config, settings.batch_size, settings.masks, settings.seed + 1, device)
    warmup_masks = replay_masks(config, settings.batch_size, WARMUP_STEPS, settings.seed + 2, device)
    height, width = config.image_size_hw
    generator = torch.Generator().manual_seed(settings.seed)
    pixel_values = torch.randn(settings.batch_size, config.num_channels, height, width, generator=generator).to(device)
    runtime, seen = StepSettings(settings.sdpa_backends, settings.gc_collect_steps), set()
    started = time.perf_counter()
    with SdpaChoiceRecorder(enabled=not settings.compile) as recorder, GcPauses() as pauses:
        runtime.start()
        try:
            timer = StepTimer(device, recorder, pauses)
            for mask_set in warmup_masks:
                timer(lambda: step(pixel_values, mask_set), new_shape=False)
                seen.add(shape_of(mask_set))
            warm_shapes_s = warm_distinct_shapes(step, pixel_values, masks, seen) if settings.warm_shapes else 0.0
            records = run_passes(settings, step, pixel_values, masks, timer, runtime, seen)
            kernels = profiled_attention_kernels(step, pixel_values, masks[0])
        finally:
            runtime.stop()
    passes = [summarize([r for r in records if r["pass"] == p], settings.batch_size)
              for p in range(1, settings.passes + 1)]
    result = {"kind": "stability", **asdict(settings), "device": str(device),
              "allocator_settings": os.environ.get(ALLOCATOR_ENV) or "default", "warm_shapes_s": warm_shapes_s,
              "distinct_shapes": len({shape_of(m) for m in masks}), "pass_summaries": passes,
              "profiler_attention_kernels": kernels, "sm_clock": timer.clock_reason or "pynvml",
              "seconds": time.perf_counter() - started, "steps": records}
    if settings.compare_steps:
        first = [r for r in records if r["pass"] == 1][:settings.compare_steps]
        result["compare_summary"] = summarize(first, settings.batch_size)
    return result


def format_stability_table(results: list[dict]) -> str:
    """One markdown row per pass (and per `compare_steps` prefix) of each stability result."""
    lines = ["| variant | pass | steps | p10 ms | p50 ms | p90 ms | max ms | p90/p50 | mean img/s | slow | "
             "new shapes: n, mean ms (repeat mean ms) | device allocs/frees/retries | GC n, ms | SM MHz | SDPA |",
             "|" + "---|" * 15]

    def number(value, digits=1):
        return value if isinstance(value, str) else ("-" if value is None else f"{value:.{digits}f}")

    for r in results:
        rows = [(str(i), s) for i, s in enumerate(r["pass_summaries"], start=1)]
        if "compare_summary" in r:
            rows.append((f"1, first {r['compare_summary']['steps']}", r["compare_summary"]))
        variant = (f"{r['label']} ({r['config']} b{r['batch_size']} {r['dtype']}"
                   f"{' compiled' if r['compile'] else ''}, alloc {r['allocator_settings']})")
        for name, s in rows:
            clock = s["sm_clock_mhz"] if isinstance(s["sm_clock_mhz"], str) else "-".join(map(str, s["sm_clock_mhz"]))
            sdpa = ", ".join(f"{k} x{v}" for k, v in sorted(s["sdpa"].items())) or "-"
            lines.append(
                f"| {variant} | {name} | {s['steps']} | {number(s['p10_ms'])} | {number(s['p50_ms'])} | "
                f"{number(s['p90_ms'])} | {number(s['max_ms'])} | {s['p90_over_p50']:.2f} | {s['images_per_s']:.1f} | "
                f"{s['slow_steps']} | {s['new_shape_steps']}, {number(s['new_shape_mean_ms'])} "
                f"({number(s['repeat_shape_mean_ms'])}) | {s['device_allocs']}/{s['device_frees']}/"
                f"{s['alloc_retries']} | {s['gc_collections']}, {s['gc_ms']:.1f} | {clock} | {sdpa} |"
            )
    return "\n".join(lines)
