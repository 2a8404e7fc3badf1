"""Options beyond the paper for small data (issue 15), each off by default: several mask sets per image sharing one
target-encoder pass, and targets averaged over the last k layers (data2vec-style)."""

import pytest
import torch
import torch.nn.functional as F

from modeling_ijepa import IJepaForPreTraining, IJepaMaskCollator, ijepa_config_from_preset
from modeling_ijepa.modeling_ijepa import TARGET_LAYER_NORM_EPS


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**overrides) -> IJepaForPreTraining:
    torch.manual_seed(0)
    return IJepaForPreTraining(ijepa_config_from_preset("tiny-cpu", num_hidden_layers=3, **overrides)).eval()


def rows(masks, start, stop):
    return [m[start:stop] for m in masks]


def test_mask_sets__collator_samples_one_set_per_image_and_set_set_major():
    config = ijepa_config_from_preset("tiny-cpu", num_mask_sets=3)
    batch = IJepaMaskCollator(config, seed=0)([{"pixel_values": torch.zeros(3, 32, 32)} for _ in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert all(m.size(0) == 12 for m in batch["context_mask"] + batch["target_mask"])
    # Different mask sets of the same image differ (independent draws).
    assert not torch.equal(batch["target_mask"][0][0], batch["target_mask"][0][4])


def test_mask_sets__one_target_pass_and_the_loss_averages_the_sets():
    model = tiny(num_mask_sets=2)
    single = tiny()  # same weights (same seed), one mask set
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    context_mask, target_mask = model.sample_masks(6, torch.Generator().manual_seed(2))
    calls = []
    model.ijepa.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    with torch.no_grad():
        out = model(pixels, context_mask=context_mask, target_mask=target_mask)
        per_set = [single(pixels, context_mask=rows(context_mask, 3 * s, 3 * s + 3),
                          target_mask=rows(target_mask, 3 * s, 3 * s + 3)) for s in range(2)]
    assert calls == [3]  # the target encoder ran once, on the 3 images
    assert out.target_hidden_states.shape[0] == 4 * 1 * 6 and out.context_hidden_states.shape[0] == 6
    torch.testing.assert_close(out.loss, (per_set[0].loss + per_set[1].loss) / 2, rtol=1e-6, atol=1e-7)


def test_mask_sets__sampled_masks_cover_every_set():
    model = tiny(num_mask_sets=2)
    out = model(torch.randn(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert all(m.size(0) == 4 for m in out.context_mask + out.target_mask) and out.loss.isfinite()


def test_target_layers__default_is_the_official_target():
    model = tiny()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.ijepa(pixels).last_hidden_state
        expected = F.layer_norm(expected, (expected.size(-1),), eps=TARGET_LAYER_NORM_EPS)
        assert torch.equal(model.target_features(pixels), expected)


def test_target_layers__average_of_instance_normed_last_layers_then_layer_norm():
    model = tiny(target_num_layers=2)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model.ijepa(pixels, output_hidden_states=True).hidden_states  # (embeddings, layer 1..3)
        normed = []
        for layer in hidden[-2:]:  # layers 2 and 3, by hand: standardise each feature over the 64 patches
            mean, var = layer.mean(dim=1, keepdim=True), layer.var(dim=1, unbiased=False, keepdim=True)
            normed.append((layer - mean) / torch.sqrt(var + 1e-5))
        average = (normed[0] + normed[1]) / 2
        mean, var = average.mean(-1, keepdim=True), average.var(-1, unbiased=False, keepdim=True)
        expected = (average - mean) / torch.sqrt(var + TARGET_LAYER_NORM_EPS)
        torch.testing.assert_close(model.target_features(pixels), expected, rtol=1e-5, atol=1e-5)
        # Not the final layer-normed output: the option changes what is predicted.
        assert not torch.allclose(model.target_features(pixels), tiny().target_features(pixels), atol=1e-3)


def test_target_layers__more_than_the_encoder_has_is_refused():
    from huggingface_hub.errors import StrictDataclassClassValidationError  # what @strict configs raise

    with pytest.raises(StrictDataclassClassValidationError, match="target_num_layers=4 exceeds num_hidden_layers=3"):
        ijepa_config_from_preset("tiny-cpu", num_hidden_layers=3, target_num_layers=4)


# ---- short-run schedules (issue 21): each a pure function of the step, off by default


def test_ema_ramp__default_is_the_official_ramp_over_the_whole_schedule():
    from modeling_ijepa.modeling_ijepa import ema_momentum
    from modeling_ijepa.training.schedules import ema_momentum_at

    for step in (0, 1, 250, 999):
        assert ema_momentum_at(step, start=0.996, end=1.0, total_steps=1000.0) == ema_momentum(step, 1000.0)
    assert ema_momentum_at(500, start=0.996, end=1.0, total_steps=1000.0) == pytest.approx(0.998)


def test_ema_ramp__reaches_the_end_after_the_ramp_then_holds():
    from modeling_ijepa.training.schedules import ema_momentum_at

    def at(step):
        return ema_momentum_at(step, start=0.99, end=0.999, total_steps=2000.0, ramp_steps=200)

    assert at(0) == 0.99
    assert at(100) == pytest.approx(0.9945)  # halfway up the ramp
    assert at(200) == pytest.approx(0.999)
    assert at(201) == at(1999) == at(200)  # held at the end, not extrapolated past it
    assert ema_momentum_at(0, start=0.99, end=0.999, total_steps=2000.0, ramp_steps=0) == 0.999  # no ramp
    # Constant momentum (start == end) and "no EMA" (0 -> 0: targets from the context encoder) are plain values.
    assert ema_momentum_at(700, start=0.996, end=0.996, total_steps=1000.0) == 0.996
    assert ema_momentum_at(700, start=0.0, end=0.0, total_steps=1000.0) == 0.0


def test_ema_ramp__command_line_reaches_the_schedules():
    from modeling_ijepa.training import arguments

    def schedules(*extra):
        args = arguments.PretrainingArguments(per_device_train_batch_size=64, max_steps=1000, warmup_steps=20,
                                              **dict(extra))
        return arguments.resolve_schedules(args, None, 64)

    official = schedules()
    assert official.ema_ramp_steps is None and official.warmup_steps == 20
    assert official.at(500)["momentum"] == pytest.approx(0.998)
    ramped = schedules(("ema_momentum_ramp_steps", 250))
    assert [ramped.at(s)["momentum"] for s in (0, 125, 250, 900)] == pytest.approx([0.996, 0.998, 1.0, 1.0])
    # Warm-up in steps: linear from start_lr to the peak over 20 steps, then cosine.
    assert ramped.at(9)["lr"] == pytest.approx(ramped.start_lr + 0.5 * (ramped.peak_lr - ramped.start_lr))
    assert ramped.at(19)["lr"] == pytest.approx(ramped.peak_lr)


def test_ema_ramp__a_negative_ramp_is_refused_in_one_line(tmp_path):
    from modeling_ijepa.training import arguments
    from modeling_ijepa.training.validation import ArgumentError, validate_arguments

    parsed = arguments.parse_arguments(["--dataset_name", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
                                        "--max_steps", "10", "--ema_momentum_ramp_steps", "-5"])
    with pytest.raises(ArgumentError) as caught:
        validate_arguments(*parsed)
    assert caught.value.problems == ["--ema_momentum_ramp_steps -5: must be >= 0 optimizer steps (or absent for the "
                                     "official ramp)"]
