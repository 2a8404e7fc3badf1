"""The frozen linear probe: the classifier fit and its regularisation sweep, pooled multi-layer features, and
scripts/linear_probe.py on small local datasets (map-style and streaming) whose classes are separable."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from modeling_ijepa import IJepaModel, ijepa_config_from_preset
from modeling_ijepa.convert_official import eval_image_processor
from modeling_ijepa.evaluation import (
    ProbeSettings,
    Standardizer,
    default_image_processor,
    extract_features,
    image_transform_from_processor,
    linear_probe,
    pooled_features,
    processor_output_size,
)
from official_style_checkpoints import OFFICIAL_IMAGE_SIZE, save_official_style_encoder
from modeling_ijepa.probe_run import ProbeArguments, run_probe
from modeling_ijepa.training.validation import ArgumentError


def probe_cli(argv: list[str]) -> dict:
    """What `scripts/linear_probe.py ARGV` computes, in process (its arguments, then the package's `run_probe`)."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ProbeArguments).parse_args_into_dataclasses(args=argv)
    return run_probe(args)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def tiny_encoder(num_channels=3):
    config = ijepa_config_from_preset(
        "tiny-cpu", hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        pred_hidden_size=16, pred_num_hidden_layers=1, pred_num_attention_heads=4, num_channels=num_channels,
    )
    torch.manual_seed(0)
    return IJepaModel(config).eval()


def blobs(num_per_class, num_classes=4, dim=16, spread=0.3, seed=0):
    # Same class centers for every seed; the seed only changes the samples.
    centers = 3 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


@pytest.mark.parametrize("method", ["lbfgs", "sgd"])
def test_linear_probe__separable_blobs_reach_100_percent(method):
    train_x, train_y = blobs(50)
    test_x, test_y = blobs(20, seed=1)
    settings = ProbeSettings(method=method, weight_decays=(1e-4, 1e-2), sgd_epochs=20)
    result = linear_probe(train_x, train_y, test_x, test_y, settings=settings)
    assert result.test_accuracy == 1.0
    assert result.num_classes == 4 and result.num_train == 200 and result.num_test == 80 and result.feature_dim == 16
    assert set(result.validation_accuracy) == {"0.0001", "0.01"}


def test_linear_probe__sweep_picks_the_decay_best_on_held_out_train():
    # Few, noisy, high-dimensional examples: a strong decay generalises better than none, and the sweep sees it.
    train_x, train_y = blobs(10, num_classes=2, dim=200, spread=6.0)
    test_x, test_y = blobs(200, num_classes=2, dim=200, spread=6.0, seed=1)
    result = linear_probe(train_x, train_y, test_x, test_y, settings=ProbeSettings(weight_decays=(0.0, 10.0)))
    accuracies = result.validation_accuracy
    assert result.best_weight_decay == max((0.0, 10.0), key=lambda wd: (accuracies[str(wd)], wd))


def test_standardizer__zero_mean_unit_std_and_constant_features_stay_finite():
    features = torch.cat([torch.randn(100, 3) * 5 + 2, torch.ones(100, 1)], dim=1)
    scaled = Standardizer.fit(features)(features)
    torch.testing.assert_close(scaled[:, :3].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled[:, :3].std(0), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.equal(scaled[:, 3], torch.zeros(100))


def test_pooled_features__concatenates_last_layers_deepest_first():
    encoder = tiny_encoder()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = encoder(pixel_values, output_hidden_states=True)
    features = pooled_features(encoder, pixel_values, num_layers=3)
    assert features.shape == (2, 3 * 32)
    torch.testing.assert_close(features[:, :32], outputs.pooler_output)
    torch.testing.assert_close(features[:, 32:64], outputs.hidden_states[2].mean(1))  # layer 2 of 3
    torch.testing.assert_close(features[:, 64:], outputs.hidden_states[1].mean(1))  # layer 1 of 3
    torch.testing.assert_close(pooled_features(encoder, pixel_values), outputs.pooler_output)
    with pytest.raises(ValueError, match="at most 3"):
        pooled_features(encoder, pixel_values, num_layers=4)


def test_extract_features__batched_equals_one_batch():
    encoder = tiny_encoder()
    pixel_values = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10)
    batched, batched_labels = extract_features(encoder, [(pixel_values[:4], labels[:4]), (pixel_values[4:], labels[4:])])
    whole, _ = extract_features(encoder, [{"pixel_values": pixel_values}])
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched_labels, labels)


