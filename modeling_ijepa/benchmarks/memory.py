"""Peak memory of one step or one inference batch.

On CUDA, `torch.cuda.max_memory_allocated` over one step after a warm-up step. On CPU, each measurement runs in a
fresh subprocess (`python -m modeling_ijepa.benchmarks.memory SPEC`, glibc told to `mmap` every large buffer, so
freed memory leaves the resident set): after setup and one warm-up step, the kernel's peak-RSS counter is reset
(`/proc/self/clear_refs`) and the peak of the next step is read back (`VmHWM`); `peak_step_mib` is that peak minus
the resident set at the reset (activations, gradients, temporaries), `peak_rss_mib` the absolute peak (weights,
optimizer state, interpreter included).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .common import autocast, cuda_step_peak_memory

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding `modeling_ijepa/`


def read_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}; CPU memory needs Linux.")


def probe_callable(spec: dict, device: torch.device):
    """The one implementation `spec` names, built and ready: a callable doing one step or one inference batch."""
    if spec["kind"] == "inference":
        from .inference import build_inference

        _, ours_encoder, theirs_encoder, pixel_values = build_inference(spec, device)
        model = ours_encoder if spec["impl"] == "ours" else theirs_encoder
        del ours_encoder, theirs_encoder

        def run():
            with torch.inference_mode(), autocast(device, spec["dtype"]):
                model(pixel_values)

        return run
    from .model_step import build_steps, make_inputs

    config, ours, baseline = build_steps(spec, device)
    step = ours if spec["impl"] == "ours" else baseline
    del ours, baseline
    (pixel_values, masks), = make_inputs(config, spec["batch_size"], device, spec["seed"] + 1, 1)
    generator = torch.Generator().manual_seed(0)
    return lambda: step(pixel_values, masks, generator)


def run_memory_probe(spec: dict) -> dict:
    """In this (fresh) process: build one implementation, warm it up, reset the peak counter, run one repetition."""
    device = torch.device(spec["device"])
    run = probe_callable(spec, device)
    for _ in range(max(spec["warmup"], 1)):  # allocates optimizer state; compiles
        run()
    gc.collect()
    if device.type == "cuda":
        return cuda_step_peak_memory(run, device)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    before = read_status_kib("VmRSS")
    run()
    peak = read_status_kib("VmHWM")
    return {"peak_step_mib": (peak - before) / 1024, "peak_rss_mib": peak / 1024, "method": "cpu_vmhwm_subprocess"}


def measure_memory(spec: dict) -> dict:
    """`run_memory_probe(spec)` in a fresh subprocess (so the CPU peak belongs to this measurement alone)."""
    env = dict(os.environ)
    # Serve every allocation above 64 KiB by mmap (and so return it to the OS on free): the resident set then tracks
    # live tensors instead of glibc's free lists.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "modeling_ijepa.benchmarks.memory", json.dumps(spec)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {spec['kind']}/{spec['impl']} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(run_memory_probe(json.loads(sys.argv[1]))))
