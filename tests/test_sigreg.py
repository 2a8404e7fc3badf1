"""SIGReg (LeJEPA's sketched isotropic-Gaussian regulariser, issue 21): the statistic against a plain
re-computation, its behaviour on Gaussian / collapsed / anisotropic samples, and how the option enters the loss
(off by default: the official loss bit for bit; on: gradients reach the context encoder only)."""

import math

import numpy as np
import pytest
import torch

from modeling_ijepa import IJepaForPreTraining, ijepa_config_from_preset
from modeling_ijepa.modeling_ijepa import (
    SIGREG_NUM_POINTS,
    SIGREG_T_MAX,
    TARGET_LAYER_NORM_EPS,
    prediction_loss,
    sigreg_directions,
    sigreg_statistic,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**overrides) -> IJepaForPreTraining:
    torch.manual_seed(0)
    return IJepaForPreTraining(ijepa_config_from_preset("tiny-cpu", num_hidden_layers=2, **overrides)).eval()


def epps_pulley_by_hand(samples: np.ndarray, directions: np.ndarray) -> float:
    """Plain loops in float64: for every direction, the weighted squared distance between the projections'
    empirical characteristic function and exp(-t^2/2), integrated by the trapezoid rule on [0, t_max] and doubled
    (the integrand is even in t), averaged over directions."""
    grid = [SIGREG_T_MAX * k / (SIGREG_NUM_POINTS - 1) for k in range(SIGREG_NUM_POINTS)]
    h = grid[1] - grid[0]
    per_direction = []
    for s in range(directions.shape[1]):
        x = [float(np.dot(row, directions[:, s])) for row in samples]
        values = []
        for t in grid:
            real = sum(math.cos(t * v) for v in x) / len(x)
            imag = sum(math.sin(t * v) for v in x) / len(x)
            target = math.exp(-t * t / 2)
            values.append(((real - target) ** 2 + imag**2) * target)
        integral = h * (sum(values) - (values[0] + values[-1]) / 2)
        per_direction.append(2 * integral)
    return sum(per_direction) / len(per_direction)


def test_sigreg__statistic_equals_a_plain_recomputation():
    samples = torch.randn(37, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 2, 0.5, 1, 3, 0.1])
    directions = sigreg_directions(6, 5, torch.Generator().manual_seed(1))
    expected = epps_pulley_by_hand(samples.double().numpy(), directions.double().numpy())
    assert sigreg_statistic(samples, directions).item() == pytest.approx(expected, rel=1e-5)


def test_sigreg__directions_are_unit_and_a_function_of_the_seed():
    first = sigreg_directions(32, 8, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first.norm(dim=0), torch.ones(8))
    assert torch.equal(first, sigreg_directions(32, 8, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, sigreg_directions(32, 8, torch.Generator().manual_seed(6)))


def test_sigreg__near_zero_for_gaussian_samples_large_for_collapsed_or_anisotropic():
    generator = torch.Generator().manual_seed(0)
    directions = sigreg_directions(16, 64, generator)
    gaussian = torch.randn(20_000, 16, generator=generator)
    value = sigreg_statistic(gaussian, directions).item()
    # Expected value for N Gaussian samples: sqrt(2 pi) (1 - 1/sqrt(3)) / N ~ 1.06 / N (5.3e-5 here).
    assert value < 2e-4
    collapsed = torch.full((20_000, 16), 0.3)  # every embedding the same
    anisotropic = gaussian * torch.linspace(0.05, 1.0, 16)  # most directions far narrower than unit variance
    too_wide = 3 * gaussian
    for bad in (collapsed, anisotropic, too_wide):
        assert sigreg_statistic(bad, directions).item() > 100 * value
    assert sigreg_statistic(collapsed, directions).item() > 0.4


def test_sigreg__weight_zero_is_the_official_loss_bit_for_bit():
    model = tiny()
    assert model.config.sigreg_weight == 0.0
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = model(pixels, generator=torch.Generator().manual_seed(3), sigreg_seed=7)
    assert out.sigreg is None
    assert torch.equal(out.loss, prediction_loss(out.predicted_hidden_states, out.target_hidden_states))


@pytest.mark.parametrize("where", ["pooled", "tokens"])
def test_sigreg__loss_adds_weight_times_statistic_of_the_context_embeddings(where):
    model = tiny(sigreg_weight=0.25, sigreg_num_slices=16, sigreg_on=where)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(pixels, generator=torch.Generator().manual_seed(3), sigreg_seed=7)
        again = model(pixels, generator=torch.Generator().manual_seed(3), sigreg_seed=7)
        other_seed = model(pixels, generator=torch.Generator().manual_seed(3), sigreg_seed=8)
    context = out.context_hidden_states  # (C*B, Kc, D)
    samples = context.mean(dim=1) if where == "pooled" else context.reshape(-1, context.size(-1))
    directions = sigreg_directions(context.size(-1), 16, torch.Generator().manual_seed(7))
    expected = sigreg_statistic(samples, directions)
    assert torch.equal(out.sigreg, expected)
    prediction = prediction_loss(out.predicted_hidden_states, out.target_hidden_states)
    torch.testing.assert_close(out.loss, prediction + 0.25 * expected, rtol=0, atol=1e-7)
    assert torch.equal(out.loss, again.loss)  # the seed fixes the directions
    assert not torch.equal(out.sigreg, other_seed.sigreg)


def test_sigreg__gradient_reaches_the_context_encoder_only():
    model = tiny(sigreg_weight=1.0, sigreg_num_slices=16).train()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = model(pixels, generator=torch.Generator().manual_seed(3), sigreg_seed=7)
    out.sigreg.backward()
    context_grads = [p.grad for p in model.context_encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in context_grads)
    assert all(p.grad is None for p in model.predictor.parameters())  # the predictor does not shape the embeddings
    assert all(p.grad is None for p in model.ijepa.parameters())  # the target encoder is never trained


def test_sigreg__without_ema_the_targets_are_the_context_encoder_under_stop_grad():
    """"No EMA" is --ema_momentum_start 0 --ema_momentum_end 0: the update after every step copies the context
    encoder, so the next step's targets are the context encoder's own features, computed without gradient."""
    model = tiny(sigreg_weight=0.1)
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))  # an optimizer step moved the context encoder
    model.update_target_encoder(0.0)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = model.target_features(pixels)
    with torch.no_grad():
        own = model.context_encoder(pixels).last_hidden_state
    expected = torch.nn.functional.layer_norm(own, (own.size(-1),), eps=TARGET_LAYER_NORM_EPS)
    assert torch.equal(targets, expected)
    assert not targets.requires_grad


def test_sigreg__bad_settings_are_refused_with_what_to_fix():
    from huggingface_hub.errors import StrictDataclassClassValidationError  # what @strict configs raise

    for bad in ({"sigreg_on": "cls"}, {"sigreg_weight": -1.0}, {"sigreg_num_slices": 0}):
        with pytest.raises(StrictDataclassClassValidationError, match="sigreg_on one of"):
            ijepa_config_from_preset("tiny-cpu", **bad)
