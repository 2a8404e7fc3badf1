"""`scripts/gpu_check.sh` in its CPU dry-run mode: the script's own path (PYTHONPATH, benchmark, per-measurement
results appended to the results folder) runs here; the GPU rows use the same functions with other arguments."""

import os
import subprocess
import sys
from pathlib import Path

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
