"""Issue 20's switches and instruments on CPU: the SDPA priority order, the garbage-collection policy, the allocator
setting, the EMA's cached parameter slots, the `stability` section and the benchmark section registry. Behaviour and
counts only, never timings."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from modeling_ijepa import IJepaForPreTraining, ijepa_config_from_preset
from modeling_ijepa.cuda_settings import (
    ALLOCATOR_ENV, GarbageCollectionPolicy, StepSettings, apply_allocator_settings, parse_sdpa_backends,
)

SDPA_NAMES = {int(member): name for name, member in torch.nn.attention.SDPBackend.__members__.items()}


def sdpa_choice() -> str:
    """The kernel SDPA's dispatcher picks now for a small fp32 CPU attention."""
    query = torch.randn(2, 8, 4, 16).transpose(1, 2)  # (batch, heads, tokens, head_dim), as transformers lays it out
    return SDPA_NAMES[int(torch._fused_sdp_choice(query, query, query))]


# ---------------------------------------------------------------------------------------------------------------------
# SDPA priority


def test_sdpa_backends__math_only_makes_sdpa_choose_math_until_stopped():
    default = sdpa_choice()
    assert default == "FLASH_ATTENTION"  # torch's CPU default for these inputs
    settings = StepSettings("math", gc_collect_steps=0)
    settings.start()
    try:
        assert sdpa_choice() == "MATH"
    finally:
        settings.stop()
    assert sdpa_choice() == default


def test_sdpa_backends__empty_keeps_torchs_choice():
    settings = StepSettings(None, gc_collect_steps=0)
    settings.start()
    try:
        assert sdpa_choice() == "FLASH_ATTENTION"
    finally:
        settings.stop()


