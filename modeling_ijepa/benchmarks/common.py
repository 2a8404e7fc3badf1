"""What every benchmark section shares: dtypes, synchronised timing, interleaved medians, autocast, the matmul peak
and the official optimizer grouping."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch
import transformers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Official configs: AdamW with weight decay 0.04 (ramped to 0.4) and lr up to 1e-3; the values only need to be
# identical for both steps, they do not affect speed.
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.04
MIB = 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_step_peak_memory(fn, device: torch.device) -> dict:
    """One call of `fn` on a CUDA device: its own peak above what was allocated before it, and the peak in all, from
    the caching allocator's exact counters."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_step_mib": (peak - before) / MIB, "peak_allocated_mib": peak / MIB, "method": "cuda_max_allocated"}


def timed(fn, device) -> float:
    """Seconds of `fn()`, with the device synchronised before and after."""
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


def autocast(device, dtype_name: str):
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
