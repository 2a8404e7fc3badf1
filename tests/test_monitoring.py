"""The health monitors of pretraining (`modeling_ijepa.training.monitoring`)."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_ijepa import IJepaForPreTraining, IJepaMaskCollator, ijepa_config_from_preset
from modeling_ijepa.evaluation import default_image_processor
from modeling_ijepa.monitors import rankme
from modeling_ijepa.training import monitoring
from modeling_ijepa.training.arguments import DataTrainingArguments


@pytest.fixture(scope="module")
def step_outputs():
    torch.manual_seed(0)
    config = ijepa_config_from_preset("tiny-cpu")
    model = IJepaForPreTraining(config)
    batch = IJepaMaskCollator(config, seed=0)([{"pixel_values": torch.randn(3, 32, 32)} for _ in range(6)])
    with torch.no_grad():
        return model(**batch)


def test_pooled_target_features__average_each_images_target_blocks_and_patches(step_outputs):
    features = monitoring.pooled_target_features(step_outputs)
    targets = step_outputs.target_hidden_states  # (T * C * B, Kt, D), batch fastest
    blocks = len(step_outputs.target_mask) * len(step_outputs.context_mask)
    for image in range(6):
        rows = targets[[block * 6 + image for block in range(blocks)]]  # (T * C, Kt, D) of this image
        torch.testing.assert_close(features[image], rows.mean(dim=(0, 1)))
    value, threshold = monitoring.rankme_of_step(step_outputs)
    assert value == pytest.approx(rankme(features, center=True)) and 1.0 < value <= 6.0
    assert threshold == pytest.approx(monitoring.RANKME_WARNING_FRACTION * 6)


def test_collapse_warning__only_below_the_threshold_and_says_what_to_change(caplog):
    with caplog.at_level(logging.WARNING, logger="modeling_ijepa.training.monitoring"):
        monitoring.warn_if_collapsing(5.0, 3.2, step=10)
        assert not caplog.records
        monitoring.warn_if_collapsing(1.1, 3.2, step=20)
    assert "step 20" in caplog.text and "--ema_momentum_start" in caplog.text


def make_labelled_folder(root, per_class: int = 6):
    """Two classes an encoder at random init can already tell apart: dark and bright images."""
    rng = np.random.default_rng(0)
    for label, level in (("dark", 30), ("bright", 220)):
        for split in ("train", "test"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(level + rng.normal(0, 10, (20, 20)), 0, 255).astype("uint8")
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


def test_knn_monitor__loads_labelled_splits_and_separates_easy_classes(tmp_path):
    folder = make_labelled_folder(tmp_path / "images")
    data_args = DataTrainingArguments(dataset_name=str(folder))
    processor = default_image_processor((32, 32))
    images = monitoring.load_labelled_images(data_args, "train", "label", 8, processor)
    assert images.pixel_values.shape == (8, 3, 32, 32) and images.labels.shape == (8,)
    assert set(images.labels.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="--monitor_label_column 'class'"):
        monitoring.load_labelled_images(data_args, "train", "class", 8, processor)

    monitor = monitoring.KnnMonitor(images, monitoring.load_labelled_images(data_args, "test", "label", 12, processor))
    config = ijepa_config_from_preset("tiny-cpu")
    state = torch.random.get_rng_state()
    first = monitor.random_init_accuracy(config, seed=3, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's RNG is untouched
    assert first == monitor.random_init_accuracy(config, seed=3, device="cpu")  # seeded
    assert first == 1.0  # brightness survives any random encoder's mean pooling


def test_rankme_warning_threshold__separates_a_collapsed_encoder_from_a_random_one():
    # The measurement behind RANKME_WARNING_FRACTION, on noise images: a random-init encoder is above the threshold,
    # the same encoder with its patch embedding zeroed (features no longer depend on the image) below it.
    torch.manual_seed(0)
    config = ijepa_config_from_preset("tiny-cpu")
    model = IJepaForPreTraining(config).eval()
    batch = IJepaMaskCollator(config, seed=0)([{"pixel_values": torch.randn(3, 32, 32)} for _ in range(64)])
    with torch.no_grad():
        healthy, threshold = monitoring.rankme_of_step(model(**batch))
        model.ijepa.embeddings.patch_embeddings.projection.weight.zero_()
        collapsed, _ = monitoring.rankme_of_step(model(**batch))
    assert collapsed < threshold < healthy, (collapsed, threshold, healthy)
