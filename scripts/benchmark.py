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
    python scripts/benchmark.py --sections stability --device cuda --stability_config vit-huge-14   # step steadiness

The sections live in `modeling_ijepa/benchmarks/` (`sections.SECTIONS` names them all: step, inference, collator,
pipeline, decode, resume, stability); this script parses the arguments, runs them and writes the JSON.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser

from modeling_ijepa.benchmarks.memory import run_memory_probe
from modeling_ijepa.benchmarks.sections import BenchmarkArguments, parse_device, run_sections


def environment(device: torch.device) -> dict:
    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }


def main():
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe is not None:  # kept for old command lines; the benchmarks now run `-m ...memory`
        print(json.dumps(run_memory_probe(json.loads(args.memory_probe))))
        return
    device = parse_device(args)
    results, tables = run_sections(args, device)
    print()
    print("\n\n".join(tables))
    report = {"arguments": asdict(args), "environment": environment(device), "results": results}
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
