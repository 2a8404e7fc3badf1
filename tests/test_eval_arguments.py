"""Bad arguments of the fine-tuning and probe commands: one line each, exit 2, before any data is read or any model
loaded (issue 18, item 4). The pretraining command's table is in tests/test_faults.py.

Every workspace below holds a checkpoint whose config.json is a real I-JEPA config but whose weights are garbage, and
datasets whose files are garbage: a command that read either would fail with a traceback, not with our lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: no network in tests

import huggingface_hub.constants
import pytest
from transformers import TrainingArguments

from modeling_ijepa import ijepa_config_from_preset
from modeling_ijepa.benchmarks.learning import BenchmarkArguments, validate_benchmark_arguments
from modeling_ijepa.finetuning import DataTrainingArguments, ModelArguments, finetune, validate_finetune_arguments
from modeling_ijepa.probe_run import ProbeArguments, run_probes, validate_probe_arguments
from modeling_ijepa.training.validation import ArgumentError, parse_command_line

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
ENCODER_LAYERS = 3


class Drop:
    """A row's value that removes the flag from the base arguments."""

    def __repr__(self) -> str:
        return "DROP"


DROP = Drop()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_arguments")
    config = ijepa_config_from_preset("tiny-cpu", num_hidden_layers=ENCODER_LAYERS)
    config.save_pretrained(root / "encoder")  # a real I-JEPA config.json ...
    (root / "encoder" / "model.safetensors").write_bytes(b"not a safetensors file")  # ... and weights that never load
    (root / "vit").mkdir()
    (root / "vit" / "config.json").write_text(json.dumps({"model_type": "vit", "num_hidden_layers": 12}))
    (root / "checkpoint-4").mkdir()  # a training checkpoint: Accelerate state only, no config.json
    (root / "checkpoint-4" / "model.safetensors").write_bytes(b"not a safetensors file")
    for split in ("train", "val"):  # image folders whose only image is not an image
        (root / "images" / split / "cat").mkdir(parents=True)
        (root / "images" / split / "cat" / "0.png").write_bytes(b"not a png")
    (root / "data").mkdir()  # a dataset folder whose parquet files are not parquet
    for split in ("train", "test"):
        (root / "data" / f"{split}.parquet").write_bytes(b"not parquet")
    (root / "a_file").write_text("not a folder")
    (root / "out").mkdir()
    return root


def command_line(base: dict, edits: dict, workspace: Path) -> list[str]:
    """`base` with `edits` applied (DROP removes the flag, None makes a bare switch, a list gives several values),
    '{ws}' filled in."""
    argv = []
    for flag, value in {**base, **edits}.items():
        if value is DROP:
            continue
        argv.append(flag)
        values = [] if value is None else value if isinstance(value, list) else [value]
        argv.extend(str(one).format(ws=workspace) for one in values)
    return argv


def problems_of(validate, dataclass_types: tuple, argv: list[str]) -> list[str]:
    """The lines `validate` raises for `argv` (none when the arguments are good)."""
    try:
        validate(*parse_command_line(dataclass_types, argv))
    except ArgumentError as error:
        return error.problems
    return []


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE as the process reads it (the constant is read once, when huggingface_hub is imported)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ---------------------------------------------------------------------------------------------------------------------
# scripts/finetune.py