def test_parse_sdpa_backends__order_kept_and_unknown_name_says_what_to_use():
    from torch.nn.attention import SDPBackend

    assert parse_sdpa_backends("flash, efficient,cudnn,math") == [
        SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    assert parse_sdpa_backends("") == [] and parse_sdpa_backends(None) == []
    with pytest.raises(ValueError, match="unknown backend.*'fast'.*flash, efficient, cudnn, math"):
        parse_sdpa_backends("flash,fast")


# ---------------------------------------------------------------------------------------------------------------------
# garbage collection


class Collections:
    """Generations of the collections that ran, via gc.callbacks."""

    def __init__(self):
        self.generations = []

    def __call__(self, phase, info):
        if phase == "start":
            self.generations.append(info["generation"])

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


def test_gc_policy__automatic_collector_off_one_generation_1_collection_every_n_steps_then_restored():
    assert gc.isenabled()
    policy = GarbageCollectionPolicy(every_steps=3)
    policy.start()
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0  # setup's objects frozen
        with Collections() as seen:
            for step in range(1, 8):
                policy.after_step(step)
        assert seen.generations == [1, 1]  # after steps 3 and 6
        assert policy.collections == 2
    finally:
        policy.stop()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_gc_policy__zero_leaves_pythons_collector_alone():
    policy = GarbageCollectionPolicy(every_steps=0)
    policy.start()
    try:
        assert gc.isenabled() and gc.get_freeze_count() == 0
        with Collections() as seen:
            for step in range(1, 101):
                policy.after_step(step)
        assert seen.generations == []
    finally:
        policy.stop()
    assert gc.isenabled()


def test_gc_policy__negative_steps_refused():
    with pytest.raises(ValueError, match="--gc_collect_steps must be >= 0"):
        GarbageCollectionPolicy(every_steps=-1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is what DataLoader workers use on Linux")
def test_gc_policy__forked_worker_gets_the_automatic_collector_back():
    policy = GarbageCollectionPolicy(every_steps=50)
    policy.start()
    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report and leave at once
            os.write(write_end, b"1" if gc.isenabled() else b"0")
            os._exit(0)
        os.close(write_end)
        child_enabled = os.read(read_end, 1)
        os.waitpid(pid, 0)
        os.close(read_end)
        assert not gc.isenabled()  # the parent keeps the policy
    finally:
        policy.stop()
    assert child_enabled == b"1"


# ---------------------------------------------------------------------------------------------------------------------
# allocator setting


def test_allocator_settings__written_to_the_environment_before_cuda_starts(monkeypatch):
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    apply_allocator_settings("expandable_segments:True")
    assert os.environ[ALLOCATOR_ENV] == "expandable_segments:True"
    apply_allocator_settings(None)  # no setting: the environment stays as it is
    assert os.environ[ALLOCATOR_ENV] == "expandable_segments:True"


def test_allocator_settings__refused_once_cuda_runs_with_another_value(monkeypatch):
    monkeypatch.setenv(ALLOCATOR_ENV, "max_split_size_mb:128")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already initialised.*Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"):
        apply_allocator_settings("expandable_segments:True")
    apply_allocator_settings("max_split_size_mb:128")  # the value it runs with: nothing to do
    assert os.environ[ALLOCATOR_ENV] == "max_split_size_mb:128"


def test_validation__bad_sdpa_backends_and_gc_steps_are_one_line_each(tmp_path):
    from modeling_ijepa.training import parse_arguments
    from modeling_ijepa.training.validation import ArgumentError, validate_arguments

    model_args, data_args, run_args = parse_arguments([
        "--dataset_name", str(tmp_path), "--config_name", "tiny-cpu", "--output_dir", str(tmp_path / "out"),
        "--sdpa_backends", "flash,fastest", "--gc_collect_steps", "-2",
    ])
    with pytest.raises(ArgumentError) as error:
        validate_arguments(model_args, data_args, run_args)
    message = str(error.value)
    assert "--sdpa_backends flash,fastest: must be a comma-separated order of flash, efficient, cudnn, math" in message
    assert "--gc_collect_steps -2: must be >= 0" in message


def test_pretraining_defaults__torchtitans_gc_every_50_steps_torchs_sdpa_order_environment_allocator():
    from modeling_ijepa.training.arguments import PretrainingArguments

    args = PretrainingArguments()
    assert (args.gc_collect_steps, args.sdpa_backends, args.cuda_allocator_settings) == (50, None, None)


# ---------------------------------------------------------------------------------------------------------------------
# EMA parameter slots


def test_ema_slots__follow_parameters_order_and_replaced_parameters():
    torch.manual_seed(0)
    model = IJepaForPreTraining(ijepa_config_from_preset("tiny-cpu"))
    target_slots, context_slots = model._ema_parameter_slots()
    assert [owner[name] for owner, name in target_slots] == list(model.ijepa.parameters())
    assert [owner[name] for owner, name in context_slots] == list(model.context_encoder.parameters())
    model.update_target_encoder(0.9)  # slots cached from here on
    # Replace every target parameter (as from_pretrained / load_state_dict(assign=True) do): the update follows.
    fresh = {key: torch.randn_like(value) for key, value in model.ijepa.state_dict().items()}
    before = {key: value.clone() for key, value in fresh.items()}  # assign=True adopts `fresh`'s storage
    model.ijepa.load_state_dict(fresh, assign=True)
    model.update_target_encoder(0.25)
    context = dict(model.context_encoder.named_parameters())
    for name, parameter in model.ijepa.named_parameters():
        assert parameter.data_ptr() == fresh[name].data_ptr()  # the assigned tensor was the one updated
        torch.testing.assert_close(parameter, 0.25 * before[name] + 0.75 * context[name], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# the `stability` section and the section registry


def test_stability_section__replays_masks_flags_new_shapes_records_sdpa_choice_and_gc():
    from modeling_ijepa.benchmarks.step_stability import (
        NOT_AVAILABLE, StabilitySettings, format_stability_table, stability_benchmark,
    )

    settings = StabilitySettings(config="tiny-cpu", batch_size=2, dtype="fp32", masks=4, passes=2,
                                 gc_collect_steps=2, compare_steps=2, sdpa_backends="math")
    result = stability_benchmark(settings, torch.device("cpu"))
    steps = result["steps"]
    assert [(r["pass"], r["mask"]) for r in steps] == [(p, m) for p in (1, 2) for m in range(4)]
    for first, second in zip(steps[:4], steps[4:]):  # the same masks, replayed
        assert (first["context_length"], first["target_length"]) == (second["context_length"], second["target_length"])
        assert not second["new_shape"] and second["sdpa"] == {}
    for record in steps[:4]:
        assert record["step_ms"] > 0 and record["device_allocs"] == NOT_AVAILABLE == record["sm_clock_mhz"]
        # the SDPA choice is asked on a shape's first step only, and the `math` priority is what SDPA uses
        assert (record["sdpa"] != {}) == record["new_shape"]
        assert set(record["sdpa"]) <= {"MATH"}
    assert sum(r["gc_collections"] for r in steps) >= 4  # one gc.collect(1) every 2 of the 8 steps
    first_pass, second_pass = result["pass_summaries"]
    assert second_pass["new_shape_steps"] == 0 and first_pass["steps"] == second_pass["steps"] == 4
    assert first_pass["p10_ms"] <= first_pass["p50_ms"] <= first_pass["p90_ms"] <= first_pass["max_ms"]
    assert result["compare_summary"]["steps"] == 2
    assert result["profiler_attention_kernels"].startswith(NOT_AVAILABLE) and result["sm_clock"].startswith(NOT_AVAILABLE)
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored
    assert gc.isenabled()
    table = format_stability_table([result])
    assert table.count("\n| default (tiny-cpu b2 fp32") == 3  # pass 1, pass 2, first-2 prefix


def test_stability_section__warm_shapes_leaves_no_new_shape_in_the_timed_passes():
    from modeling_ijepa.benchmarks.step_stability import StabilitySettings, stability_benchmark

    result = stability_benchmark(StabilitySettings(config="tiny-cpu", batch_size=2, dtype="fp32", masks=3, passes=1,
                                                   warm_shapes=True), torch.device("cpu"))
    assert result["warm_shapes_s"] > 0
    assert not any(r["new_shape"] for r in result["steps"])


def test_benchmark_sections__registry_names_every_section_and_refuses_unknown_ones():
    from modeling_ijepa.benchmarks.sections import SECTIONS, BenchmarkArguments, parse_device

    # the sections the docs, tests and scripts/gpu_check.sh call (others may be added: one line each)
    assert {"step", "inference", "collator", "pipeline", "decode", "resume", "stability", "loop"} <= set(SECTIONS)
    assert list(SECTIONS)[:3] == ["step", "inference", "collator"]  # the main table's rows come first
    with pytest.raises(ValueError, match="unknown \\['speed'\\]; choose from step, inference"):
        parse_device(BenchmarkArguments(sections=["step", "speed"], device="cpu"))


def test_loop_window_rates__totals_over_images_and_seconds_not_means_of_rates():
    from modeling_ijepa.benchmarks.real_loop import window_rates

    # windows of 10 steps at batch 8: 80 images in 0.8 s, 0.4 s, then 0.2 s and 0.2 s
    rates = window_rates([(10, 100.0), (20, 200.0), (30, 400.0), (40, 400.0)], batch_size=8)
    assert rates["first_images_per_s"] == pytest.approx(160 / 1.2)
    assert rates["steady_images_per_s"] == pytest.approx(400.0)
    assert rates["first_over_steady"] == pytest.approx(160 / 1.2 / 400)


def test_stability_section__compiled_layers_run_without_the_sdpa_wrapper():
    from modeling_ijepa.benchmarks.step_stability import StabilitySettings, stability_benchmark

    result = stability_benchmark(StabilitySettings(config="tiny-cpu", batch_size=2, dtype="fp32", masks=2, passes=2,
                                                   compile=True, compile_backend="aot_eager"), torch.device("cpu"))
    new = [r for r in result["steps"] if r["new_shape"]]
    assert new and all(r["sdpa"] == {"n/a (compiled)": 1} for r in new)  # not asked: tracing it would recompile
    assert result["pass_summaries"][1]["new_shape_steps"] == 0


def test_pretrain__applies_sdpa_order_and_gc_policy_while_training_and_reports_window_rates(tmp_path, monkeypatch):
    import modeling_ijepa
    from modeling_ijepa.training import loop, parse_arguments
    from test_pretrain import e2e_args, make_mixed_image_folder  # tests/ is on sys.path under pytest

    data = make_mixed_image_folder(tmp_path / "images", count=6, corrupt=False)
    seen = {"sdpa": set(), "gc_enabled": set()}
    original_forward = modeling_ijepa.IJepaForPreTraining.forward

    def observed_forward(self, *args, **kwargs):
        seen["sdpa"].add(sdpa_choice())
        seen["gc_enabled"].add(gc.isenabled())
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_ijepa.IJepaForPreTraining, "forward", observed_forward)
    argv = e2e_args(data, tmp_path / "run", 4, "--report_to", "none", "--logging_steps", "2",
                    "--dataloader_num_workers", "0", "--sdpa_backends", "math", "--gc_collect_steps", "2")
    with Collections() as collections:
        results = loop.pretrain(*parse_arguments(argv))
    assert seen == {"sdpa": {"MATH"}, "gc_enabled": {False}}  # inside every training step
    assert collections.generations.count(1) >= 3  # at the start, then after steps 2 and 4
    assert gc.isenabled() and gc.get_freeze_count() == 0 and sdpa_choice() == "FLASH_ATTENTION"  # restored
    windows = results["images_per_second_by_window"]
    assert [step for step, _ in windows] == [2, 4] and all(rate > 0 for _, rate in windows)
