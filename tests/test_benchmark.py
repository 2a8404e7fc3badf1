"""Smoke tests of scripts/benchmark.py and its official-style baseline: fields and numerics, never timings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_ijepa import IJepaForPreTraining, MaskSamplingSettings, ijepa_config_from_preset, sample_masks

from modeling_ijepa.benchmarks.official_style import LoopMaskSampler, OfficialStylePretraining, load_from_ours

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_baseline_loss__equals_ours_from_same_weights_and_masks():
    torch.manual_seed(0)
    config = ijepa_config_from_preset("tiny-cpu")
    ours = IJepaForPreTraining(config).train()
    baseline = OfficialStylePretraining(config).train()
    load_from_ours(baseline, ours)
    generator = torch.Generator().manual_seed(0)
    context_mask, target_mask, _ = sample_masks(MaskSamplingSettings.from_config(config), 4, generator)
    pixel_values = torch.randn(4, 3, 32, 32, generator=generator)
    expected = ours(pixel_values, context_mask=context_mask, target_mask=target_mask).loss
    actual = baseline.loss(pixel_values, context_mask, target_mask)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_loop_sampler__masks_have_collator_shapes_and_no_overlap():
    config = ijepa_config_from_preset("vit-huge-14")
    context_mask, target_mask = LoopMaskSampler.from_config(config)(8, torch.Generator().manual_seed(0))
    assert len(context_mask) == config.num_context_blocks and len(target_mask) == config.num_target_blocks
    for mask in context_mask + target_mask:
        assert mask.dtype == torch.long and mask.shape[0] == 8
        assert int(mask.min()) >= 0 and int(mask.max()) < config.num_patches
    for context in context_mask:
        for target in target_mask:
            shared = (context[:, :, None] == target[:, None, :]).any()
            assert not shared


@pytest.mark.slow  # a minute or more on a busy 2-core machine (subprocesses for memory)
def test_benchmark_script__tiny_config_writes_expected_fields(tmp_path):
    output = tmp_path / "results.json"
    command = [
        sys.executable, str(SCRIPTS / "benchmark.py"), "--configs", "tiny-cpu", "--dtypes", "fp32",
        "--batch_size", "4", "--inference_batch_size", "4", "--warmup", "1", "--reps", "1",
        "--collator_batch_size", "8", "--collator_reps", "1", "--output", str(output),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| step | tiny-cpu |" in completed.stdout
    report = json.loads(output.read_text())
    assert {"arguments", "environment", "results"} <= set(report)
    by_kind = {result["kind"]: result for result in report["results"]}
    assert set(by_kind) == {"step", "inference", "collator"}

    step = by_kind["step"]
    for key in ("ours_s", "baseline_s", "ratio", "images_per_s", "flops_per_step", "mfu", "matmul_peak_flops",
                "ours_memory", "baseline_memory", "memory_ratio", "parity"):
        assert key in step, key
    assert step["parity"]["match"], step["parity"]
    assert len(step["parity"]["ours_losses"]) == len(step["parity"]["baseline_losses"]) > 0
    assert step["flops_per_step"] > 0
    assert step["ours_memory"]["peak_step_mib"] >= 0 and step["ours_memory"]["peak_rss_mib"] > 0

    inference = by_kind["inference"]
    for key in ("ours_s", "transformers_s", "ratio", "max_abs_diff", "ours_memory", "transformers_memory"):
        assert key in inference, key
    assert inference["max_abs_diff"] < 1e-5

    collator = by_kind["collator"]
    assert collator["grid"] == [16, 16] and collator["batch_size"] == 8
    assert collator["ours_s"] > 0 and collator["loop_reference_s"] > 0 and collator["speedup"] > 0