FINETUNE_TYPES = (ModelArguments, DataTrainingArguments, TrainingArguments)
FINETUNE_BASE = {
    "--model_name_or_path": "{ws}/encoder", "--train_dir": "{ws}/images/train", "--validation_dir": "{ws}/images/val",
    "--output_dir": "{ws}/out/finetune", "--do_train": None, "--do_eval": None, "--use_cpu": None,
    "--report_to": "none",
}
FINETUNE_BAD = [  # (edits of FINETUNE_BASE, what the one line must say)
    ({"--per_device_train_batch_size": 0}, "--per_device_train_batch_size 0: must be a positive number of images"),
    ({"--per_device_eval_batch_size": -8}, "--per_device_eval_batch_size -8: must be a positive number of images"),
    ({"--learning_rate": 0}, "--learning_rate 0.0: must be positive"),
    ({"--learning_rate=-1e-4": None}, "--learning_rate -0.0001: must be positive"),
    ({"--num_train_epochs": 0}, "--num_train_epochs 0.0: must be positive (or give --max_steps)"),
    ({"--max_steps": 0}, "--max_steps 0: must be a positive number of optimizer steps, or -1 to train for "
     "--num_train_epochs"),
    ({"--gradient_accumulation_steps": 0}, "--gradient_accumulation_steps 0: must be a positive number of batches"),
    ({"--weight_decay": -0.05}, "--weight_decay -0.05: must be >= 0"),
    ({"--adam_beta2": 1.0}, "--adam_beta2 1.0: must be in [0, 1)"),
    ({"--max_grad_norm": -1}, "--max_grad_norm -1.0: must be >= 0 (0 disables clipping)"),
    ({"--dataloader_num_workers": -1}, "--dataloader_num_workers -1: must be >= 0"),
    ({"--train_val_split": 1.5}, "--train_val_split 1.5: must be in (0, 1)"),
    ({"--max_train_samples": 0}, "--max_train_samples 0: must be a positive number of images"),
    ({"--max_eval_samples": 0}, "--max_eval_samples 0: must be a positive number of images"),
    ({"--model_name_or_path": "{ws}/missing"}, "--model_name_or_path {ws}/missing: no such file or folder (and not "
     "a Hub id"),
    ({"--model_name_or_path": "{ws}/encoder/config.json"}, "--model_name_or_path {ws}/encoder/config.json: is a "
     "file; give the checkpoint's folder"),
    ({"--model_name_or_path": "{ws}/checkpoint-4"}, "--model_name_or_path {ws}/checkpoint-4: has no config.json: "
     "not a model folder"),
    ({"--model_name_or_path": "{ws}/vit"}, "--model_name_or_path {ws}/vit: is a 'vit' checkpoint, not I-JEPA"),
    ({"--image_processor_name": "{ws}/missing"}, "--image_processor_name {ws}/missing: no such file or folder"),
    ({"--train_dir": DROP, "--validation_dir": DROP}, "--dataset_name/--train_dir: neither is given"),
    ({"--dataset_name": "{ws}/data"}, "--train_dir {ws}/images/train: conflicts with --dataset_name {ws}/data"),
    ({"--dataset_name": "a/b/c", "--train_dir": DROP, "--validation_dir": DROP},
     "--dataset_name a/b/c: no such file or folder (and not a Hub id"),
    ({"--train_dir": "{ws}/images/missing"}, "--train_dir {ws}/images/missing: no such folder"),
    ({"--validation_dir": "{ws}/a_file"}, "--validation_dir {ws}/a_file: is a file; give a folder"),
    ({"--train_dir": DROP}, "--do_train: needs training images, but only --validation_dir {ws}/images/val is given"),
    ({"--do_train": DROP, "--do_eval": DROP}, "--do_train/--do_eval: neither is set, so nothing would run"),
    ({"--output_dir": "{ws}/a_file"}, "--output_dir {ws}/a_file: is a file; give a folder"),
    ({"--output_dir": "{ws}/a_file/run"}, "--output_dir {ws}/a_file/run: cannot be created: {ws}/a_file is a file"),
    ({"--resume_from_checkpoint": "{ws}/out/checkpoint-9"}, "--resume_from_checkpoint {ws}/out/checkpoint-9: no such "
     "folder"),
]


@pytest.mark.parametrize("edits, message", FINETUNE_BAD, ids=[" ".join(map(str, e.items())) for e, _ in FINETUNE_BAD])
def test_validate_finetune_arguments__names_the_argument_value_and_what_is_allowed(workspace, edits, message):
    problems = problems_of(validate_finetune_arguments, FINETUNE_TYPES,
                           command_line(FINETUNE_BASE, edits, workspace))
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert message.format(ws=workspace) in problems[0]
    assert not (workspace / "out" / "finetune").exists()  # nothing was created


