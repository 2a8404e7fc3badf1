"""Mixed precision: the loss under autocast is computed in fp32 against fp32 targets (official `train.py`)."""

import pytest
import torch

from modeling_ijepa import IJepaForPreTraining, IJepaMaskCollator, ijepa_config_from_preset
from modeling_ijepa.modeling_ijepa import prediction_loss

BATCH = 3


def tiny_config(**overrides):
    values = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pred_hidden_size=16, pred_num_hidden_layers=2, pred_num_attention_heads=4,
    )
    values.update(overrides)
    return ijepa_config_from_preset("tiny-cpu", **values)


def plain_loss(predicted, targets, loss_type):
    diff = (predicted.double() - targets.double()).abs()
    if loss_type == "mse":
        return (diff**2).mean()
    return torch.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).mean()


@pytest.mark.parametrize("loss_type", ["smooth_l1", "mse"])
def test_call__bf16_autocast_loss_uses_fp32_targets(loss_type):
    torch.manual_seed(0)
    config = tiny_config(loss_type=loss_type)
    model = IJepaForPreTraining(config).train()
    pixel_values = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    context_mask, target_mask = IJepaMaskCollator(config, seed=0).sample(BATCH)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values, context_mask=context_mask, target_mask=target_mask)
    assert out.predicted_hidden_states.dtype == torch.bfloat16  # the predictor ran in bf16
    assert out.target_hidden_states.dtype == torch.float32  # layer-normed targets stay fp32
    assert out.loss.dtype == torch.float32
    # fp32 re-computation (outside autocast, in float64) from the same predictions and targets.
    expected = plain_loss(out.predicted_hidden_states.detach().float(), out.target_hidden_states, loss_type)
    torch.testing.assert_close(out.loss.detach().double(), expected, atol=1e-6, rtol=1e-6)
    # The old computation rounded the targets to bf16 first: a different number.
    rounded = plain_loss(out.predicted_hidden_states.detach().float(),
                         out.target_hidden_states.to(torch.bfloat16).float(), loss_type)
    assert not torch.allclose(out.loss.detach().double(), rounded, atol=1e-7, rtol=1e-7)
    out.loss.backward()
    assert model.predictor.output_projection.weight.grad.dtype == torch.float32


def test_prediction_loss__fp32_inputs_are_used_as_they_are():
    predicted, targets = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    assert torch.equal(prediction_loss(predicted, targets, "smooth_l1"),
                       torch.nn.functional.smooth_l1_loss(predicted, targets))
    assert torch.equal(prediction_loss(predicted, targets, "mse"), torch.nn.functional.mse_loss(predicted, targets))


# --------------------------------------------------------------------------------------------------------------------
# --mixed_precision auto: timed on the run's own step


def test_choose_mixed_precision__picks_bf16_only_when_its_step_is_faster():
    from modeling_ijepa.training.arguments import ModelArguments
    from modeling_ijepa.training.precision import choose_mixed_precision

    model_args = ModelArguments(config_name="tiny-cpu")
    seen = []

    def timer(step_seconds):
        def time_step(model, batch_size, dtype):
            seen.append((type(model).__name__, batch_size, dtype))
            return step_seconds[dtype is not None]
        return time_step

    choice, why = choose_mixed_precision(model_args, 16, timer=timer((2.0, 1.0)), flags=["amx_bf16"])
    assert choice == "bf16" and "2000.0 ms in fp32" in why and "1000.0 ms in bf16" in why
    assert seen == [("IJepaForPreTraining", 16, None), ("IJepaForPreTraining", 16, torch.bfloat16)]
    choice, why = choose_mixed_precision(model_args, 16, timer=timer((1.0, 0.99)), flags=["amx_bf16"])
    assert choice == "no" and "using fp32" in why  # within the noise margin: never risk a slower run
    seen.clear()
    choice, why = choose_mixed_precision(model_args, 16, timer=timer((2.0, 1.0)), flags=[])
    assert choice == "no" and "not probed" in why and seen == []


def test_choose_mixed_precision__real_probe_times_both_steps():
    from modeling_ijepa.training.arguments import ModelArguments
    from modeling_ijepa.training.precision import choose_mixed_precision, time_step

    timings = {}

    def recording_timer(model, batch_size, dtype):
        timings[dtype] = time_step(model, batch_size, dtype, steps=1)
        return timings[dtype]

    narrow = ("hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,pred_hidden_size=16,"
              "pred_num_hidden_layers=2,pred_num_attention_heads=4")
    model_args = ModelArguments(config_name="tiny-cpu", config_overrides=narrow)
    choice, why = choose_mixed_precision(model_args, 4, timer=recording_timer, flags=["forced-for-test"])
    faster = timings[torch.bfloat16] * 1.05 <= timings[None]
    assert choice == ("bf16" if faster else "no"), why


def test_resolve_mixed_precision__auto_refused_with_several_processes(monkeypatch):
    from modeling_ijepa.training.arguments import ModelArguments, PretrainingArguments
    from modeling_ijepa.training.loop import resolve_mixed_precision

    assert resolve_mixed_precision(PretrainingArguments(mixed_precision="bf16"), None) == ("bf16", "")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="run once with one process"):
        resolve_mixed_precision(PretrainingArguments(mixed_precision="auto"), ModelArguments(config_name="tiny-cpu"))
