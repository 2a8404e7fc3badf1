"""Tests of the pretraining engine (`modeling_ijepa.training`) and its command line `scripts/pretrain.py`.

Fast checks run in-process; the end-to-end checks launch real 2-process CPU DDP runs
(`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`), each about a minute on 2 shared cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets/huggingface_hub are imported: no network in tests

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_ijepa.training import (  # noqa: E402
    arguments, building, checkpoints, fashion_mnist, loop, publish,
)
from modeling_ijepa.training import data as training_data  # noqa: E402  (tests name their image folders `data`)

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

ACCELERATE = Path(sys.executable).parent / "accelerate"
FASHION_MNIST_PRESENT = (Path(fashion_mnist.DEFAULT_SOURCE_DIR) / "t10k-images-idx3-ubyte.gz").exists()


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def make_mixed_image_folder(root: Path, count: int = 12, corrupt: bool = True) -> Path:
    """Images in modes L, RGBA, CMYK, P, RGB, LA (various sizes) plus one undecodable file."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    modes = ["L", "RGBA", "CMYK", "P", "RGB", "LA"]
    for i in range(count):
        mode = modes[i % len(modes)]
        ext = "jpg" if mode in ("CMYK", "RGB") else "png"
        array = (rng.random((36 + i, 44 + 2 * i, 3)) * 255).astype("uint8")
        Image.fromarray(array).convert(mode).save(root / f"img{i:02d}.{ext}")
    if corrupt:
        (root / "broken.jpg").write_bytes(b"this is not a JPEG file")
    return root


