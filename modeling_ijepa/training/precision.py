"""`--mixed_precision auto`: bf16 autocast where it pays, fp32 where it does not, decided by timing the run's own step.

Why a step probe and not a matmul probe: on a Xeon with AMX a bf16 matmul is 9x faster than fp32, yet the tiny-cpu
step at batch 64 runs at 0.59x in bf16 (the casts cost more than the small matmuls save) while ViT-S/16 at batch 16
runs 1.95x faster. Only the model's step at the run's config and batch tells. On CPUs without bf16 instructions
(AVX-512 BF16 or AMX; e.g. the AMD EPYC this was developed on, where bf16 steps ran ~10x slower) there is nothing to
gain and the probe is skipped. On CUDA, `auto` means bf16 where the GPU supports it (the official runs train in bf16).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

# bf16 must beat fp32 by this margin to be chosen: timing noise must never pick the slower setting.
BF16_MIN_SPEEDUP = 1.05
PROBE_WARMUP_STEPS = 1  # first step: allocator, oneDNN kernel selection
PROBE_TIMED_STEPS = 3  # median of these
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags() -> list[str]:
    """The bf16 instruction-set flags of this CPU (`/proc/cpuinfo`, as `lscpu` shows them); [] when none or unknown."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [flag for flag in CPU_BF16_FLAGS if flag in flags]
    return []


def time_step(model, batch_size: int, dtype: torch.dtype | None, steps: int = PROBE_TIMED_STEPS) -> float:
    """Median seconds of the pretraining step (forward, backward, AdamW, EMA) on CPU at this batch, under CPU autocast
    to `dtype` (None: fp32). Trains `model`: pass a throw-away copy."""
    from .. import IJepaMaskCollator

    config = model.config
    collator = IJepaMaskCollator(config, seed=0)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, fused=True)
    height, width = config.image_size_hw
    pixel_values = torch.randn(batch_size, config.num_channels, height, width, generator=torch.Generator().manual_seed(0))
    masks = [collator.sample(batch_size) for _ in range(PROBE_WARMUP_STEPS + steps)]
    times = []
    for context_mask, target_mask in masks:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(pixel_values, context_mask=context_mask, target_mask=target_mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target_encoder(0.996)
        times.append(time.perf_counter() - start)
    return statistics.median(times[PROBE_WARMUP_STEPS:])


def choose_mixed_precision(model_args, batch_size: int, timer=time_step, flags=None) -> tuple[str, str]:
    """('bf16' or 'no', a sentence saying why) for a one-process run: on CUDA bf16 where supported; on CPU the faster
    of fp32 and bf16 autocast for the step of this model at `batch_size` (both timings in the sentence), fp32 unless
    bf16 is `BF16_MIN_SPEEDUP` faster. `flags` overrides the CPU's bf16 flags (tests)."""
    from .building import build_config, build_model

    if torch.cuda.is_available():
        choice = "bf16" if torch.cuda.is_bf16_supported() else "no"
        return choice, f"--mixed_precision auto: {choice} on CUDA ({torch.cuda.get_device_name()})."
    flags = cpu_bf16_flags() if flags is None else flags
    if not flags:
        return "no", (f"--mixed_precision auto: fp32; this CPU has none of {', '.join(CPU_BF16_FLAGS)}, so bf16 "
                      "autocast would be slower (not probed).")
    probe_args = replace(model_args, torch_compile=False)  # eager: minutes of compilation would not tell more
    timings = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        model = build_model(probe_args, build_config(probe_args)).train()  # a throw-away copy of the run's model
        model.check_mask_values = False
        timings[name] = timer(model, batch_size, dtype)
        del model
    speedup = timings["fp32"] / timings["bf16"]
    choice = "bf16" if speedup >= BF16_MIN_SPEEDUP else "no"
    return choice, (
        f"--mixed_precision auto: the step at batch {batch_size} took {timings['fp32'] * 1e3:.1f} ms in fp32 and "
        f"{timings['bf16'] * 1e3:.1f} ms in bf16 autocast ({speedup:.2f}x; CPU flags {', '.join(flags)}): using "
        f"{'bf16' if choice == 'bf16' else 'fp32'}."
    )
