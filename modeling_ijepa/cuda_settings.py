"""Process-wide settings that shape how steady the training steps are: which SDPA kernel attention uses, when Python's
cyclic garbage collector runs, and the CUDA caching allocator's configuration (issue 20).

* `--sdpa_backends flash,efficient,...`: the order in which `torch.nn.functional.scaled_dot_product_attention` tries
  its kernels (`torch.nn.attention.sdpa_kernel(..., set_priority=True)`); empty (default) keeps torch's own order.
  On sm90 recent torch tries cuDNN attention first, which builds an execution plan per new (context, target) shape;
  the masks change those lengths every batch. Unmeasured on a GPU here: the default stays torch's until
  `scripts/gpu_check.sh`'s `stability` rows say otherwise (docs/performance.md).
* `--gc_collect_steps N` (default 50, torchtitan's `training.gc_freq`): automatic collection off during training,
  one `gc.collect(1)` every N steps, so a collection never lands at a random point of a step; 0 keeps Python's
  automatic collector (the behaviour before this option). Objects that live through setup are frozen (`gc.freeze`)
  so no collection scans them again. DataLoader workers forked while it is on get the automatic collector back.
  Collection timing changes no number the model computes (only when unreachable Python objects are freed).
* `--cuda_allocator_settings` (e.g. `expandable_segments:True`): written to `PYTORCH_CUDA_ALLOC_CONF`, which the
  caching allocator reads once, when CUDA initialises: `pretrain` applies it first thing and refuses it if CUDA is
  already initialised in this process with another value (then set the variable before launching instead).

Only torch is imported here (like `compilation.py`), so the benchmarks and the GPU check use the same switches
without the training extra.
"""

from __future__ import annotations

import gc
import logging
import os
from contextlib import ExitStack

import torch

logger = logging.getLogger(__name__)

SDPA_BACKEND_NAMES = {
    "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH",
}
ALLOCATOR_ENV = "PYTORCH_CUDA_ALLOC_CONF"

_fork_hook_registered = False
_collector_paused = False  # set while a GarbageCollectionPolicy holds the automatic collector off


def parse_sdpa_backends(text: str | None) -> list:
    """'flash,efficient' -> [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]; '' or None -> []."""
    from torch.nn.attention import SDPBackend

    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in SDPA_BACKEND_NAMES]
    if unknown:
        raise ValueError(f"--sdpa_backends: unknown backend(s) {unknown}; use a comma-separated order of "
                         f"{', '.join(SDPA_BACKEND_NAMES)} (e.g. 'flash,efficient,cudnn,math').")
    return [getattr(SDPBackend, SDPA_BACKEND_NAMES[name]) for name in names]


def sdpa_priority(backends: list):
    """A context manager that makes SDPA try `backends` in this order (only these where this torch has no priority
    setting); a no-op for []."""
    import inspect

    from torch.nn.attention import sdpa_kernel

    if not backends:
        return ExitStack()
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)


def _automatic_collector_in_child() -> None:
    """After a fork (DataLoader workers): the child gets the automatic collector back; its objects are its own."""
    global _collector_paused
    if _collector_paused:
        _collector_paused = False
        gc.enable()


class GarbageCollectionPolicy:
    """Automatic collection off, `gc.collect(1)` every `every_steps` steps (0: leave Python's collector alone).
    `start()` / `stop()` bracket the training loop; `stop()` restores the collector as it was."""

    def __init__(self, every_steps: int):
        if every_steps < 0:
            raise ValueError(f"--gc_collect_steps must be >= 0, got {every_steps}.")
        self.every_steps = every_steps
        self.was_enabled = gc.isenabled()
        self.collections = 0

    def start(self) -> None:
        global _fork_hook_registered, _collector_paused
        if not self.every_steps:
            return
        if not _fork_hook_registered:
            os.register_at_fork(after_in_child=_automatic_collector_in_child)
            _fork_hook_registered = True
        self.was_enabled = gc.isenabled()
        gc.collect(1)
        gc.freeze()  # setup's objects (model, optimizer, dataset) move to the permanent generation
        gc.disable()
        _collector_paused = True

    def after_step(self, step: int) -> None:
        if self.every_steps and step % self.every_steps == 0:
            gc.collect(1)
            self.collections += 1

    def stop(self) -> None:
        global _collector_paused
        if not self.every_steps:
            return
        _collector_paused = False
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()


class StepSettings:
    """What `train` enters around its loop: SDPA priority and the garbage-collection policy."""

    def __init__(self, sdpa_backends: str | None, gc_collect_steps: int):
        self.backends = parse_sdpa_backends(sdpa_backends)
        self.collector = GarbageCollectionPolicy(gc_collect_steps)
        self._stack = ExitStack()

    @classmethod
    def from_arguments(cls, args) -> "StepSettings":
        return cls(args.sdpa_backends, args.gc_collect_steps)

    def start(self) -> None:
        self._stack.enter_context(sdpa_priority(self.backends))
        self.collector.start()

    def after_step(self, step: int) -> None:
        self.collector.after_step(step)

    def stop(self) -> None:
        self.collector.stop()
        self._stack.close()


def apply_allocator_settings(settings: str | None) -> None:
    """Set `PYTORCH_CUDA_ALLOC_CONF` before CUDA initialises (no-op for None); raise if CUDA already runs with
    another value, since the allocator would silently ignore it."""
    if not settings:
        return
    current = os.environ.get(ALLOCATOR_ENV)
    if current == settings:
        return
    if torch.cuda.is_initialized():
        raise RuntimeError(
            f"--cuda_allocator_settings {settings!r}: CUDA is already initialised in this process "
            f"({ALLOCATOR_ENV}={current!r}), and the allocator reads its settings only once. Set "
            f"{ALLOCATOR_ENV}={settings} in the environment before launching instead."
        )
    os.environ[ALLOCATOR_ENV] = settings
    logger.info("%s=%s (was %r).", ALLOCATOR_ENV, settings, current)