def official_schedule_replay(steps, *, warmup, start_lr, ref_lr, final_lr, t_max, ref_wd, final_wd, ema, momentum_total):
    """Independent re-implementation of the official stateful schedulers' *call pattern*: a counter incremented
    before each optimizer step (WarmupCosineSchedule/CosineWDSchedule.step()), and the momentum generator
    `ema0 + i * (ema1 - ema0) / total` consumed once per step."""
    out = []
    counter = 0
    for i in range(steps):
        counter += 1
        if counter < warmup:
            lr = start_lr + counter / max(1, warmup) * (ref_lr - start_lr)
        else:
            progress = (counter - warmup) / max(1, t_max - warmup)
            lr = max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress)))
        wd = final_wd + (ref_wd - final_wd) * 0.5 * (1 + math.cos(math.pi * counter / t_max))
        wd = max(final_wd, wd) if final_wd <= ref_wd else min(final_wd, wd)
        m = ema[0] + i * (ema[1] - ema[0]) / momentum_total
        out.append({"lr": lr, "weight_decay": wd, "momentum": m})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    args: list[str], num_processes: int = 2, timeout: int = 300, use_cpu: bool = True, check: bool = True
) -> subprocess.CompletedProcess:
    """Real multi-process CPU DDP: ACCELERATE_USE_CPU=1 + --multi_gpu (plain --cpu would start one process)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(SCRIPTS / "pretrain.py"), *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0 or not check, f"launch failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def read_log(output_dir: Path) -> dict[int, dict]:
    """train_log.jsonl keyed by step (a resumed run appends; the last record of a step wins)."""
    records = {}
    for line in (output_dir / loop.TRAIN_LOG_NAME).read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def e2e_args(data_dir: Path, output_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        "--dataset_name", str(data_dir), "--streaming", "true", "--config_name", "tiny-cpu",
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "2", "--max_steps", str(max_steps),
        "--num_train_epochs", "2", "--warmup_epochs", "1",  # warmup = half the run: both schedule phases are hit
        "--learning_rate", "0.001", "--logging_steps", "1", "--shuffle_buffer_size", "8",
        "--log_batch_fingerprints", "true", "--report_to", "tensorboard", *extra,
    ]


# ---------------------------------------------------------------------------------------------------------------------
# schedules


def test_schedules__match_official_formulas_at_chosen_steps():
    # Official ViT-H/14 IN-1k: ipe = 1281167 // 2048 = 625, warmup int(40 * 625) = 25000,
    # T_max = int(1.0 * 300 * 625) = 187500.
    args = arguments.PretrainingArguments(per_device_train_batch_size=128, num_train_epochs=300)
    s = arguments.resolve_schedules(args, 1_281_167, 2048)
    assert (s.train_steps, s.warmup_steps, s.schedule_steps, s.momentum_steps) == (187_500, 25_000, 187_500, 187_500.0)
    assert (s.peak_lr, s.start_lr, s.final_lr) == (1e-3, 2e-4, 1e-6)
    # step 0 runs with counter 1: one warmup increment above start_lr
    assert s.at(0)["lr"] == pytest.approx(2e-4 + 8e-4 / 25_000, rel=1e-12)
    assert s.at(24_998)["lr"] == pytest.approx(2e-4 + 24_999 / 25_000 * 8e-4, rel=1e-12)
    assert s.at(24_999)["lr"] == pytest.approx(1e-3, rel=1e-12)  # counter == warmup: cosine at progress 0
    assert s.at(106_249)["lr"] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5, rel=1e-12)  # progress 1/2
    assert s.at(187_499)["lr"] == pytest.approx(1e-6, rel=1e-9)  # last step: final_lr
    assert s.at(0)["weight_decay"] == pytest.approx(0.4 - 0.36 * 0.5 * (1 + math.cos(math.pi / 187_500)), rel=1e-12)
    assert s.at(93_749)["weight_decay"] == pytest.approx(0.22, rel=1e-12)
    assert s.at(187_499)["weight_decay"] == pytest.approx(0.4, rel=1e-12)
    assert s.at(0)["momentum"] == 0.996
    assert s.at(93_750)["momentum"] == pytest.approx(0.998, rel=1e-12)
    assert s.at(187_499)["momentum"] == pytest.approx(0.996 + 187_499 * 0.004 / 187_500, rel=1e-12)


@pytest.mark.parametrize("ipe_scale", [1.0, 1.25])
def test_schedules__equal_official_stateful_replay_at_every_step(ipe_scale):
    args = arguments.PretrainingArguments(
        per_device_train_batch_size=8, num_train_epochs=10, warmup_epochs=2, ipe_scale=ipe_scale
    )
    samples = 8 * 13 + 5  # ipe = 13 (drop_last)
    s = arguments.resolve_schedules(args, samples, 8)
    ipe = samples // 8
    expected = official_schedule_replay(
        s.train_steps, warmup=int(2 * ipe), start_lr=s.start_lr, ref_lr=s.peak_lr, final_lr=s.final_lr,
        t_max=int(ipe_scale * 10 * ipe), ref_wd=0.04, final_wd=0.4, ema=(0.996, 1.0), momentum_total=ipe * 10 * ipe_scale,
    )
    assert s.train_steps == 10 * ipe
    for step, values in enumerate(expected):
        got = s.at(step)
        for key in values:
            assert got[key] == pytest.approx(values[key], rel=1e-12, abs=1e-15), (step, key)


def test_learning_rate__linear_scaling_rule_is_applied_and_stated():
    args = arguments.PretrainingArguments()
    peak, start, final, rule = arguments.resolve_learning_rates(args, 256)
    assert (peak, start, final) == pytest.approx((1e-3 / 8, 2e-4 / 8, 1e-6 / 8))
    assert "256" in rule and "2048" in rule
    explicit = arguments.PretrainingArguments(learning_rate=5e-3)
    assert arguments.resolve_learning_rates(explicit, 64)[:3] == pytest.approx((5e-3, 1e-3, 5e-6))


def test_resolve_schedules__says_what_to_pass_when_length_unknown():
    with pytest.raises(ValueError, match="--max_steps.*--num_train_samples"):
        arguments.resolve_schedules(arguments.PretrainingArguments(), None, 2048, "some/streamed-dataset")
    # --max_steps without a dataset size: the steps are shaped as --num_train_epochs epochs (warmup keeps its share).
    s = arguments.resolve_schedules(arguments.PretrainingArguments(max_steps=3000, num_train_epochs=300), None, 64)
    assert (s.train_steps, s.steps_per_epoch, s.warmup_steps, s.schedule_steps) == (3000, 10.0, 400, 3000)


def test_samples_per_epoch__from_length_metadata_or_known_imagenet_size():
    import datasets

    table = datasets.Dataset.from_dict({"x": list(range(10))})
    args = arguments.DataTrainingArguments(dataset_name="ILSVRC/imagenet-1k")
    assert training_data.count_train_samples(table, args) == 10  # downloaded: its length
    streamed = table.to_iterable_dataset()  # no split metadata: the known ImageNet-1k train size
    assert training_data.count_train_samples(streamed, args) == 1_281_167
    assert training_data.count_train_samples(streamed, arguments.DataTrainingArguments(dataset_name="me/unknown")) is None
    other_split = arguments.DataTrainingArguments(dataset_name="ILSVRC/imagenet-1k", train_split="validation")
    assert training_data.count_train_samples(streamed, other_split) is None


# ---------------------------------------------------------------------------------------------------------------------
# arguments, config, optimizer


def test_arguments__yaml_file_then_cli_overrides():
    config = SCRIPTS / "configs" / "tiny_fashion_mnist.yaml"
    model_args, data_args, args = arguments.parse_arguments([str(config), "--max_steps", "7", "--crop_scale", "0.5", "1.0"])
    assert model_args.config_name == "tiny-cpu"
    assert data_args.dataset_name == "zalando-datasets/fashion_mnist" and data_args.streaming is True
    assert args.max_steps == 7 and args.crop_scale == [0.5, 1.0]


@pytest.mark.parametrize("name", sorted(p.name for p in (SCRIPTS / "configs").glob("*.yaml")))
def test_argument_files__parse_and_build_their_config(name):
    model_args, data_args, args = arguments.parse_arguments([str(SCRIPTS / "configs" / name)])
    config = building.build_config(model_args)
    assert config.num_patches > 0
    if name.startswith("in1k_vith14"):
        assert (config.hidden_size, config.num_hidden_layers, config.patch_size) == (1280, 32, 14)
        assert args.per_device_train_batch_size * 16 == 2048 and args.num_train_epochs == 300
        samples = training_data.KNOWN_TRAIN_SIZES[data_args.dataset_name.lower()]
        s = arguments.resolve_schedules(args, samples, 2048)
        assert (s.warmup_steps, s.schedule_steps, s.peak_lr) == (25_000, 187_500, 1e-3)


def test_config_overrides__parse_literals_and_tuples():
    parsed = arguments.parse_config_overrides("min_keep=3,target_block_scale=(0.1, 0.2),hidden_act=gelu,qkv_bias=False")
    assert parsed == {"min_keep": 3, "target_block_scale": (0.1, 0.2), "hidden_act": "gelu", "qkv_bias": False}
    config = building.build_config(arguments.ModelArguments(config_name="tiny-cpu", config_overrides="min_keep=3"))
    assert config.min_keep == 3
    with pytest.raises(ValueError, match="neither a preset"):
        building.build_config(arguments.ModelArguments(config_name="vit-enormous"))


def test_optimizer_groups__no_decay_on_biases_and_1d_params_mask_token_decayed():
    from modeling_ijepa import IJepaForPreTraining, ijepa_config_from_preset

    model = IJepaForPreTraining(ijepa_config_from_preset("tiny-cpu"))
    decay, no_decay = building.optimizer_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = [names[id(p)] for p in decay["params"]]
    no_decay_names = [names[id(p)] for p in no_decay["params"]]
    assert all(n.endswith("bias") or model.get_parameter(n).ndim == 1 for n in no_decay_names)
    assert all(model.get_parameter(n).ndim >= 2 and not n.endswith("bias") for n in decay_names)
    assert any("mask_token" in n for n in decay_names)  # 3-D, decayed as in the official grouping
    assert not any(n.startswith("ijepa.") for n in decay_names + no_decay_names)  # target encoder not optimised
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.trainable_parameters())


def test_model_name_or_path__pretraining_and_encoder_only_checkpoints(tmp_path):
    from modeling_ijepa import IJepaForPreTraining, IJepaModel, ijepa_config_from_preset

    config = ijepa_config_from_preset("tiny-cpu")
    torch.manual_seed(1)
    source = IJepaForPreTraining(config)
    source.save_pretrained(tmp_path / "full")
    model_args = arguments.ModelArguments(config_name="tiny-cpu", model_name_or_path=str(tmp_path / "full"))
    loaded = building.build_model(model_args, building.build_config(model_args))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name

    encoder = IJepaModel(config)  # e.g. a released target encoder: the context encoder starts as its copy
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.5)
    encoder.save_pretrained(tmp_path / "encoder")
    model_args = arguments.ModelArguments(config_name="tiny-cpu", model_name_or_path=str(tmp_path / "encoder"))
    loaded = building.build_model(model_args, building.build_config(model_args))
    for (name, a), b, c in zip(
        encoder.state_dict().items(), loaded.ijepa.state_dict().values(), loaded.context_encoder.state_dict().values()
    ):
        assert torch.equal(a, b) and torch.equal(a, c), name


# ---------------------------------------------------------------------------------------------------------------------
# data


def test_to_rgb__every_mode_becomes_rgb():
    for mode in ["L", "LA", "P", "PA", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"]:
        image = Image.new(mode, (5, 4))
        assert training_data.to_rgb(image).mode == "RGB", mode


def test_stream__skips_and_counts_corrupt_images_and_resumes_exactly(tmp_path):
    import datasets

    folder = make_mixed_image_folder(tmp_path / "images", count=12)
    dataset = datasets.load_dataset(str(folder), split="train", streaming=True)
    dataset = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    settings = training_data.AugmentationSettings(crop_size=(16, 16))

    def stream(buffer_size, state=None):
        shard = training_data.shard_for_process(dataset, 0, 1, seed=3, buffer_size=buffer_size)
        return training_data.ImageBatchStream(shard, "image", 5, settings, seed=3, rank=0, state=state)

    # Buffer 1 keeps file order: broken.jpg is record 0 of every epoch.
    ordered = stream(buffer_size=1)
    batches = iter(ordered)
    first = [next(batches)["pixel_values"] for _ in range(5)]  # 13 records -> 2 batches of 5 per epoch; 5 = 3 epochs
    assert all(b.shape == (5, 3, 16, 16) and b.dtype == torch.uint8 for b in first)
    assert ordered.state.corrupt_images == 3  # broken.jpg once per epoch, skipped, never raised
    # A corrupt record's slot is refilled from its own batch, so batches are whole records: 5 consumed in epoch 2.
    assert (ordered.state.epoch, ordered.state.readers[0]["position"], ordered.state.batches) == (2, 5, 5)
    batches.close()

    # Shuffled stream, resumed from a saved position: the next batches equal the uninterrupted ones.
    reference = stream(buffer_size=4)
    batches = iter(reference)
    for _ in range(3):
        next(batches)
    saved = training_data.DataState(**vars(reference.state))
    following = [next(batches)["pixel_values"] for _ in range(4)]
    resumed = iter(stream(4, training_data.DataState(**vars(saved))))
    for expected in following:
        assert torch.equal(next(resumed)["pixel_values"], expected)


@pytest.mark.slow  # starts 2 spawned worker processes (~30 s on 2 shared cores)
def test_stream__worker_processes_give_the_same_batches(tmp_path):
    import datasets

    folder = make_mixed_image_folder(tmp_path / "images", count=6, corrupt=True)
    # A local image folder is read map-style (the official sampler): its batches do not depend on the worker count.
    dataset = training_data.local_image_files(arguments.DataTrainingArguments(dataset_name=str(folder)))
    assert isinstance(dataset, datasets.Dataset)
    settings = training_data.AugmentationSettings(crop_size=(8, 8), horizontal_flip=True)
    outputs = []
    for workers in (0, 2):
        stream = training_data.ImageBatchStream(
            training_data.shard_for_process(dataset, 0, 1, 0, 4), "image", 3, settings, 0, 0, num_workers=workers
        )
        it = iter(stream)
        outputs.append([next(it)["pixel_values"] for _ in range(3)])
        it.close()
        stream.close()
        assert stream.state.corrupt_images >= 1
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_image_column__auto_detected_or_clear_error():
    import datasets

    features = datasets.Features({"label": datasets.Value("int64"), "picture": datasets.Image()})
    assert training_data.detect_image_column(features, None) == "picture"
    with pytest.raises(ValueError, match="--image_column_name"):
        training_data.detect_image_column(datasets.Features({"text": datasets.Value("string")}), None)


def test_gated_dataset__gives_access_instructions(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def gated(*args, **kwargs):  # what datasets raises for a gated repo without accepted terms / token
        raise DatasetNotFoundError(
            "Dataset 'ILSVRC/imagenet-1k' is a gated dataset on the Hub. You must be authenticated to access it."
        )

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(training_data.DatasetAccessError) as info:
        training_data.load_train_dataset(arguments.DataTrainingArguments())
    message = str(info.value)
    assert "https://huggingface.co/datasets/ILSVRC/imagenet-1k" in message
    assert "accept its terms" in message and "hf auth login" in message and "HF_TOKEN" in message
    assert "gated dataset" in message  # the original reason is kept


def test_gated_repo_error__from_the_hub_client_gives_access_instructions(monkeypatch):
    import datasets
    import huggingface_hub.errors
    from huggingface_hub.errors import GatedRepoError

    # The HTTP client whose Response huggingface_hub's errors carry (its name changed across versions).
    http = sys.modules[huggingface_hub.errors.Response.__module__.split(".")[0]]

    def gated(*args, **kwargs):
        request = http.Request("GET", "https://huggingface.co/api/datasets/ILSVRC/imagenet-1k")
        response = http.Response(403, request=request)
        raise GatedRepoError("Access to dataset ILSVRC/imagenet-1k is restricted.", response=response)

    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(training_data.DatasetAccessError, match="accept its terms"):
        training_data.load_train_dataset(arguments.DataTrainingArguments())


def test_missing_or_unreachable_dataset__real_offline_call_gives_instructions():
    # HF_HUB_OFFLINE=1 (set at the top): datasets raises ConnectionError before any network access.
    with pytest.raises(training_data.DatasetAccessError, match="accept its terms"):
        training_data.load_train_dataset(arguments.DataTrainingArguments(dataset_name="ILSVRC/imagenet-1k"))
    with pytest.raises(training_data.DatasetAccessError, match="does not exist"):
        training_data.load_train_dataset(arguments.DataTrainingArguments(dataset_name="/no/such/folder/anywhere"))


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints, hub, launch checks


def test_checkpoints__temporary_folders_never_count_as_complete(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()  # no trainer_state.json: interrupted copy
    (tmp_path / ".tmp-checkpoint-9").mkdir()
    (tmp_path / ".tmp-checkpoint-9" / checkpoints.TRAINER_STATE_NAME).write_text("{}")
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / checkpoints.TRAINER_STATE_NAME).write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / checkpoints.TRAINER_STATE_NAME).write_text("{}")
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-12"]
    assert checkpoints.resolve_resume_path("latest", str(tmp_path)).name == "checkpoint-12"
    assert checkpoints.resolve_resume_path("latest", str(tmp_path / "empty")) is None  # starts from scratch
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoints.resolve_resume_path(str(tmp_path / "checkpoint-5"), str(tmp_path))


def test_push_to_hub__offline_gives_clear_error(tmp_path, monkeypatch):
    from modeling_ijepa.hub import HubUploadError

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    args = arguments.PretrainingArguments(output_dir=str(tmp_path), hub_model_id="me/ijepa-test")
    with pytest.raises(HubUploadError, match="(?s)offline mode.*push_to_hub.py"):
        publish.push_run_to_hub(tmp_path, args)
    assert (tmp_path / "config.json").read_text() == "{}"  # nothing local is lost


def test_push_to_hub__uploads_model_files_but_not_checkpoints(tmp_path, monkeypatch):
    import modeling_ijepa.hub as hub

    for name in ("config.json", "model.safetensors", "README.md", "checkpoint-3/optimizer.bin", ".tmp-checkpoint-4/x"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    sent = {}

    class FakeApi:
        def __init__(self, endpoint=None, token=None):
            self.endpoint = endpoint

        def create_repo(self, repo_id, **kwargs):
            sent["private"] = kwargs["private"]
            return f"https://hf.co/{repo_id}"

        def create_commit(self, repo_id, operations, **kwargs):
            sent["files"] = sorted(op.path_in_repo for op in operations)

            class Info:
                commit_url = f"https://hf.co/{repo_id}/commit/1"

            return Info()

    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)  # what modeling_ijepa.hub reads
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    args = arguments.PretrainingArguments(output_dir=str(tmp_path), hub_model_id="me/ijepa-test", hub_token="hf_x",
                                         hub_private_repo=True)
    assert publish.push_run_to_hub(tmp_path, args) == "https://hf.co/me/ijepa-test/commit/1"
    assert sent == {"private": True, "files": ["README.md", "config.json", "model.safetensors"]}


def test_world_size_check__refuses_independent_processes(monkeypatch):
    class FakeAccelerator:
        num_processes, process_index, device, distributed_type = 1, 0, "cpu", "NO"

    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started 2 processes that did not form a group
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=1"):
        loop.check_world_size(FakeAccelerator())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert loop.check_world_size(FakeAccelerator()) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST export


@pytest.mark.skipif(not FASHION_MNIST_PRESENT, reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist__export_loads_with_datasets_and_is_idempotent(tmp_path):
    import datasets

    root = fashion_mnist.export_fashion_mnist(tmp_path / "fm", split="test", max_samples=50, num_shards=2)
    shards = sorted((tmp_path / "fm" / "data").glob("test-*.parquet"))
    assert [p.name for p in shards] == ["test-00000-of-00002.parquet", "test-00001-of-00002.parquet"]
    mtimes = [p.stat().st_mtime_ns for p in shards]
    assert fashion_mnist.export_fashion_mnist(tmp_path / "fm", split="test", max_samples=50, num_shards=2) == root
    assert [p.stat().st_mtime_ns for p in shards] == mtimes  # second call skipped

    dataset = datasets.load_dataset(root, split="test")
    assert len(dataset) == 50
    assert dataset.features["label"].names == fashion_mnist.CLASS_NAMES
    assert isinstance(dataset.features["image"], datasets.Image)
    raw = fashion_mnist.read_idx_images(Path(fashion_mnist.DEFAULT_SOURCE_DIR) / "t10k-images-idx3-ubyte.gz")
    labels = fashion_mnist.read_idx_labels(Path(fashion_mnist.DEFAULT_SOURCE_DIR) / "t10k-labels-idx1-ubyte.gz")
    first = dataset[0]
    assert first["image"].size == (28, 28) and np.array_equal(np.asarray(first["image"]), raw[0])
    assert first["label"] == labels[0]
    streamed = next(iter(datasets.load_dataset(root, split="test", streaming=True)))
    assert np.array_equal(np.asarray(streamed["image"]), raw[0])

    # A different request replaces the shards (no stale files).
    fashion_mnist.export_fashion_mnist(tmp_path / "fm", split="test", max_samples=20, num_shards=1)
    assert sorted(p.name for p in (tmp_path / "fm" / "data").glob("test-*.parquet")) == ["test-00000-of-00001.parquet"]


# ---------------------------------------------------------------------------------------------------------------------
# end to end: real 2-process CPU launches


@pytest.fixture(scope="module")
def e2e_runs(tmp_path_factory):
    """A 3-step 2-process streaming run, then a second launch with `--resume_from_checkpoint latest` to 6 steps."""
    root = tmp_path_factory.mktemp("pretrain_e2e")
    data = make_mixed_image_folder(root / "images", count=12, corrupt=True)
    split = root / "split"
    runs = {"data": data, "split": split}
    runs["first_log"] = launch(e2e_args(data, split, 3))
    runs["resume_log"] = launch(e2e_args(data, split, 6, "--resume_from_checkpoint", "latest"))
    return runs


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def test_e2e__two_process_streaming_run_writes_loadable_model_and_results(e2e_runs):
    from transformers import AutoImageProcessor, AutoModel

    split = e2e_runs["split"]
    assert "World size 2" in output_of(e2e_runs["first_log"])
    results = json.loads((split / "all_results.json").read_text())
    assert results["global_step"] == 6 and results["world_size"] == 2 and results["global_batch_size"] == 4
    assert math.isfinite(results["train_loss"]) and results["train_samples_per_second"] > 0
    assert [p.name for p in checkpoints.list_checkpoints(split)] == ["checkpoint-3", "checkpoint-6"]
    assert not list(split.glob(".tmp-*"))
    model = AutoModel.from_pretrained(split)
    assert type(model).__name__ == "IJepaModel"
    processor = AutoImageProcessor.from_pretrained(split)
    assert processor.size == {"height": 32, "width": 32}
    hidden = model(pixel_values=torch.zeros(1, 3, 32, 32)).last_hidden_state
    assert hidden.shape == (1, 64, 128)
    assert "AutoModel.from_pretrained" in e2e_runs["resume_log"].stdout  # the closing message says how to load
    assert list((split / "runs").rglob("events.out.tfevents.*"))  # tensorboard by default


def test_e2e__target_encoder_is_bitwise_identical_across_processes(e2e_runs):
    checksums = json.loads((e2e_runs["split"] / "all_results.json").read_text())["target_encoder_sha256"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]


def test_e2e__corrupt_image_is_skipped_and_counted(e2e_runs):
    results = json.loads((e2e_runs["split"] / "all_results.json").read_text())
    # 13 records over 2 processes, 2 per batch: every process finishes an epoch within 6 steps, so the process
    # holding broken.jpg met it at least once (the count is kept across the resume).
    assert results["corrupt_images_skipped"] >= 1
    logs = output_of(e2e_runs["first_log"]) + output_of(e2e_runs["resume_log"])
    assert "Skipping undecodable image" in logs and "broken.jpg" in logs


def test_e2e__resume_latest_to_higher_max_steps_follows_the_uninterrupted_schedules(e2e_runs):
    resumed_output = output_of(e2e_runs["resume_log"])
    assert "Resumed from" in resumed_output and "checkpoint-3" in resumed_output
    log = read_log(e2e_runs["split"])
    assert sorted(log) == [0, 1, 2, 3, 4, 5]
    # The schedules of an uninterrupted 6-step run with the same arguments (pure functions of the step).
    _, _, args = arguments.parse_arguments(e2e_args(e2e_runs["data"], e2e_runs["split"], 6))
    uninterrupted = arguments.resolve_schedules(args, None, global_batch_size=4)
    for step in (3, 4, 5):
        values = uninterrupted.at(step)
        for key in ("lr", "weight_decay", "momentum"):
            assert log[step][key] == values[key], (step, key)


@pytest.mark.slow
def test_e2e__resumed_runs_see_the_batches_of_an_uninterrupted_run_and_end_with_its_weights(e2e_runs, tmp_path):
    """An uninterrupted 6-step launch (checkpoint at 3) against (a) the 3+3 resumed run above: same schedules at
    steps 3-5 and same images/crops/masks at every step; (b) a resume of its own checkpoint-3 (a kill right after
    it): bitwise equal final weights."""
    from safetensors.torch import load_file

    full = tmp_path / "full"
    launch(e2e_args(e2e_runs["data"], full, 6, "--checkpointing_steps", "3"))
    full_log, split_log = read_log(full), read_log(e2e_runs["split"])
    for step in range(6):
        assert split_log[step]["batch_fingerprint"] == full_log[step]["batch_fingerprint"], step
    for step in (3, 4, 5):
        for key in ("lr", "weight_decay", "momentum"):
            assert split_log[step][key] == full_log[step][key], (step, key)

    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoint-3", killed / "checkpoint-3")
    launch(e2e_args(e2e_runs["data"], killed, 6, "--resume_from_checkpoint", "latest"))
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    killed_log = read_log(killed)
    for step in (3, 4, 5):
        assert killed_log[step] == full_log[step]


# ---------------------------------------------------------------------------------------------------------------------
# in-process single-process runs (no launcher): failure handling


def test_non_finite_loss__stops_after_saving_the_last_good_state(tmp_path, monkeypatch, caplog):
    import modeling_ijepa

    data = make_mixed_image_folder(tmp_path / "images", count=6, corrupt=False)
    output = tmp_path / "run"
    original_forward = modeling_ijepa.IJepaForPreTraining.forward
    calls = {"n": 0}

    def forward_with_nan_at_third_step(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(modeling_ijepa.IJepaForPreTraining, "forward", forward_with_nan_at_third_step)
    args = e2e_args(data, output, 5, "--report_to", "none", "--resume_from_checkpoint", "latest")
    with caplog.at_level("INFO", logger="modeling_ijepa.training"), pytest.raises(
        loop.TrainingStopped, match="non-finite loss.*step 2"
    ):
        loop.pretrain(*arguments.parse_arguments(args))
    assert "no checkpoint in" in caplog.text and "starting from scratch" in caplog.text
    state = json.loads((output / "checkpoint-2" / checkpoints.TRAINER_STATE_NAME).read_text())
    assert state["global_step"] == 2  # the weights before the failing step, resumable
    assert json.loads((output / "all_results.json").read_text())["global_step"] == 2

    # Starting again into the same folder without --resume_from_checkpoint is refused with what to do.
    monkeypatch.setattr(modeling_ijepa.IJepaForPreTraining, "forward", original_forward)
    with pytest.raises(RuntimeError, match="--resume_from_checkpoint latest"):
        loop.pretrain(*arguments.parse_arguments(e2e_args(data, output, 5, "--report_to", "none")))


def test_gradient_accumulation__one_ema_update_per_optimizer_step_non_streaming(tmp_path, monkeypatch):
    import modeling_ijepa

    data = make_mixed_image_folder(tmp_path / "images", count=8, corrupt=False)
    momenta = []
    original_update = modeling_ijepa.IJepaForPreTraining.update_target_encoder

    def record_update(self, momentum):
        momenta.append(momentum)
        return original_update(self, momentum)

    monkeypatch.setattr(modeling_ijepa.IJepaForPreTraining, "update_target_encoder", record_update)
    output = tmp_path / "run"
    results = loop.pretrain(*arguments.parse_arguments(
        e2e_args(data, output, 3, "--streaming", "false", "--gradient_accumulation_steps", "2", "--report_to", "none")
    ))
    assert results["global_step"] == 3 and results["global_batch_size"] == 4
    log = read_log(output)
    assert momenta == [log[step]["momentum"] for step in range(3)]  # once per optimizer step, scheduled momentum
    state = json.loads((output / "checkpoint-3" / checkpoints.RANK_STATE_NAME.format(rank=0)).read_text())
    assert state["mask_collator"]["num_batches"] == 6  # 3 steps x 2 micro-batches


@pytest.mark.slow
def test_e2e__multi_gpu_launch_without_gpus_or_cpu_flag_is_refused(tmp_path):
    """`--multi_gpu` on a CPU machine without ACCELERATE_USE_CPU=1 starts processes that do not form a group."""
    data = make_mixed_image_folder(tmp_path / "images", count=4, corrupt=False)
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs: the launch would be a valid multi-GPU run")
    result = launch(e2e_args(data, tmp_path / "run", 1), use_cpu=False, check=False)
    assert result.returncode != 0
    assert "The launcher started 2 processes" in output_of(result) and "ACCELERATE_USE_CPU=1" in output_of(result)
    assert not (tmp_path / "run" / "all_results.json").exists()