def test_validate_finetune_arguments__accepts_good_arguments_and_reports_every_problem_at_once(workspace):
    assert problems_of(validate_finetune_arguments, FINETUNE_TYPES, command_line(FINETUNE_BASE, {}, workspace)) == []
    bad = {"--learning_rate": 0, "--train_val_split": 0, "--model_name_or_path": "{ws}/vit"}
    problems = problems_of(validate_finetune_arguments, FINETUNE_TYPES, command_line(FINETUNE_BASE, bad, workspace))
    assert [line.split(":")[0] for line in problems] == [
        "--train_val_split 0.0", f"--model_name_or_path {workspace}/vit", "--learning_rate 0.0",
    ]


def test_validate_finetune_arguments__offline_hub_id_must_be_in_the_cache(workspace, offline):
    problems = problems_of(validate_finetune_arguments, FINETUNE_TYPES,
                           command_line(FINETUNE_BASE, {"--model_name_or_path": "runs/pretrain"}, workspace))
    assert problems == ["--model_name_or_path runs/pretrain: no such folder, and not in the Hub cache (HF_HUB_OFFLINE "
                        "is set: nothing can be downloaded)"]


def test_finetune__checks_its_arguments_before_reading_data(workspace):
    model_args, data_args, training_args = parse_command_line(
        FINETUNE_TYPES, command_line(FINETUNE_BASE, {"--train_val_split": 2}, workspace))
    with pytest.raises(ArgumentError, match=r"^--train_val_split 2.0: must be in \(0, 1\)"):
        finetune(model_args, data_args, training_args)  # the garbage images and weights are never opened


# ---------------------------------------------------------------------------------------------------------------------
# scripts/linear_probe.py


PROBE_BASE = {
    "--model_name_or_path": "{ws}/encoder", "--dataset_name": "{ws}/data", "--output_file": "{ws}/out/probe.json",
}
RAW_PIXELS = {"--model_name_or_path": DROP, "--raw_pixels": None}
PROBE_BAD = [  # (edits of PROBE_BASE, what the one line must say)
    ({"--batch_size": 0}, "--batch_size 0: must be a positive number of images per batch"),
    ({"--num_layers": 0}, "--num_layers 0: must be a positive number of last layers to pool"),
    ({"--num_layers": ENCODER_LAYERS + 1}, f"--num_layers {ENCODER_LAYERS + 1}: must be at most {ENCODER_LAYERS}, the "
     "number of layers of {ws}/encoder"),
    ({"--probe": "linar"}, "--probe linar: must be one of linear, batchnorm, attentive, knn"),
    ({"--method": "adam"}, "--method adam: must be one of lbfgs, sgd"),
    ({"--weight_decays": -1e-4}, "--weight_decays -0.0001: must be one or more L2 weight decays >= 0"),
    ({"--validation_fraction": 1.0}, "--validation_fraction 1.0: must be in (0, 1)"),
    ({"--attentive_epochs": 0}, "--attentive_epochs 0: must be a positive number of epochs"),
    ({"--max_train_samples": 0}, "--max_train_samples 0: must be a positive number of images"),
    ({"--max_test_samples": -5}, "--max_test_samples -5: must be a positive number of images"),
    ({"--train_split": "train[:10"}, "--train_split train[:10: not a split (Unrecognized instruction format"),
    ({"--test_split": "test[:150%]"}, "--test_split test[:150%]: not a split (Percent slice boundaries"),
    ({"--streaming": None, "--train_split": "train[:100]"}, "--train_split train[:100]: --streaming reads whole "
     "splits (no slices); drop --streaming, or take the whole split and cap it with --max_train_samples"),
    ({"--model_name_or_path": DROP}, "--model_name_or_path/--raw_pixels: give exactly one"),
    ({"--raw_pixels": None}, "--model_name_or_path/--raw_pixels: give exactly one"),
    (RAW_PIXELS, "--raw_pixels: needs --image_size N"),
    ({**RAW_PIXELS, "--image_size": 8, "--probe": "attentive"}, "--probe attentive: needs an encoder's patch tokens"),
    ({**RAW_PIXELS, "--image_size": 0}, "--image_size 0: must be a positive number of pixels"),
    ({"--image_size": 28}, "--image_size 28: only applies to --raw_pixels"),
    ({"--model_name_or_path": "{ws}/missing"}, "--model_name_or_path {ws}/missing: no such file or folder"),
    ({"--model_name_or_path": "{ws}/vit"}, "--model_name_or_path {ws}/vit: is a 'vit' checkpoint, not I-JEPA"),
    ({"--model_name_or_path": "{ws}/checkpoint-4"}, "--model_name_or_path {ws}/checkpoint-4: has no config.json"),
    ({"--image_processor_name": "{ws}/missing"}, "--image_processor_name {ws}/missing: no such file or folder"),
    ({"--dataset_name": "{ws}/missing"}, "--dataset_name {ws}/missing: no such file or folder"),
    ({"--dataset_name": "{ws}/data/train.parquet"}, "--dataset_name {ws}/data/train.parquet: is a file; give the "
     "folder holding it"),
    ({"--output_file": "{ws}/out"}, "--output_file {ws}/out: is a folder; give a file path"),
    ({"--output_file": "{ws}/a_file/probe.json"}, "--output_file {ws}/a_file/probe.json: cannot be created: "
     "{ws}/a_file is a file"),
]


