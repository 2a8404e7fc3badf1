"""scripts/screen_recipe.py: the in-process recipe-screening loop behind docs/evaluation.md's tables."""

import json
import math
import os

import pytest
import torch
from script_loading import load_script

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

screen = load_script("screen_recipe")


def test_learning_rate_warmup_then_cosine_to_zero():
    peak, warmup, total = 1e-3, 10, 110
    assert screen.learning_rate_at(0, peak, warmup, total) == pytest.approx(peak / warmup)
    assert screen.learning_rate_at(warmup - 1, peak, warmup, total) == pytest.approx(peak)
    assert screen.learning_rate_at(warmup, peak, warmup, total) == pytest.approx(peak)
    assert screen.learning_rate_at(warmup + 50, peak, warmup, total) == pytest.approx(peak / 2)
    assert screen.learning_rate_at(total, peak, warmup, total) == pytest.approx(0.0, abs=1e-12)


def test_random_resized_crops_are_seeded_and_zoom_in():
    # A bright square in the centre: crops can only make it cover as much or more of the image.
    pixels = torch.zeros(8, 1, 32, 32)
    pixels[:, :, 12:20, 12:20] = 1.0
    first = screen.random_resized_crops(pixels, (0.3, 0.6), torch.Generator().manual_seed(0))
    again = screen.random_resized_crops(pixels, (0.3, 0.6), torch.Generator().manual_seed(0))
    other = screen.random_resized_crops(pixels, (0.3, 0.6), torch.Generator().manual_seed(1))
    assert first.shape == pixels.shape
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1
    # A crop that keeps the square magnifies it (area <= 0.6): some crop must be brighter on average.
    assert (first.mean(dim=(1, 2, 3)) > pixels.mean(dim=(1, 2, 3)) * 1.2).any()


def test_model_input_pads_and_normalises():
    images = torch.zeros(2, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = 255
    pixels = screen.to_model_input(images, 32)
    assert pixels.shape == (2, 1, 32, 32)
    background = -screen.FASHION_MNIST_MEAN / screen.FASHION_MNIST_STD
    assert pixels[0, 0, 0, 0].item() == pytest.approx(background)  # padding is black, normalised like black pixels
    assert pixels[0, 0, 2, 2].item() == pytest.approx((1 - screen.FASHION_MNIST_MEAN) / screen.FASHION_MNIST_STD)
    assert screen.to_model_input(images, 48).shape == (2, 1, 48, 48)


def test_bad_crop_scale_says_what_to_fix():
    with pytest.raises(ValueError, match="--crop_scale takes two numbers"):
        screen.main(["--run_name", "x", "--crop_scale", "0.5", "0.2"])


@pytest.mark.slow
def test_tiny_screening_run_trains_probes_and_appends_results(tmp_path):
    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it).")
    results_file = tmp_path / "runs.jsonl"
    common = ["--probe_train_samples", "400", "--probe_test_samples", "200", "--results_file", str(results_file),
              "--log_every", "1"]
    trained = screen.main(["--run_name", "tiny", "--max_steps", "4", "--batch_size", "16"] + common)
    untrained = screen.main(["--run_name", "untrained", "--max_steps", "0"] + common)

    lines = [json.loads(line) for line in results_file.read_text().splitlines()]
    assert [line["run_name"] for line in lines] == ["tiny", "untrained"]
    assert math.isfinite(trained["final_loss"]) and trained["images_per_second"] > 0
    for key in ("target_last", "target_last4", "target_grid", "context_last", "context_grid"):
        # 10 classes: chance is 10%; even barely trained features of 400 images are far above it.
        assert 30 < trained[key] <= 100, key
    for key in ("random_init_last", "random_init_last4", "random_init_grid", "raw_pixels"):
        assert 30 < untrained[key] <= 100, key
    # From initializer_range 0.05 the first steps lower the loss quickly (0.53 -> 0.36 in 3 steps at batch 64).
    assert trained["final_loss"] < trained["first_loss"]
