"""Multi-block mask sampling of I-JEPA (paper Sec. 3, official `src/masks/multiblock.py::MaskCollator`).

Mask format, used everywhere in this package: a list of LongTensors of shape `(batch, kept_patches)` holding patch
indices in raster order of the patch grid; one tensor per block. Context masks list `num_context_blocks` tensors,
target masks `num_target_blocks` tensors.

The sampler is vectorised over the batch (the official code loops over samples and retries in Python) but draws from
the same distribution:

* per batch, one target block size and one context block size. The same uniform draw sets the target block's scale
  and aspect ratio; the context block is square (aspect ratio 1);
* per sample, the positions of `num_target_blocks` target blocks, then `num_context_blocks` context blocks from which
  every target block is removed (unless `allow_overlap`);
* a context block with `min_keep` patches or fewer left is re-drawn; after 20 failed draws the official loop relaxes
  the constraint by no longer removing the last target block, and so on ("retry-then-relax");
* every mask is truncated to the shortest mask of its kind in the batch, so that the batch collates.

Quirks of the official sampler, kept in `mask_sampling="official"` (the faithful default):

1. block corners are drawn with an exclusive upper bound (`randint(0, H - h)`), so a block never touches the last
   row/column of the grid;
2. block sides are shrunk until strictly smaller than the grid, so a block never spans the full height/width;
3. truncation to the batch minimum keeps the first indices in raster order, so the bottom of the context is dropped
   more often than its top.

`mask_sampling="corrected"` fixes all three (inclusive bound, full-grid blocks allowed, random-subset truncation).

The official loop can hang forever when a block can never hold more than `min_keep` patches (e.g. target blocks on
8x8 grids with `min_keep=10`). Here that case raises a `ValueError` naming the settings to change.

Randomness is explicit: every call takes a `torch.Generator`. `IJepaMaskCollator` derives one generator per batch from
`(seed, rank, dataloader worker, batch counter)`, so no two ranks or workers emit the same masks and a resumed run can
restore the counter from `state_dict()`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Official `_sample_block_mask`: 20 draws before the acceptable region is relaxed by one target block.
DRAWS_PER_RELAX_LEVEL = 20


@dataclass(frozen=True)
class MaskSamplingSettings:
    """The knobs of the multi-block sampler (normally read from `IJepaConfig`)."""

    grid_height: int
    grid_width: int
    num_context_blocks: int = 1
    context_block_scale: tuple[float, float] = (0.85, 1.0)
    num_target_blocks: int = 4
    target_block_scale: tuple[float, float] = (0.15, 0.2)
    target_block_aspect_ratio: tuple[float, float] = (0.75, 1.5)
    min_keep: int = 10
    allow_overlap: bool = False
    mask_sampling: str = "official"

    @classmethod
    def from_config(cls, config, **overrides) -> "MaskSamplingSettings":
        grid_height, grid_width = config.patch_grid
        values = dict(
            grid_height=grid_height,
            grid_width=grid_width,
            num_context_blocks=config.num_context_blocks,
            context_block_scale=tuple(config.context_block_scale),
            num_target_blocks=config.num_target_blocks,
            target_block_scale=tuple(config.target_block_scale),
            target_block_aspect_ratio=tuple(config.target_block_aspect_ratio),
            min_keep=config.min_keep,
            allow_overlap=config.allow_overlap,
            mask_sampling=config.mask_sampling,
        )
        unknown = set(overrides) - set(values)
        if unknown:
            raise TypeError(f"Unknown mask sampling override(s) {sorted(unknown)}; valid names: {sorted(values)}.")
        values.update(overrides)
        return cls(**values)

    @property
    def official(self) -> bool:
        if self.mask_sampling not in ("official", "corrected"):
            raise ValueError(f"mask_sampling must be 'official' or 'corrected', got {self.mask_sampling!r}.")
        return self.mask_sampling == "official"


def sample_block_size(
    settings: MaskSamplingSettings, uniform: float, scale: tuple[float, float], aspect_ratio: tuple[float, float]
) -> tuple[int, int]:
    """Block (height, width) in patches for one uniform draw (official `_sample_block_size`).

    The same `uniform` sets both the scale and the aspect ratio, as in the official code.
    """
    height, width = settings.grid_height, settings.grid_width
    block_scale = scale[0] + uniform * (scale[1] - scale[0])
    max_keep = int(height * width * block_scale)
    ratio = aspect_ratio[0] + uniform * (aspect_ratio[1] - aspect_ratio[0])
    # Python's round (banker's rounding) as in the official code.
    block_h = int(round(math.sqrt(max_keep * ratio)))
    block_w = int(round(math.sqrt(max_keep / ratio)))
    if settings.official:
        # Quirk 2: shrink until strictly smaller than the grid.
        block_h = min(block_h, height - 1)
        block_w = min(block_w, width - 1)
    else:
        block_h = min(block_h, height)
        block_w = min(block_w, width)
    return max(block_h, 1), max(block_w, 1)


def _draw_corners(settings, block_h, block_w, shape, generator):
    """Top-left corners `(top, left)`, each of `shape`."""
    # Quirk 1: the official upper bound is exclusive (`randint(0, H - h)`), never touching the last row/column.
    extra = 0 if settings.official else 1
    top = torch.randint(0, max(settings.grid_height - block_h + extra, 1), shape, generator=generator)
    left = torch.randint(0, max(settings.grid_width - block_w + extra, 1), shape, generator=generator)
    return top, left


def _block_masks(settings, top, left, block_h, block_w):
    """Boolean masks `(*top.shape, H, W)` of axis-aligned blocks."""
    rows = torch.arange(settings.grid_height)
    cols = torch.arange(settings.grid_width)
    in_rows = (rows >= top[..., None]) & (rows < top[..., None] + block_h)  # (..., H)
    in_cols = (cols >= left[..., None]) & (cols < left[..., None] + block_w)  # (..., W)
    return in_rows[..., :, None] & in_cols[..., None, :]  # (..., H, W)


def _box_counts(regions, level, top, left, block_h, block_w):
    """How many True entries of `regions[b, level]` `(B, L, H, W)` each block `[top:top+h, left:left+w]` covers.

    `level`, `top`, `left` share one shape `(B, ...)`; returns that shape. Uses a summed-area table per region.
    """
    batch, levels, height, width = regions.shape
    table = torch.zeros(batch, levels, height + 1, width + 1, dtype=torch.int32)
    table[:, :, 1:, 1:] = regions.to(torch.int32).cumsum(2).cumsum(3)
    table = table.reshape(batch, -1)
    base = level * ((height + 1) * (width + 1))
    bottom, right = top + block_h, left + block_w  # exclusive ends, inside the grid

    def at(row, col):
        return table.gather(1, (base + row * (width + 1) + col).reshape(batch, -1)).reshape(level.shape)

    return at(bottom, right) - at(top, right) - at(bottom, left) + at(top, left)


def _truncate(masks: torch.Tensor, keep: int, settings, generator) -> torch.Tensor:
    """Indices `(batch, keep)` of the True entries of `masks` `(batch, N)`, every row holding at least `keep`.

    Official (quirk 3): the first `keep` indices in raster order. Corrected: a uniformly random subset of `keep`
    indices, returned in raster order.
    """
    batch, num = masks.shape
    if settings.official:
        # The first `keep` True entries of each row: a running count picks them, `nonzero` lists them row by row.
        first = masks & (masks.cumsum(dim=1) <= keep)
        return first.nonzero()[:, 1].reshape(batch, keep)
    priority = torch.rand(batch, num, generator=generator)
    # Unselected entries sort last.
    priority = torch.where(masks, priority, torch.full_like(priority, float("inf")))
    chosen = priority.argsort(dim=1)[:, :keep]
    return chosen.sort(dim=1).values.to(torch.long)


def sample_masks(
    settings: MaskSamplingSettings, batch_size: int, generator: torch.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """Sample multi-block masks for one batch.

    Returns:
        context_mask: list of `num_context_blocks` LongTensors `(batch_size, context_patches)`.
        target_mask: list of `num_target_blocks` LongTensors `(batch_size, target_patches)`.
        stats: `{"relaxed_samples": int, "target_block": (h, w), "context_block": (h, w)}`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    height, width = settings.grid_height, settings.grid_width
    num_targets, num_contexts = settings.num_target_blocks, settings.num_context_blocks

    # Official order of draws: target size first, then context size (square).
    target_h, target_w = sample_block_size(
        settings, torch.rand(1, generator=generator).item(), settings.target_block_scale,
        settings.target_block_aspect_ratio,
    )
    context_h, context_w = sample_block_size(
        settings, torch.rand(1, generator=generator).item(), settings.context_block_scale, (1.0, 1.0)
    )
    for kind, (bh, bw), scale_name in (
        ("target", (target_h, target_w), "target_block_scale"),
        ("context", (context_h, context_w), "context_block_scale"),
    ):
        if bh * bw <= settings.min_keep:
            # The official loop would retry forever here.
            raise ValueError(
                f"A {kind} block of {bh}x{bw}={bh * bw} patches on the {height}x{width} patch grid can never hold "
                f"more than min_keep={settings.min_keep} patches (the official sampler hangs here). Lower min_keep, "
                f"raise {scale_name}, or use a finer patch grid (larger image_size or smaller patch_size)."
            )

    # Targets: (B, T, H, W); each is a full block, always valid since h*w > min_keep.
    top, left = _draw_corners(settings, target_h, target_w, (batch_size, num_targets), generator)
    target_blocks = _block_masks(settings, top, left, target_h, target_w)

    # Acceptable regions for the context at each relax level: level r keeps the complements of the first
    # (T - r) target blocks. allowed[:, j] = AND of complements of targets[0:j], so level r uses j = T - r.
    if settings.allow_overlap:
        allowed = torch.ones(batch_size, 1, height, width, dtype=torch.bool)
        levels = 1
    else:
        complements = ~target_blocks  # (B, T, H, W)
        allowed = torch.ones(batch_size, num_targets + 1, height, width, dtype=torch.bool)
        for j in range(1, num_targets + 1):
            allowed[:, j] = allowed[:, j - 1] & complements[:, j - 1]
        allowed = allowed.flip(1)  # index r -> relax level r (r = 0 keeps all T complements)
        levels = num_targets + 1

    # Draw every candidate the official loop could need at once: (B, C, levels * DRAWS) corners.
    draws = levels * DRAWS_PER_RELAX_LEVEL
    c_top, c_left = _draw_corners(settings, context_h, context_w, (batch_size, num_contexts, draws), generator)
    level_of_draw = (torch.arange(draws) // DRAWS_PER_RELAX_LEVEL).expand(batch_size, num_contexts, draws)  # (B, C, D)
    # Patches each candidate keeps inside its level's region, read from summed-area tables of the regions (four
    # look-ups per candidate) instead of materialising (B, C, D, H, W) candidate masks.
    counts = _box_counts(allowed, level_of_draw, c_top, c_left, context_h, context_w)  # (B, C, D)
    valid = counts > settings.min_keep
    # The last level has no constraint and the block holds > min_keep patches, so a valid draw always exists.
    first_valid = valid.to(torch.int8).argmax(dim=-1)  # (B, C)
    relaxed_samples = int((first_valid >= DRAWS_PER_RELAX_LEVEL).any(dim=1).sum())
    if relaxed_samples:
        logger.warning(
            "Mask sampler relaxed the context constraint for %d of %d samples (context block too small once targets "
            "were removed); their context overlaps some target blocks, as in the official sampler.",
            relaxed_samples, batch_size,
        )
    chosen = first_valid[..., None]  # (B, C, 1)
    chosen_top, chosen_left = c_top.gather(2, chosen).squeeze(2), c_left.gather(2, chosen).squeeze(2)  # (B, C)
    chosen_level = level_of_draw.gather(2, chosen).squeeze(2)  # (B, C)
    chosen_region = allowed[torch.arange(batch_size)[:, None], chosen_level]  # (B, C, H, W)
    context_blocks = _block_masks(settings, chosen_top, chosen_left, context_h, context_w) & chosen_region

    target_flat = target_blocks.flatten(-2)  # (B, T, N)
    context_flat = context_blocks.flatten(-2)  # (B, C, N)
    target_keep = int(target_flat.sum(-1).min())
    context_keep = int(context_flat.sum(-1).min())
    target_mask = [_truncate(target_flat[:, t], target_keep, settings, generator) for t in range(num_targets)]
    context_mask = [_truncate(context_flat[:, c], context_keep, settings, generator) for c in range(num_contexts)]
    stats = {
        "relaxed_samples": relaxed_samples,
        "target_block": (target_h, target_w),
        "context_block": (context_h, context_w),
    }
    return context_mask, target_mask, stats


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes, DataLoader workers and Python versions (the masks here
    and the data order, crops and masks of the training data path all seed their generators with it)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class IJepaMaskCollator:
    """Data collator that stacks images and samples I-JEPA multi-block masks (official `MaskCollator`).

    Args:
        config: an `IJepaConfig` (its `patch_grid` and masking fields are used).
        seed: base seed. Masks for a batch are a pure function of `(seed, rank, worker id, batch counter)`.
        rank: process rank; `None` reads it from `torch.distributed` when initialised (else 0).
        **overrides: any `MaskSamplingSettings` field, e.g. `min_keep=4`.

    Call it on a list of examples `{"pixel_values": (C, H, W) tensor, "labels"?: int}`; returns
    `{"pixel_values": (B, C, H, W), "context_mask": [LongTensor(B, Kc)] * num_context_blocks,
    "target_mask": [LongTensor(B, Kt)] * num_target_blocks}` plus `labels` when present: the keys are the arguments
    of `IJepaForPreTraining.forward`. In the rare batches where the official retry-then-relax step fired (the
    context then overlaps some targets, as in the official sampler), the batch also holds `"allow_overlap": True`,
    also a forward argument, so that `model(**batch)` accepts it.
    """

    def __init__(self, config, seed: int = 0, rank: int | None = None, **overrides):
        self.settings = MaskSamplingSettings.from_config(config, **overrides)
        # `config.num_mask_sets` mask sets per image (set-major rows: set s of image b is row s * B + b).
        self.num_mask_sets = int(getattr(config, "num_mask_sets", 1))
        self.seed = int(seed)
        self._rank = rank
        self.num_batches = 0  # batches collated by this (per-worker) copy
        self.last_stats: dict = {}

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def generator_for_batch(self, batch_index: int) -> torch.Generator:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else -1
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, self.rank, worker_id, batch_index))
        return generator

    def sample(self, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Masks for the next batch of `batch_size` images (advances the batch counter): `(num_mask_sets * B, K)`."""
        generator = self.generator_for_batch(self.num_batches)
        self.num_batches += 1
        context_mask, target_mask, self.last_stats = sample_masks(
            self.settings, batch_size * self.num_mask_sets, generator
        )
        return context_mask, target_mask

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("IJepaMaskCollator received an empty list of examples.")
        missing = [i for i, example in enumerate(examples) if "pixel_values" not in example]
        if missing:
            raise KeyError(
                f"Examples {missing[:5]} have no 'pixel_values'; transform images into a (C, H, W) tensor under that key."
            )
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
        context_mask, target_mask = self.sample(len(examples))
        batch = {"pixel_values": pixel_values, "context_mask": context_mask, "target_mask": target_mask}
        if self.last_stats.get("relaxed_samples", 0) and not self.settings.allow_overlap:
            # The official relax step let some contexts overlap their targets: tell the model this batch is
            # legitimate (its forward otherwise rejects overlap while config.allow_overlap is False).
            batch["allow_overlap"] = True
        if "labels" in examples[0]:
            batch["labels"] = torch.as_tensor([example["labels"] for example in examples])
        return batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_batches": self.num_batches}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.num_batches = int(state["num_batches"])


__all__ = ["IJepaMaskCollator", "MaskSamplingSettings", "sample_masks", "sample_block_size"]