# Three classes of 24x24 images a frozen random encoder separates: dark, mid-gray and bright, with noise, saved in
# mixed PIL modes (RGB, L).
LEVELS = {"dark": 30, "mid": 128, "bright": 225}


@pytest.fixture(scope="module")
def separable_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("separable")
    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("test", 10)):
        for name, level in LEVELS.items():
            os.makedirs(root / split / name)
            for index in range(count):
                pixels = np.clip(level + rng.normal(0, 12, (24, 24, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels, mode="RGB")
                (image if index % 2 else image.convert("L")).save(root / split / name / f"{index}.png")
    encoder_dir = root / "encoder"
    tiny_encoder().save_pretrained(encoder_dir)
    return root


@pytest.mark.parametrize("streaming", [False, True])
def test_linear_probe_script__separable_dataset_reaches_100_percent(separable_dataset, tmp_path, streaming):
    output_file = tmp_path / "probe.json"
    argv = [
        "--model_name_or_path", str(separable_dataset / "encoder"), "--dataset_name", str(separable_dataset),
        "--batch_size", "16", "--num_layers", "2", "--output_file", str(output_file),
        "--weight_decays", "1e-4", "1e-2",
    ] + (["--streaming"] if streaming else [])
    result = probe_cli(argv)
    assert result["test_accuracy"] == 1.0
    assert result["num_train"] == 60 and result["num_test"] == 30 and result["num_classes"] == 3
    assert result["feature_dim"] == 2 * 32
    assert json.loads(output_file.read_text())["test_accuracy"] == 1.0


def test_linear_probe_script__raw_pixels_baseline(separable_dataset):
    result = probe_cli([
        "--raw_pixels", "--image_size", "8", "--dataset_name", str(separable_dataset), "--max_train_samples", "45",
        "--max_test_samples", "30",
    ])
    assert result["model"] == "raw_pixels" and result["feature_dim"] == 8 * 8
    assert result["num_train"] == 45 and result["test_accuracy"] == 1.0


def test_linear_probe_script__needs_exactly_one_source(separable_dataset):
    with pytest.raises(ArgumentError, match="give exactly one"):
        probe_cli(["--dataset_name", str(separable_dataset)])
    # The command line says it in one line, without a traceback, and exits 2 (tests/test_eval_arguments.py: the rest).
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "scripts", "linear_probe.py"), "--dataset_name", str(separable_dataset)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["linear_probe.py: error: --model_name_or_path/--raw_pixels: give exactly one "
                                          "(an encoder to probe, or --raw_pixels for the pixel baseline)"]


@pytest.mark.parametrize("probe", ["batchnorm", "knn", "attentive"])
def test_probe_run__every_probe_separates_the_separable_dataset(separable_dataset, probe):
    result = probe_cli([
        "--model_name_or_path", str(separable_dataset / "encoder"), "--dataset_name", str(separable_dataset),
        "--batch_size", "16", "--probe", probe, "--attentive_epochs", "200", "--weight_decays", "1e-4",
    ])
    assert result["probe"] == probe and result["num_train"] == 60 and result["num_test"] == 30
    assert result["test_accuracy"] == 1.0


def test_probe_run__attentive_probe_of_raw_pixels_is_refused(separable_dataset):
    args = ProbeArguments(dataset_name=str(separable_dataset), raw_pixels=True, image_size=8, probe="attentive")
    with pytest.raises(ArgumentError, match="--probe attentive: needs an encoder's patch tokens"):
        run_probe(args)


# --------------------------------------------------------------------------------------------------------------------
# The checkpoint's image processor, all of it: converted official checkpoints resize to 256 and crop 224.

# One uint8 level after normalisation by the smallest ImageNet std: transformers resizes a tensor, torchvision a PIL
# image, and the two round differently by at most one level.
ONE_LEVEL = 1.0 / 255 / 0.224 + 1e-6


def test_image_transform_from_processor__eval_matches_the_processor_output():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    official = eval_image_processor(ijepa_config_from_preset("tiny-cpu", image_size=224, patch_size=16))
    for processor, size in ((official, (224, 224)), (default_image_processor(32), (32, 32))):
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        pixels = image_transform_from_processor(processor, train=False)(image)
        assert processor_output_size(processor) == size and pixels.shape == (3, *size) == expected.shape
        torch.testing.assert_close(pixels, expected, atol=ONE_LEVEL, rtol=0)
        # Training crops land on the same size, from a grayscale image too.
        assert image_transform_from_processor(processor, train=True)(image.convert("L")).shape == (3, *size)


def test_image_transform_from_processor__reads_resample_and_rescale():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    processor = eval_image_processor(ijepa_config_from_preset("tiny-cpu", image_size=224, patch_size=16))
    bicubic = image_transform_from_processor(processor, train=False)(image)
    processor.resample = 0  # nearest
    nearest = image_transform_from_processor(processor, train=False)(image)
    assert (nearest - bicubic).abs().max() > 10 * ONE_LEVEL
    processor.do_rescale, processor.do_normalize = False, False
    raw = image_transform_from_processor(processor, train=False)(image)
    assert raw.dtype == torch.float32 and float(raw.max()) == 255.0 and torch.equal(raw, raw.round())


def write_brightness_folder(root, sizes):
    # Two classes, dark and bright, in images larger and smaller than the processor's 256 short side.
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        for name, level in (("dark", 40), ("bright", 215)):
            os.makedirs(root / split / name)
            for index in range(count):
                height, width = sizes[index % len(sizes)]
                pixels = np.clip(level + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="RGB").save(root / split / name / f"{index}.png")
    return root


def test_linear_probe_script__converted_official_checkpoint_uses_its_crop(tmp_path):
    # Before: the script cropped to the processor's shortest_edge (256) and the 224 px model refused the images.
    encoder = save_official_style_encoder(tmp_path / "encoder")
    processor = AutoImageProcessor.from_pretrained(encoder)
    assert processor_output_size(processor) == (OFFICIAL_IMAGE_SIZE, OFFICIAL_IMAGE_SIZE)
    dataset = write_brightness_folder(tmp_path / "data", sizes=[(240, 300), (300, 260)])
    output = probe_cli([
        "--model_name_or_path", str(encoder), "--dataset_name", str(dataset), "--batch_size", "8",
        "--weight_decays", "1e-2",
    ])
    assert output["num_train"] == 12 and output["num_test"] == 8 and output["feature_dim"] == 32
    assert output["test_accuracy"] == 1.0


def test_run_probes__one_extraction_gives_each_probes_own_result(separable_dataset):
    from modeling_ijepa.probe_run import run_probes

    common = {"model_name_or_path": str(separable_dataset / "encoder"), "dataset_name": str(separable_dataset),
              "batch_size": 16, "weight_decays": [1e-4, 1e-2], "max_train_samples": 40}
    together = run_probes(ProbeArguments(**common), ("linear", "knn", "batchnorm"))
    for probe in ("linear", "knn", "batchnorm"):
        alone = run_probe(ProbeArguments(**common, probe=probe))
        assert together[probe]["test_accuracy"] == alone["test_accuracy"], probe
        assert together[probe]["feature_dim"] == alone["feature_dim"], probe
    assert together["batchnorm"]["feature_dim"] == 3 * together["linear"]["feature_dim"]  # all 3 layers of the tiny encoder