@pytest.mark.parametrize("edits, message", PROBE_BAD, ids=[" ".join(map(str, e.items())) for e, _ in PROBE_BAD])
def test_validate_probe_arguments__names_the_argument_value_and_what_is_allowed(workspace, edits, message):
    problems = problems_of(validate_probe_arguments, (ProbeArguments,), command_line(PROBE_BASE, edits, workspace))
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert message.format(ws=workspace) in problems[0]
    assert not (workspace / "out" / "probe.json").exists()


def test_validate_probe_arguments__accepts_good_arguments_and_reports_every_problem_at_once(workspace):
    assert problems_of(validate_probe_arguments, (ProbeArguments,), command_line(PROBE_BASE, {}, workspace)) == []
    raw = {**RAW_PIXELS, "--image_size": 28, "--probe": "knn", "--weight_decays": [1e-4, 1e-2]}
    assert problems_of(validate_probe_arguments, (ProbeArguments,),
                       command_line(PROBE_BASE, raw, workspace)) == []
    bad = {"--batch_size": 0, "--method": "adam", "--test_split": "test[", "--model_name_or_path": "{ws}/vit"}
    problems = problems_of(validate_probe_arguments, (ProbeArguments,), command_line(PROBE_BASE, bad, workspace))
    assert [line.split(":")[0] for line in problems] == [
        f"--model_name_or_path {workspace}/vit", "--test_split test[", "--batch_size 0", "--method adam",
    ]


def test_validate_probe_arguments__offline_hub_id_must_be_in_the_cache(workspace, offline):
    problems = problems_of(validate_probe_arguments, (ProbeArguments,),
                           command_line(PROBE_BASE, {"--model_name_or_path": "runs/pretrain"}, workspace))
    assert problems == ["--model_name_or_path runs/pretrain: no such folder, and not in the Hub cache (HF_HUB_OFFLINE "
                        "is set: nothing can be downloaded)"]


def test_run_probes__checks_every_probe_before_loading_the_encoder(workspace):
    """What scripts/benchmark_learning.py calls: a bad name among its --probes fails before the garbage weights load."""
    args = ProbeArguments(dataset_name=str(workspace / "data"), model_name_or_path=str(workspace / "encoder"))
    with pytest.raises(ArgumentError, match=r"^--probe cosine: must be one of linear, batchnorm, attentive, knn$"):
        run_probes(args, ("linear", "cosine"))


# ---------------------------------------------------------------------------------------------------------------------
# scripts/benchmark_learning.py: pretraining then probes; both kinds of argument are checked before the pretraining


