"""scripts/benchmark_learning.py on a tiny budget: Fashion-MNIST export, pretraining through scripts/pretrain.py,
the three probes and the table (the full benchmark is a script, not a test)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from script_loading import load_script

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matrices: with several threads torch mostly waits on thread synchronisation, badly so on a shared CPU.
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the pretraining subprocess too
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = omp


# Subprocesses (Trainer / accelerate launch) take tens of seconds of CPU.
pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"




@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    if not os.path.exists(FASHION_MNIST):
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/setup.sh installs it).")
    output_dir = tmp_path_factory.mktemp("benchmark")
    script = load_script("benchmark_learning")
    summary = script.main([
        "--output_dir", str(output_dir), "--max_dataset_samples", "300",
        "--config_overrides", "hidden_size=32,num_hidden_layers=2,intermediate_size=64,pred_hidden_size=16,"
        "pred_num_hidden_layers=1",
        "--max_steps", "3", "--per_device_train_batch_size", "8", "--warmup_steps", "1",
        "--probe_train_samples", "200", "--probe_test_samples", "100", "--probe_batch_size", "100",
    ])
    return output_dir, summary


def test_benchmark__pretrains_with_the_pretraining_script(benchmark_run):
    output_dir, summary = benchmark_run
    pretraining = summary["pretraining"]
    assert "scripts/pretrain.py" in pretraining["command"]
    assert pretraining["steps"] == 3 and pretraining["images_seen"] == 24
    assert pretraining["wall_s"] > 0 and pretraining["images_per_s"] > 0
    config = json.loads((output_dir / "pretrain" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 2


def test_benchmark__probes_pretrained_random_init_and_pixels(benchmark_run):
    output_dir, summary = benchmark_run
    names = [row["name"] for row in summary["probes"]]
    assert [name[:3] for name in names] == ["(a)", "(b)", "(c)"]
    for row in summary["probes"]:
        assert row["num_train"] == 200 and row["num_test"] == 100 and row["num_classes"] == 10
        assert 0.0 <= row["test_accuracy"] <= 1.0
    assert [row["feature_dim"] for row in summary["probes"]] == [32, 32, 28 * 28]
    # 200 Fashion-MNIST images are enough for a pixel probe far above chance (10%).
    assert summary["probes"][2]["test_accuracy"] > 0.5
    # (b) is the same architecture as (a), freshly initialised: same keys and shapes, other values.
    pretrained = load_file(output_dir / "pretrain" / "model.safetensors")
    random_init = load_file(output_dir / "random_init" / "model.safetensors")
    assert set(random_init) and all(pretrained["ijepa." + name].shape == t.shape for name, t in random_init.items())
    weight = next(name for name in random_init if name.endswith("weight") and random_init[name].ndim == 2)
    assert not torch.equal(random_init[weight], pretrained["ijepa." + weight])


def test_benchmark__table_and_results_files(benchmark_run):
    output_dir, summary = benchmark_run
    table = (output_dir / "results.md").read_text()
    assert table.startswith("| features | probe top-1 (test) |")
    assert len(table.strip().splitlines()) == 2 + 3
    for row in summary["probes"]:
        assert f"{100 * row['test_accuracy']:.1f}%" in table
    assert json.loads((output_dir / "results.json").read_text())["table"] == summary["table"]
