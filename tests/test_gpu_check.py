"""`scripts/gpu_check.sh` in its CPU dry-run mode: the script's own path (PYTHONPATH, benchmark, per-measurement
results appended to the results folder) runs here; the GPU rows use the same functions with other arguments."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check__tiny_cpu_mode_appends_a_row_per_measurement(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_CONFIGS="tiny-cpu", GPU_CHECK_ONLY="tiny_eager",
               OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path)], env=env, cwd="/",
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (tmp_path / "gpu_check.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| tiny_eager |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "0" and cells[3] == "tiny-cpu" and float(cells[6]) > 0, row  # rc, config, images/s
    assert float(cells[8]) > 0, row  # the sampler, timed apart from the step
    assert (tmp_path / "gpu_check.jsonl").read_text().count('"measurement": "tiny_eager"') == 1


def run_gpu_check(tmp_path, only: str, timeout: int) -> str:
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_CONFIGS="tiny-cpu", GPU_CHECK_ONLY=only,
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path)], env=env, cwd="/",
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return (tmp_path / "gpu_check.md").read_text()


def test_gpu_check__tiny_cpu_stability_row_per_pass_with_cpu_counters_na(tmp_path):
    table = run_gpu_check(tmp_path, "stability_default", timeout=300)
    assert "stability_default: rc=0" in table
    rows = [line for line in table.splitlines() if line.startswith("| stability_default (tiny-cpu b8 fp32")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "2", "1, first 3"]  # pass 1, the replay, a prefix
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert int(cells[2]) in (6, 3) and float(cells[8]) > 0  # steps, mean images/s
        assert cells[11] == "n/a/n/a/n/a" and cells[13] == "n/a"  # allocator counters and SM clock: CUDA only
    assert rows[1].split("|")[11].strip().startswith("0, -")  # the replay meets no new shape
    assert (tmp_path / "stability_default.json").exists()


@pytest.mark.slow  # the real loop on a fresh JPEG parquet: about a minute on a busy 2-core machine
def test_gpu_check__tiny_cpu_loop_row_with_window_rates(tmp_path):
    table = run_gpu_check(tmp_path, "loop_eager", timeout=600)
    assert "loop dataset: 264 JPEGs" in table and "loop_eager: rc=0" in table
    row = next(line for line in table.splitlines() if line.startswith("| tiny-cpu | 8 | 30 | False |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[5]) > 0 and float(cells[6]) > 0 and cells[8] == "0.0"  # first 20, steady, compile s
    assert len(cells[9].split()) == 3  # one rate per 10-step window