BENCHMARK_BASE = {"--output_dir": "{ws}/out/benchmark", "--probes": ["linear", "knn"]}
BENCHMARK_BAD = [  # (edits of BENCHMARK_BASE, what the one line must say)
    ({"--probes": ["linear", "cosine"]}, "--probes cosine: must be one of linear, batchnorm, attentive, knn"),
    ({"--probe_train_samples": 0}, "--probe_train_samples 0: must be a positive number"),
    ({"--probe_test_samples": 0}, "--probe_test_samples 0: must be a positive number of images"),
    ({"--probe_num_layers": 0}, "--probe_num_layers 0: must be a positive number"),
    ({"--probe_batch_size": -1}, "--probe_batch_size -1: must be a positive number"),
    ({"--max_dataset_samples": 0}, "--max_dataset_samples 0: must be a positive number of images"),
    ({"--max_steps": 0}, "--max_steps 0: must be a positive number of optimizer steps"),
    ({"--learning_rate": -1e-3}, "--learning_rate -0.001: must be positive"),
    ({"--warmup_steps": -1}, "--warmup_steps -1: must be >= 0 optimizer steps"),
    ({"--ema_momentum_start": 1.5}, "--ema_momentum_start 1.5: must be in [0, 1]"),
    ({"--crop_scale": 0.5}, "--crop_scale 0.5: must be two numbers MIN MAX"),
    ({"--config_overrides": "patch_size=5"}, "is not divisible by patch_size 5"),
    ({"--extra_pretrain_args": "--logging_steps 0"}, "--logging_steps 0: must be a positive number of optimizer steps"),
    ({"--extra_pretrain_args": "--no_such_flag 1"}, "--extra_pretrain_args --no_such_flag 1: Some specified arguments "
     "are not used"),
    ({"--output_dir": "{ws}/a_file"}, "--output_dir {ws}/a_file: is a file; give a folder"),
    ({"--results_file": "{ws}/out"}, "--results_file {ws}/out: is a folder; give a file path"),
    ({"--skip_pretraining": None}, "--skip_pretraining: needs an earlier run in --output_dir {ws}/out/benchmark"),
]


@pytest.mark.parametrize("edits, message", BENCHMARK_BAD, ids=[" ".join(map(str, e.items())) for e, _ in BENCHMARK_BAD])
def test_validate_benchmark_arguments__names_the_argument_value_and_what_is_allowed(workspace, edits, message):
    problems = problems_of(validate_benchmark_arguments, (BenchmarkArguments,),
                           command_line(BENCHMARK_BASE, edits, workspace))
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert message.format(ws=workspace) in problems[0]
    assert not (workspace / "out" / "benchmark").exists()  # nothing exported, nothing pretrained


def test_validate_benchmark_arguments__accepts_the_default_recipe(workspace):
    assert problems_of(validate_benchmark_arguments, (BenchmarkArguments,),
                       command_line(BENCHMARK_BASE, {}, workspace)) == []


# ---------------------------------------------------------------------------------------------------------------------
# parse errors (a bad type, an unknown flag or choice): one line, not argparse's usage


PARSE_BAD = [  # (dataclass types, base, edits, what the one line must say)
    (FINETUNE_TYPES, FINETUNE_BASE, {"--learning_rate": "1e-4x"}, "argument --learning_rate/--learning-rate: invalid float value: '1e-4x'"),
    (FINETUNE_TYPES, FINETUNE_BASE, {"--lr_scheduler_type": "cosin"}, "argument --lr_scheduler_type/--lr-scheduler-type: invalid choice: 'cosin'"),
    (FINETUNE_TYPES, FINETUNE_BASE, {"--model_name_or_path": DROP}, "the following arguments are required: "
     "--model_name_or_path"),
    ((ProbeArguments,), PROBE_BASE, {"--batch_size": "many"}, "argument --batch_size/--batch-size: invalid int value: 'many'"),
    ((ProbeArguments,), PROBE_BASE, {"--dataset_name": DROP}, "the following arguments are required: --dataset_name"),
]


@pytest.mark.parametrize("types, base, edits, message", PARSE_BAD, ids=[str(row[2]) for row in PARSE_BAD])
def test_parse_command_line__argparse_errors_are_one_line_and_exit_2(workspace, capsys, types, base, edits, message):
    with pytest.raises(SystemExit) as caught:
        parse_command_line(types, command_line(base, edits, workspace))
    assert caught.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].endswith("(--help lists the arguments)"), lines


