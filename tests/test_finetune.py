"""scripts/finetune.py end to end on a local image folder (mixed PIL modes), full fine-tuning and --freeze_encoder,
offline metrics, a model card with results, and a result that loads in plain transformers."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from modeling_ijepa import IJepaForImageClassification, IJepaForPreTraining, ijepa_config_from_preset
from official_style_checkpoints import OFFICIAL_IMAGE_SIZE, save_official_style_encoder

# Subprocesses (Trainer / accelerate launch) take tens of seconds of CPU.
pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO_ROOT, "scripts", "finetune.py")
# Six classes so that top-5 accuracy is reported (it is only with more than five).
CLASSES = ["red", "green", "blue", "white", "black", "gray"]
COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250),
          "black": (5, 5, 5), "gray": (128, 128, 128)}
# One image per class in each PIL mode a user folder typically mixes.
MODES = ["RGB", "L", "RGBA", "P"]


def offline_env():
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def write_image_folder(root, per_class_modes, size=20, seed=0):
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for index, mode in enumerate(per_class_modes):
            pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 8, (size, size + index, 3)), 0, 255)
            image = Image.fromarray(pixels.astype(np.uint8), mode="RGB").convert(mode)
            image.save(os.path.join(root, name, f"{index}.png"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    write_image_folder(root / "train", MODES)
    write_image_folder(root / "val", ["RGB", "L"], seed=1)
    config = ijepa_config_from_preset(
        "tiny-cpu", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pred_hidden_size=16, pred_num_hidden_layers=1, pred_num_attention_heads=4,
    )
    torch.manual_seed(0)
    pretraining = IJepaForPreTraining(config)
    # Make the EMA target differ from the context encoder, so that loading the wrong one would show.
    with torch.no_grad():
        for parameter in pretraining.ijepa.parameters():
            parameter.add_(0.01)
    pretraining.save_pretrained(root / "pretrained")
    return root


def run_finetune(workspace, output_name, *extra, model="pretrained", data="", max_steps=3):
    output_dir = workspace / output_name
    command = [
        sys.executable, FINETUNE,
        "--model_name_or_path", str(workspace / model),
        "--train_dir", str(workspace / data / "train"), "--validation_dir", str(workspace / data / "val"),
        "--output_dir", str(output_dir), "--do_train", "--do_eval", "--max_steps", str(max_steps),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--learning_rate", "1e-2",
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--dataloader_num_workers", "0",
        "--seed", "0", "--log_level", "info", *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=offline_env(), cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output_dir, result.stdout + result.stderr


def encoder_weights(state):
    return {name: tensor for name, tensor in state.items() if name.startswith("ijepa.")}


@pytest.fixture(scope="module")
def frozen_run(workspace):
    return run_finetune(workspace, "frozen", "--freeze_encoder")


@pytest.fixture(scope="module")
def full_run(workspace):
    return run_finetune(workspace, "full")


def test_finetune__writes_offline_metrics_and_labels(workspace, full_run):
    output_dir, log = full_run
    results = json.loads((output_dir / "all_results.json").read_text())
    # The reported accuracy is the saved model's on the validation folder, preprocessed by the saved processor.
    accuracy, total = accuracy_with_processor(output_dir, workspace / "val")
    assert total == 12 and results["eval_accuracy"] == accuracy
    # 6 classes > 5: top-5 is reported, and can never be below top-1.
    assert results["top5_accuracy" if "top5_accuracy" in results else "eval_top5_accuracy"] >= results["eval_accuracy"]
    assert "train_loss" in results
    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "ijepa"
    assert config["id2label"] == {str(i): name for i, name in enumerate(sorted(CLASSES))}
    assert config["label2id"] == {name: i for i, name in enumerate(sorted(CLASSES))}
    # The pretraining directory had no image processor: the default one is built from the config and saved.
    assert "no image processor" in log
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32}
    card = (output_dir / "README.md").read_text()
    assert "image-classification" in card


def test_finetune__full_training_changes_the_encoder(workspace, full_run):
    output_dir, _ = full_run
    pretrained = load_file(workspace / "pretrained" / "model.safetensors")
    tuned = load_file(output_dir / "model.safetensors")
    assert not any(name.startswith(("context_encoder.", "predictor.")) for name in tuned)
    changed = [name for name, tensor in encoder_weights(tuned).items() if not torch.equal(tensor, pretrained[name])]
    assert changed, "full fine-tuning left every encoder weight unchanged"


def test_finetune__freeze_encoder_trains_only_the_head(workspace, frozen_run):
    output_dir, log = frozen_run
    pretrained = load_file(workspace / "pretrained" / "model.safetensors")
    tuned = load_file(output_dir / "model.safetensors")
    encoder = encoder_weights(tuned)
    # The EMA target encoder (`ijepa.*` of the pretraining checkpoint) was loaded and is bit-for-bit unchanged.
    assert set(encoder) == {name for name in pretrained if name.startswith("ijepa.")}
    for name, tensor in encoder.items():
        assert torch.equal(tensor, pretrained[name]), name
    assert "Encoder frozen; training only ['classifier.weight', 'classifier.bias']" in log
    results = json.loads((output_dir / "all_results.json").read_text())
    assert "eval_accuracy" in results and "train_loss" in results


def test_finetune__result_loads_in_plain_transformers(frozen_run):
    output_dir, _ = frozen_run
    ours = IJepaForImageClassification.from_pretrained(output_dir).eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = ours(pixel_values).logits
    code = f"""
        import sys, torch, transformers
        sys.modules['modeling_ijepa'] = None
        model = transformers.AutoModelForImageClassification.from_pretrained({str(output_dir)!r}).eval()
        assert type(model) is transformers.IJepaForImageClassification, type(model)
        pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        print(model(pixel_values).logits.tolist())
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=offline_env(), cwd="/", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def accuracy_with_processor(output_dir, val_dir):
    """Top-1 accuracy of the saved classifier on `val_dir`, preprocessed by the saved image processor itself."""
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    correct = total = 0
    for name, label in model.config.label2id.items():
        for path in sorted((val_dir / name).iterdir()):
            pixel_values = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            correct += int(model(pixel_values).logits.argmax(-1).item() == label)
            total += 1
    return correct / total, total


@pytest.fixture(scope="module")
def official_run(workspace):
    # A converted official-style encoder: its processor resizes the short side to 256 and center-crops 224.
    save_official_style_encoder(workspace / "official_encoder")
    rng = np.random.default_rng(2)
    for split, count in (("train", 2), ("val", 2)):
        for name, level in (("dark", 40), ("bright", 215)):
            os.makedirs(workspace / "large" / split / name)
            for index in range(count):
                pixels = np.clip(level + rng.normal(0, 12, (240 + 60 * index, 300, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(workspace / "large" / split / name / f"{index}.png")
    return run_finetune(workspace, "official", "--per_device_train_batch_size", "2", model="official_encoder",
                        data="large", max_steps=1)


def test_finetune__converted_official_checkpoint_trains_and_evaluates_at_its_crop(workspace, official_run):
    # Before: the transforms cropped to shortest_edge (256) and the 224 px model refused every batch.
    output_dir, _ = official_run
    processor = json.loads((output_dir / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 256}
    assert processor["crop_size"] == {"height": OFFICIAL_IMAGE_SIZE, "width": OFFICIAL_IMAGE_SIZE}
    results = json.loads((output_dir / "all_results.json").read_text())
    accuracy, total = accuracy_with_processor(output_dir, workspace / "large" / "val")
    assert total == 4 and results["eval_accuracy"] == accuracy
