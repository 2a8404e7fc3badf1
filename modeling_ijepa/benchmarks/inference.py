"""The `inference` section: `modeling_ijepa.IJepaModel` against `transformers.IJepaModel` with the same weights;
the outputs are compared and both timed interleaved (memory on CPU: one subprocess per model)."""

from __future__ import annotations

import gc
from functools import partial

import torch
import transformers

from .. import IJepaModel, ijepa_config_from_preset
from .common import autocast, interleaved_medians


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
    from .memory import measure_memory

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
            result[f"{impl}_memory"] = measure_memory(dict(spec, kind="inference", impl=impl, device=device.type,
                                                           warmup=args.warmup))
        result["memory_ratio"] = (result["ours_memory"]["peak_step_mib"]
                                  / max(result["transformers_memory"]["peak_step_mib"], 1e-9))
    return result
