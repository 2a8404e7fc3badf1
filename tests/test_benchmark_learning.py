"""scripts/benchmark_learning.py on a tiny budget: Fashion-MNIST export, pretraining through the package's loop,
every probe on the three rows and the table (the full benchmark is a script, not a test)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modeling_ijepa.probe_run import ProbeArguments, run_probe

# One command-line run of the benchmark (pretraining + 3 rows x 2 probes) takes tens of seconds of CPU.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"



@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    if not os.path.exists(FASHION_MNIST):
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it).")
    output_dir = tmp_path_factory.mktemp("benchmark")
    results_file = output_dir / "screen.jsonl"
    command = [
        sys.executable, os.path.join(REPO_ROOT, "scripts", "benchmark_learning.py"),
        "--output_dir", str(output_dir), "--max_dataset_samples", "300", "--run_name", "tiny",
        "--results_file", str(results_file),
        "--config_overrides", "hidden_size=32,num_hidden_layers=2,intermediate_size=64,pred_hidden_size=16,"
        "pred_num_hidden_layers=1",
        "--max_steps", "3", "--per_device_train_batch_size", "8", "--warmup_steps", "1",
        "--probes", "linear", "knn",
        "--probe_train_samples", "200", "--probe_test_samples", "100", "--probe_batch_size", "100",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((output_dir / "results.json").read_text())
    return output_dir, summary, result.stdout, results_file


def test_benchmark__pretrains_with_the_packages_loop(benchmark_run):
    output_dir, summary, _, _ = benchmark_run
    pretraining = summary["pretraining"]
    assert pretraining["command"].startswith("scripts/pretrain.py --dataset_name")
    assert pretraining["steps"] == 3 and pretraining["images_seen"] == 24
    assert pretraining["wall_s"] > 0 and pretraining["images_per_s"] > 0
    config = json.loads((output_dir / "pretrain" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
    results = json.loads((output_dir / "pretrain" / "all_results.json").read_text())
    assert results["global_step"] == 3 and results["global_batch_size"] == 8


def test_benchmark__rows_are_what_the_probe_run_gives_each_encoder(benchmark_run):
    output_dir, summary, _, _ = benchmark_run
    rows = {(row["name"][:3], row["probe"]): row for row in summary["probes"]}
    assert sorted(rows) == [(r, p) for r in ("(a)", "(b)", "(c)") for p in ("knn", "linear")]
    for row in summary["probes"]:
        assert row["num_train"] == 200 and row["num_test"] == 100 and row["num_classes"] == 10
    assert [rows[(r, "linear")]["feature_dim"] for r in ("(a)", "(b)", "(c)")] == [32, 32, 28 * 28]
    # Each row equals a separate probe run of the same encoder (nothing of one row leaks into another).
    data = str(output_dir / "data")
    common = {"dataset_name": data, "max_train_samples": 200, "max_test_samples": 100, "batch_size": 100}
    for row, source in (("(a)", {"model_name_or_path": str(output_dir / "pretrain")}),
                        ("(b)", {"model_name_or_path": str(output_dir / "random_init")}),
                        ("(c)", {"raw_pixels": True, "image_size": 28})):
        alone = run_probe(ProbeArguments(**common, **source))
        assert rows[(row, "linear")]["test_accuracy"] == alone["test_accuracy"], row
    # 200 Fashion-MNIST images are enough for a pixel probe far above chance (10%).
    assert rows[("(c)", "linear")]["test_accuracy"] > 0.5 and rows[("(c)", "knn")]["test_accuracy"] > 0.5


def test_benchmark__random_init_row_is_the_same_architecture_freshly_initialised(benchmark_run):
    output_dir, _, _, _ = benchmark_run
    pretrained = load_file(output_dir / "pretrain" / "model.safetensors")
    random_init = load_file(output_dir / "random_init" / "model.safetensors")
    assert set(random_init) and all(pretrained["ijepa." + name].shape == t.shape for name, t in random_init.items())
    weight = next(name for name in random_init if name.endswith("weight") and random_init[name].ndim == 2)
    assert not torch.equal(random_init[weight], pretrained["ijepa." + weight])


def test_benchmark__table_results_files_and_printout(benchmark_run):
    output_dir, summary, stdout, results_file = benchmark_run
    table = (output_dir / "results.md").read_text()
    assert table.startswith("| features | linear probe (test top-1) | knn probe (test top-1) | pretraining |")
    assert len(table.strip().splitlines()) == 2 + 3
    for row in summary["probes"]:
        assert f"{100 * row['test_accuracy']:.1f}%" in table
    assert summary["table"] in stdout and "Total wall time" in stdout
    lines = results_file.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["run_name"] == "tiny"


def test_benchmark__recipe_flags_reach_the_pretraining_run(tmp_path):
    """The short-run schedule and SIGReg flags of a screen become the pretraining run's schedules and config."""
    from modeling_ijepa.benchmarks.learning import BenchmarkArguments, pretrain_argv
    from modeling_ijepa.training import arguments

    args = BenchmarkArguments(max_steps=20_000, warmup_steps=50, ema_momentum_start=0.99, ema_momentum_end=0.999,
                              ema_momentum_ramp_steps=300, config_overrides="sigreg_weight=0.1,sigreg_on=tokens")
    model_args, _, run_args = arguments.parse_arguments(pretrain_argv(args, str(tmp_path), tmp_path / "run"))
    schedules = arguments.resolve_schedules(run_args, None, 64)
    assert (schedules.train_steps, schedules.warmup_steps, schedules.ema_ramp_steps) == (20_000, 50, 300)
    assert schedules.at(0)["momentum"] == 0.99 and schedules.at(5000)["momentum"] == pytest.approx(0.999)
    assert arguments.parse_config_overrides(model_args.config_overrides) == {"sigreg_weight": 0.1,
                                                                            "sigreg_on": "tokens"}
    default = BenchmarkArguments()
    _, _, run_args = arguments.parse_arguments(pretrain_argv(default, str(tmp_path), tmp_path / "run"))
    assert run_args.ema_momentum_ramp_steps is None and run_args.ema_momentum_end == 1.0  # the official ramp


def test_benchmark__screens_can_skip_the_baseline_rows(tmp_path, monkeypatch):
    """--probe_baselines false probes only row (a): rows (b) and (c) do not depend on the training recipe."""
    from modeling_ijepa import probe_run
    from modeling_ijepa.benchmarks.learning import BenchmarkArguments, probe_rows

    probed = []

    def record(probe_args, probes):
        probed.append(probe_args.model_name_or_path or "pixels")
        return {probe: {"probe": probe, "test_accuracy": 0.5} for probe in probes}

    monkeypatch.setattr(probe_run, "run_probes", record)
    for baselines, expected in ((True, ["pre", "rand", "pixels"]), (False, ["pre"])):
        probed.clear()
        args = BenchmarkArguments(probes=["linear", "knn"], probe_baselines=baselines)
        rows = probe_rows(args, str(tmp_path), tmp_path / "pre", tmp_path / "rand")
        assert [p if p == "pixels" else p.rsplit("/", 1)[-1] for p in probed] == expected
        assert len(rows) == 2 * len(expected)
