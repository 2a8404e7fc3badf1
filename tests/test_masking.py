"""Multi-block mask collator: format, constraints, block-size arithmetic, randomness, modes.

The distribution against the official loop sampler is tested in tests/test_mask_distribution.py."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from modeling_ijepa import IJepaConfig, IJepaMaskCollator, MaskSamplingSettings, ijepa_config_from_preset, sample_masks
from modeling_ijepa.masking_ijepa import sample_block_size


def settings_for(config=None, **overrides):
    return MaskSamplingSettings.from_config(config or IJepaConfig(), **overrides)


def examples(batch, size=32, labels=False):
    out = []
    for i in range(batch):
        example = {"pixel_values": torch.full((3, size, size), float(i))}
        if labels:
            example["labels"] = i % 3
        out.append(example)
    return out


def block_extent(indices, width):
    rows, cols = indices // width, indices % width
    return rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()


# --------------------------------------------------------------------------------------------------------------------
# Format


def test_collator_output_format_and_keys():
    config = ijepa_config_from_preset("tiny-cpu")
    batch = IJepaMaskCollator(config, seed=0)(examples(5, labels=True))
    assert set(batch) == {"pixel_values", "context_mask", "target_mask", "labels"}
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][:, 0, 0, 0], torch.arange(5.0))
    assert batch["labels"].tolist() == [0, 1, 2, 0, 1]
    assert len(batch["context_mask"]) == config.num_context_blocks
    assert len(batch["target_mask"]) == config.num_target_blocks
    for mask in batch["context_mask"] + batch["target_mask"]:
        assert mask.dtype == torch.long and mask.dim() == 2 and mask.size(0) == 5
        assert mask.min() >= 0 and mask.max() < config.num_patches
        # Raster order, no duplicates.
        assert torch.all(mask[:, 1:] > mask[:, :-1])
    # The collated batch feeds the model directly.
    from modeling_ijepa import IJepaForPreTraining

    model = IJepaForPreTraining(ijepa_config_from_preset(
        "tiny-cpu", hidden_size=16, num_hidden_layers=1, intermediate_size=32, pred_hidden_size=8,
        pred_num_hidden_layers=1, num_attention_heads=2, pred_num_attention_heads=2)).eval()
    batch.pop("labels")
    assert torch.isfinite(model(**batch).loss)


def test_collator_rejects_bad_examples():
    collator = IJepaMaskCollator(ijepa_config_from_preset("tiny-cpu"))
    with pytest.raises(ValueError, match="empty list"):
        collator([])
    with pytest.raises(KeyError, match="pixel_values"):
        collator([{"image": 1}])


def test_unknown_override_is_rejected():
    with pytest.raises(TypeError, match="min_keeps"):
        IJepaMaskCollator(IJepaConfig(), min_keeps=3)


# --------------------------------------------------------------------------------------------------------------------
# Constraints


@pytest.mark.parametrize("mode", ["official", "corrected"])
def test_context_and_targets_disjoint_and_sizes_in_range(mode):
    config = IJepaConfig()  # ViT-H/14 grid, 16x16
    settings = settings_for(config, mask_sampling=mode)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        context_mask, target_mask, stats = sample_masks(settings, 16, generator)
        th, tw = stats["target_block"]
        ch, cw = stats["context_block"]
        # Target block: scale and aspect ratio inside the configured ranges (up to rounding to whole patches).
        assert 0.15 * 256 - 2 * max(th, tw) <= th * tw <= 0.2 * 256 + 2 * max(th, tw)
        assert 0.75 * 0.5 <= th / tw <= 1.5 * 2
        assert ch == cw  # square context block
        assert 0.85 * 256 - 2 * ch <= ch * cw <= 256
        for b in range(16):
            context = set(context_mask[0][b].tolist())
            for t in target_mask:
                assert not context & set(t[b].tolist())
        # min_keep: a block is kept only with more than min_keep patches.
        assert context_mask[0].size(1) > config.min_keep
        assert all(t.size(1) > config.min_keep for t in target_mask)
        assert stats["relaxed_samples"] == 0


def test_target_blocks_are_rectangles_of_the_batch_block_size():
    settings = settings_for(IJepaConfig())
    context_mask, target_mask, stats = sample_masks(settings, 8, torch.Generator().manual_seed(1))
    th, tw = stats["target_block"]
    for t in target_mask:
        assert t.size(1) == th * tw  # targets are never truncated: every block has the same size
        for b in range(8):
            r0, r1, c0, c1 = block_extent(t[b], 16)
            assert (r1 - r0 + 1, c1 - c0 + 1) == (th, tw)


def test_allow_overlap_lets_context_cover_targets():
    settings = settings_for(IJepaConfig(), allow_overlap=True)
    overlap = 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        context_mask, target_mask, _ = sample_masks(settings, 16, generator)
        for b in range(16):
            context = set(context_mask[0][b].tolist())
            overlap += sum(len(context & set(t[b].tolist())) for t in target_mask)
    assert overlap > 0


# --------------------------------------------------------------------------------------------------------------------
# Official quirks and the corrected mode


def test_official_quirks_and_corrected_mode():
    grid = 16
    official = settings_for(IJepaConfig(), mask_sampling="official")
    corrected = settings_for(IJepaConfig(), mask_sampling="corrected")
    # Quirk 2: a block never spans the full grid in official mode.
    assert sample_block_size(official, 1.0, (1.0, 1.0), (1.0, 1.0)) == (15, 15)
    assert sample_block_size(corrected, 1.0, (1.0, 1.0), (1.0, 1.0)) == (16, 16)

    def touches_last(settings):
        generator = torch.Generator().manual_seed(0)
        last_row = last_col = False
        for _ in range(30):
            _, target_mask, _ = sample_masks(settings, 32, generator)
            for t in target_mask:
                last_row |= bool(((t // grid) == grid - 1).any())
                last_col |= bool(((t % grid) == grid - 1).any())
        return last_row, last_col

    # Quirk 1: exclusive upper bound, the last row/column is never covered by a target block.
    assert touches_last(official) == (False, False)
    assert touches_last(corrected) == (True, True)


def test_official_truncation_keeps_raster_prefix_corrected_keeps_random_subset():
    # Direct check with a hand-made mask through the truncation helper.
    from modeling_ijepa.masking_ijepa import _truncate

    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 3, 5, 7, 9]] = True
    masks[1, [0, 2, 4, 6]] = True
    official = _truncate(masks, 4, settings_for(IJepaConfig(), mask_sampling="official"), torch.Generator().manual_seed(0))
    assert official.tolist() == [[1, 3, 5, 7], [0, 2, 4, 6]]
    counts = torch.zeros(16)
    generator = torch.Generator().manual_seed(0)
    corrected_settings = settings_for(IJepaConfig(), mask_sampling="corrected")
    for _ in range(400):
        chosen = _truncate(masks, 4, corrected_settings, generator)
        assert torch.all(chosen[:, 1:] > chosen[:, :-1])
        assert set(chosen[0].tolist()) <= {1, 3, 5, 7, 9}
        counts[chosen[0]] += 1
    # Each of the five candidates is kept with probability 4/5, including the last one (index 9).
    assert torch.all((counts[[1, 3, 5, 7, 9]] / 400 - 0.8).abs() < 0.08)


# --------------------------------------------------------------------------------------------------------------------
# Block sizes (the distribution against the official loop sampler is tests/test_mask_distribution.py)


def test_block_size_formula_matches_official_arithmetic():
    settings = settings_for(IJepaConfig())
    for uniform in (0.0, 0.25, 0.5, 0.9, 0.999):
        scale = 0.15 + uniform * 0.05
        max_keep = int(256 * scale)
        ratio = 0.75 + uniform * 0.75
        expected = (min(int(round(math.sqrt(max_keep * ratio))), 15), min(int(round(math.sqrt(max_keep / ratio))), 15))
        assert sample_block_size(settings, uniform, (0.15, 0.2), (0.75, 1.5)) == expected


# --------------------------------------------------------------------------------------------------------------------
# Randomness


def test_determinism_for_a_seed_and_state_dict_resume():
    config = ijepa_config_from_preset("tiny-cpu")
    first = IJepaMaskCollator(config, seed=7)
    second = IJepaMaskCollator(config, seed=7)
    for _ in range(3):
        a, b = first(examples(4)), second(examples(4))
        assert all(torch.equal(x, y) for x, y in zip(a["context_mask"] + a["target_mask"], b["context_mask"] + b["target_mask"]))
    other_seed = IJepaMaskCollator(config, seed=8)(examples(4))
    assert not all(torch.equal(x, y) for x, y in zip(a["target_mask"], other_seed["target_mask"]))
    # Resume: a fresh collator with the saved state continues the same stream.
    state = first.state_dict()
    expected = first(examples(4))
    resumed = IJepaMaskCollator(config, seed=0)
    resumed.load_state_dict(state)
    got = resumed(examples(4))
    assert all(torch.equal(x, y) for x, y in zip(expected["target_mask"], got["target_mask"]))


def test_different_masks_across_ranks():
    config = ijepa_config_from_preset("tiny-cpu")
    rank0 = IJepaMaskCollator(config, seed=0, rank=0)(examples(8))
    rank1 = IJepaMaskCollator(config, seed=0, rank=1)(examples(8))
    assert not all(torch.equal(x, y) for x, y in zip(rank0["target_mask"], rank1["target_mask"]))


class _Images(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        return {"pixel_values": torch.zeros(3, 32, 32)}


def test_different_masks_across_dataloader_workers():
    config = ijepa_config_from_preset("tiny-cpu")
    loader = DataLoader(_Images(), batch_size=4, num_workers=2, collate_fn=IJepaMaskCollator(config, seed=0))
    batches = list(loader)
    # Batches 0 and 1 come from different workers, each with its own batch counter at 0.
    first, second = batches[0], batches[1]
    assert not all(torch.equal(x, y) for x, y in zip(first["target_mask"], second["target_mask"]))
    signatures = {tuple(torch.cat([m.flatten() for m in b["target_mask"]]).tolist()) for b in batches}
    assert len(signatures) == len(batches)


# --------------------------------------------------------------------------------------------------------------------
# Small grids never hang


def test_small_grid_raises_instead_of_hanging():
    # 8x8 grid with the paper's min_keep=10: target blocks of 3x3 can never hold more than 10 patches; the official
    # sampler loops forever here.
    config = IJepaConfig(image_size=32, patch_size=4, hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                         intermediate_size=64, pred_num_attention_heads=4, pred_hidden_size=16)
    collator = IJepaMaskCollator(config, seed=0)
    with pytest.raises(ValueError, match="min_keep=10.*(Lower min_keep|raise target_block_scale)"):
        for _ in range(20):
            collator(examples(4))


def test_tiny_preset_grid_samples_fine():
    collator = IJepaMaskCollator(ijepa_config_from_preset("tiny-cpu"), seed=0)
    for _ in range(50):
        batch = collator(examples(8))
        assert batch["context_mask"][0].size(1) > 4


def test_relax_loop_engages_and_terminates():
    # Large targets that cover most of the grid force the official retry-then-relax path.
    config = IJepaConfig(target_block_scale=(0.5, 0.6), context_block_scale=(0.3, 0.35), min_keep=10)
    settings = settings_for(config)
    relaxed = 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        context_mask, target_mask, stats = sample_masks(settings, 16, generator)
        relaxed += stats["relaxed_samples"]
        assert context_mask[0].size(1) > 10
    assert relaxed > 0


def test_relaxed_batches_are_accepted_by_the_model_user_overlap_is_not():
    """The official relax step makes contexts overlap targets; the collator flags those batches so the model accepts
    them, while hand-made overlapping masks are still rejected."""
    from modeling_ijepa import IJepaForPreTraining

    config = ijepa_config_from_preset(
        "tiny-cpu", hidden_size=16, num_hidden_layers=1, intermediate_size=32, pred_hidden_size=8,
        pred_num_hidden_layers=1, num_attention_heads=2, pred_num_attention_heads=2,
        target_block_scale=(0.25, 0.35),
    )
    model = IJepaForPreTraining(config).eval()
    collator = IJepaMaskCollator(config, seed=0)
    flagged = 0
    for _ in range(10):
        batch = collator(examples(16))
        flagged += batch.get("allow_overlap", False)
        assert ("allow_overlap" in batch) == (collator.last_stats["relaxed_samples"] > 0)
        assert torch.isfinite(model(**batch).loss)
    assert flagged > 0
    batch.pop("allow_overlap", None)
    batch["target_mask"] = [batch["context_mask"][0][:, :4]] * config.num_target_blocks
    with pytest.raises(ValueError, match="overlaps the context"):
        model(**batch)
