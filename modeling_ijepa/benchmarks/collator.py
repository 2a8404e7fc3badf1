"""The `collator` section: the vectorised `IJepaMaskCollator` against the Python-loop sampler of the official
algorithm, on one preset's patch grid (CPU: in training both run in the data-loader workers)."""

from __future__ import annotations

import torch

from .. import IJepaMaskCollator, ijepa_config_from_preset
from .common import interleaved_medians
from .official_style import LoopMaskSampler


def bench_collator(preset: str, batch_size: int, reps: int, seed: int = 0) -> dict:
    config = ijepa_config_from_preset(preset)
    collator = IJepaMaskCollator(config, seed=seed)
    reference = LoopMaskSampler.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    times = interleaved_medians(
        {"ours": lambda: collator.sample(batch_size), "loop_reference": lambda: reference(batch_size, generator)},
        1, reps, torch.device("cpu"),
    )
    return {
        "kind": "collator", "config": preset, "grid": list(config.patch_grid), "batch_size": batch_size,
        "ours_s": times["ours"], "loop_reference_s": times["loop_reference"],
        "speedup": times["loop_reference"] / times["ours"],
    }