def test_parse_command_line__a_value_a_dataclass_refuses_is_one_argument_error(workspace):
    with pytest.raises(ArgumentError) as caught:  # TrainingArguments' own __post_init__ check, a multi-line message
        parse_command_line(FINETUNE_TYPES, command_line(FINETUNE_BASE, {"--load_best_model_at_end": None,
                                                                        "--save_strategy": "no",
                                                                        "--eval_strategy": "epoch"}, workspace))
    assert len(caught.value.problems) == 1 and "\n" not in caught.value.problems[0]
    assert "--load_best_model_at_end requires the save and eval strategy to match" in caught.value.problems[0]
    with pytest.raises(ArgumentError, match=r"Some specified arguments are not used by the HfArgumentParser"):
        parse_command_line((ProbeArguments,), command_line(PROBE_BASE, {"--no_such_flag": 1}, workspace))


def test_parse_command_line__an_arguments_file_gets_the_same_checks(workspace, tmp_path):
    config = tmp_path / "probe.yaml"
    config.write_text(f"model_name_or_path: {workspace}/encoder\ndataset_name: {workspace}/data\nbatch_size: 0\n")
    assert problems_of(validate_probe_arguments, (ProbeArguments,), [str(config)]) == [
        "--batch_size 0: must be a positive number of images per batch"]
    config.write_text(f"dataset_name: {workspace}/data\nraw_pixels: true\nimage_size: 8\nbatch_sise: 16\n")
    with pytest.raises(ArgumentError, match=r"Some keys are not used by the HfArgumentParser: \['batch_sise'\]"):
        parse_command_line((ProbeArguments,), [str(config)])
    with pytest.raises(ArgumentError, match=r"^missing\.json: no such arguments file$"):
        parse_command_line(FINETUNE_TYPES, ["missing.json"])


# ---------------------------------------------------------------------------------------------------------------------
# the scripts: exit 2, one line per problem, no traceback, nothing read


def run_script(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *argv], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))


def test_finetune_script__bad_arguments_exit_2_with_one_line_each_and_nothing_read(workspace):
    bad = {"--per_device_train_batch_size": 0, "--learning_rate=-1": None, "--output_dir": "{ws}/a_file"}
    result = run_script("finetune.py", command_line(FINETUNE_BASE, bad, workspace))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "finetune.py: error: --per_device_train_batch_size 0: must be a positive number of images per device",
        "finetune.py: error: --learning_rate -1.0: must be positive",
        f"finetune.py: error: --output_dir {workspace}/a_file: is a file; give a folder (it is created if missing)",
    ]
    assert result.stdout == ""  # the run's logging (to stdout) never started


def test_benchmark_learning_script__bad_arguments_exit_2_before_the_export_and_the_pretraining(workspace):
    bad = {"--probes": ["linear", "cosine"], "--max_steps": 0}
    result = run_script("benchmark_learning.py", command_line(BENCHMARK_BASE, bad, workspace))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "benchmark_learning.py: error: --probes cosine: must be one of linear, batchnorm, attentive, knn",
        "benchmark_learning.py: error: --max_steps 0: must be a positive number of optimizer steps, or -1 to train "
        "for --num_train_epochs",
    ]
    assert not (workspace / "out" / "benchmark").exists()


def test_linear_probe_script__bad_arguments_exit_2_with_one_line_each_and_nothing_read(workspace):
    bad = {"--probe": "linar", "--num_layers": ENCODER_LAYERS + 1, "--streaming": None, "--test_split": "test[:50%]"}
    result = run_script("linear_probe.py", command_line(PROBE_BASE, bad, workspace))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"linear_probe.py: error: --num_layers {ENCODER_LAYERS + 1}: must be at most {ENCODER_LAYERS}, the number of "
        f"layers of {workspace}/encoder",
        "linear_probe.py: error: --test_split test[:50%]: --streaming reads whole splits (no slices); drop "
        "--streaming, or take the whole split and cap it with --max_test_samples",
        "linear_probe.py: error: --probe linar: must be one of linear, batchnorm, attentive, knn",
    ]
    assert result.stdout == "" and not (workspace / "out" / "probe.json").exists()
