"""The `step` section: one full pretraining step (forward -> backward -> AdamW -> EMA) of `IJepaForPreTraining`
against the official-style baseline (`official_style.py`), from the same weights and the same pre-drawn masks; the
losses of the first steps are compared numerically, each mask sampler is timed apart (in training both run in the
data-loader workers), FLOPs are counted once and MFU taken against the matmul peak measured in the same run."""

from __future__ import annotations

import gc
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import IJepaForPreTraining, MaskSamplingSettings, ema_momentum, ijepa_config_from_preset, sample_masks
from ..compilation import compile_regions
from .common import (
    DTYPES, LEARNING_RATE, WEIGHT_DECAY, autocast, cuda_step_peak_memory, interleaved_medians, matmul_peak_flops,
    weight_decay_groups,
)
from .official_style import LoopMaskSampler, OfficialStylePretraining, load_from_ours

# Number of optimizer steps whose losses are compared between our step and the baseline.
PARITY_STEPS = 3
# fp32 differs only by summation order (fused vs separate q/k/v, SDPA vs naive softmax); bf16 autocast rounds
# every matmul input to 8 mantissa bits.
PARITY_RTOL = {"fp32": 1e-4, "bf16": 3e-2}


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

    def __call__(self, pixel_values, masks, generator=None):
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

    def __call__(self, pixel_values, masks, generator=None):
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


def flops_and_mfu(spec, ours, pixel_values, masks, times: dict, device) -> dict:
    flops = count_flops(ours, pixel_values, masks)
    peak = matmul_peak_flops(device, DTYPES[spec["dtype"]])
    result = {"flops_per_step": flops, "achieved_flops": flops / times["ours"], "matmul_peak_flops": peak,
              "mfu": flops / times["ours"] / peak}
    # Above 1 means the square-matmul probe is slower than the model's GEMMs (seen with bf16 on CPUs without a
    # fast bf16 GEMM path): the MFU is then not meaningful.
    result["mfu_valid"] = result["mfu"] <= 1.0
    if "baseline" in times:
        result["baseline_mfu"] = flops / times["baseline"] / peak
    return result


def cuda_step_memory(fns: dict, device) -> dict:
    """The caching allocator's counters are exact, so measure in this process: each step's own peak above what was
    allocated before it (both models' weights and optimizer states stay resident)."""
    result = {}
    for impl, fn in fns.items():
        gc.collect()
        result[f"{impl}_memory"] = cuda_step_peak_memory(fn, device)
    return result


def step_timings(spec, config, ours, baseline, device, args) -> tuple[dict, dict, tuple]:
    """(results, the timed callables, the (pixel_values, masks) they use): step and sampler medians."""
    pixel_values, masks = make_inputs(config, spec["batch_size"], device, spec["seed"] + 1, 1)[0]
    generator = torch.Generator().manual_seed(1)
    fns = {"ours": partial(ours, pixel_values, masks, generator)}
    samplers = {"ours": partial(ours.sample, spec["batch_size"], generator)}
    if baseline is not None:
        fns["baseline"] = partial(baseline, pixel_values, masks, generator)
        samplers["baseline"] = partial(baseline.sample, spec["batch_size"], generator)
    times = interleaved_medians(fns, args.warmup, args.reps, device)
    result = {"ours_s": times["ours"], "images_per_s": spec["batch_size"] / times["ours"]}
    if baseline is not None:
        result.update(baseline_s=times["baseline"], ratio=times["ours"] / times["baseline"])
    for impl, seconds in interleaved_medians(samplers, 1, args.reps, torch.device("cpu")).items():
        result[f"{impl}_sampler_s"] = seconds  # CPU work of the data-loader workers, not of the step
    return result, fns, (pixel_values, masks, times)


def bench_step(spec, device, args) -> dict:
    """One `step` row: timings, parity with the baseline, FLOPs/MFU, memory (CPU: one subprocess per step kind)."""
    from .memory import measure_memory

    config, ours, baseline = build_steps(spec, device)
    result = {"kind": "step", **spec}
    if baseline is not None:
        result["parity"] = check_parity(spec, config, ours, baseline, device)  # also warms both up
    timings, fns, (pixel_values, masks, times) = step_timings(spec, config, ours, baseline, device, args)
    result.update(timings)
    if args.flops:
        result.update(flops_and_mfu(spec, ours, pixel_values, masks, times, device))
    if args.memory and device.type == "cuda":
        result.update(cuda_step_memory(fns, device))
    del ours, baseline, fns
    gc.collect()
    if args.memory and device.type == "cpu":
        for impl in ("ours", "baseline") if spec["baseline"] else ("ours",):
            result[f"{impl}_memory"] = measure_memory(dict(spec, kind="step", impl=impl, device=device.type,
                                                           warmup=args.warmup))
    if args.memory and spec["baseline"]:
        result["memory_ratio"] = result["ours_memory"]["peak_step_mib"] / max(
            result["baseline_memory"]["peak_step_mib"], 1e-9
        )
    return result
