"""One full pretraining step of ours against the official-style step, weights compared afterwards.

Ours: `IJepaForPreTraining` -> backward -> `torch.optim.AdamW(optimizer_param_groups(model))` with the learning rate
and weight decay set per group as `modeling_ijepa.training.step.train_step` does -> `update_target_encoder(m)`.
Official style: `OfficialStylePretraining` (fused `qkv`, naive softmax attention, predictor repeating the context per
target) -> backward -> AdamW over the official `init_opt` groups (built here from parameter names, as
`src/helper.py::init_opt` does: no decay where `'bias' in name or p.ndim == 1`) -> the per-parameter EMA loop.
Both start from the same weights and get the same pixels and masks; after 1 and after 3 steps every tensor of the
context encoder, the predictor and the target encoder (and the gradients of the first step) must agree.
"""

import types

import pytest
import torch

from modeling_ijepa import IJepaForPreTraining, MaskSamplingSettings, ijepa_config_from_preset, sample_masks
from modeling_ijepa.benchmarks.official_style import OfficialStylePretraining, load_from_ours
from modeling_ijepa.training.building import optimizer_param_groups

BATCH_SIZE = 4
# Per-step values, all different so that a group getting the wrong learning rate or weight decay shows: learning
# rates and decays in the range of the official ViT-H/14 config (lr up to 1e-3, wd 0.04 -> 0.4), momenta of its
# EMA ramp (0.996 -> 1.0).
SCHEDULE = [
    {"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.996},
    {"lr": 8e-4, "weight_decay": 0.2, "momentum": 0.997},
    {"lr": 5e-4, "weight_decay": 0.4, "momentum": 0.998},
]
# fp32: the two steps differ only in summation order (one qkv matmul vs three, SDPA vs naive softmax, gathers in
# another order): the losses agree to ~1e-7 relative and the gradients to ~3e-9 absolute (largest gradients ~1e-2).
# The weights after a step differ by up to ~6e-7, all of it in entries whose gradient is ~1e-9, i.e. below AdamW's
# eps (1e-8): there the update lr * g / (|g| + eps) turns a 1e-11 rounding difference of g into lr * 1e-11 * eps /
# (|g| + eps)^2 ~ 6e-7. WEIGHT_ATOL (no relative part, so O(1) layer-norm weights get no extra slack) leaves ~3x over
# that and is ~500x below one step's update (lr = 1e-3): a wrong learning rate, a decay on the wrong group (>= 4e-5
# on a layer-norm weight of 1) or a wrong EMA momentum (the target moves by (1 - m) * 1e-3 per step) fails; see the
# negative controls.
WEIGHT_ATOL = 2e-6
GRAD_ATOL, GRAD_RTOL = 2e-8, 1e-4
LOSS_RTOL = 1e-6


def make_config():
    # tiny-cpu, smaller still: 2 encoder layers, 2 predictor layers; the structure (4 target blocks, 1 context block,
    # qkv bias, layer norms, mask token) is the full one.
    return ijepa_config_from_preset("tiny-cpu", num_hidden_layers=2, pred_num_hidden_layers=2)


def official_param_groups(model: OfficialStylePretraining) -> list[dict]:
    """The official `init_opt` groups: encoder and predictor, decayed / not decayed (`WD_exclude`)."""
    groups = []
    for exclude in (False, True):
        for module in (model.encoder, model.predictor):
            params = [p for n, p in module.named_parameters()
                      if p.requires_grad and (("bias" in n) or (p.ndim == 1)) == exclude]
            group = {"params": params}
            if exclude:
                group.update(WD_exclude=True, weight_decay=0.0)
            groups.append(group)
    return groups


def as_official(state: dict, config) -> dict:
    """Our state dict (or a dict of our gradients) under the official-style names, through `load_from_ours`."""
    holder = OfficialStylePretraining(config)
    load_from_ours(holder, types.SimpleNamespace(state_dict=lambda: state, config=config))
    return {k: v.detach().clone() for k, v in holder.state_dict().items()}


def make_inputs(config, seed, count):
    generator = torch.Generator().manual_seed(seed)
    settings = MaskSamplingSettings.from_config(config)
    height, width = config.image_size_hw
    inputs = []
    for _ in range(count):
        pixel_values = torch.randn(BATCH_SIZE, config.num_channels, height, width, generator=generator)
        context_mask, target_mask, _ = sample_masks(settings, BATCH_SIZE, generator)
        inputs.append((pixel_values, context_mask, target_mask))
    return inputs


class Runs:
    """Both models, both optimizers, the inputs; `step()` runs one step of each."""

    def __init__(self):
        torch.manual_seed(0)
        self.config = make_config()
        self.ours = IJepaForPreTraining(self.config).train()
        self.theirs = OfficialStylePretraining(self.config)
        load_from_ours(self.theirs, self.ours)
        self.theirs.train()
        self.ours_optimizer = torch.optim.AdamW(optimizer_param_groups(self.ours))
        self.theirs_optimizer = torch.optim.AdamW(official_param_groups(self.theirs))
        self.initial = as_official(self.ours.state_dict(), self.config)
        self.inputs = make_inputs(self.config, seed=1, count=len(SCHEDULE))
        self.steps = 0
        self.losses = []
        self.first_grads = None

    def step(self):
        values = SCHEDULE[self.steps]
        pixel_values, context_mask, target_mask = self.inputs[self.steps]

        # Ours, as modeling_ijepa.training.step.train_step sets the groups.
        for group in self.ours_optimizer.param_groups:
            group["lr"] = values["lr"]
            if group["apply_weight_decay"]:
                group["weight_decay"] = values["weight_decay"]
        ours_loss = self.ours(pixel_values, context_mask=context_mask, target_mask=target_mask).loss
        ours_loss.backward()

        # Official: `lr_scheduler.step()` sets every group, `wd_scheduler.step()` those without WD_exclude.
        for group in self.theirs_optimizer.param_groups:
            group["lr"] = values["lr"]
            if not group.get("WD_exclude"):
                group["weight_decay"] = values["weight_decay"]
        theirs_loss = self.theirs.loss(pixel_values, context_mask, target_mask)
        theirs_loss.backward()

        if self.steps == 0:
            grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p))
                     for name, p in self.ours.named_parameters()}
            grads.update({name: torch.zeros_like(b) for name, b in self.ours.named_buffers()})
            self.first_grads = (
                as_official(grads, self.config),
                {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in self.theirs.named_parameters()},
            )
        self.losses.append((ours_loss.item(), theirs_loss.item()))

        self.ours_optimizer.step()
        self.ours_optimizer.zero_grad(set_to_none=True)
        self.ours.update_target_encoder(values["momentum"])
        self.theirs_optimizer.step()
        self.theirs_optimizer.zero_grad(set_to_none=True)
        self.theirs.momentum_update(values["momentum"])
        self.steps += 1

    def mismatches(self):
        ours = as_official(self.ours.state_dict(), self.config)
        theirs = self.theirs.state_dict()
        assert ours.keys() == theirs.keys()
        return {name: (ours[name] - theirs[name]).abs().max().item() for name in theirs
                if not torch.allclose(ours[name], theirs[name], rtol=0.0, atol=WEIGHT_ATOL)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def runs():
    return Runs()


def test_official_param_groups__decay_the_same_tensors_as_ours(runs):
    decayed = {id(p) for p in optimizer_param_groups(runs.ours)[0]["params"]}
    # 1 where our optimizer decays the tensor, 0 elsewhere, carried over to the official names.
    marks = {n: torch.full_like(t, float(id(t) in decayed)) for n, t in runs.ours.named_parameters()}
    marks.update({n: torch.zeros_like(t) for n, t in runs.ours.named_buffers()})
    ours_decayed = {n for n, v in as_official(marks, runs.config).items() if bool(v.all())}
    theirs_decayed = {n for n, p in runs.theirs.named_parameters()
                      if any(p is q for g in official_param_groups(runs.theirs) if not g.get("WD_exclude")
                             for q in g["params"])}
    assert ours_decayed == theirs_decayed
    assert "predictor.mask_token" in theirs_decayed  # 3-D: decayed in the official code
    assert "encoder.blocks.0.attn.qkv.bias" not in theirs_decayed


def test_one_step__gradients_and_all_weights_match(runs):
    assert runs.steps == 0
    runs.step()
    ours_loss, theirs_loss = runs.losses[0]
    assert ours_loss == pytest.approx(theirs_loss, rel=LOSS_RTOL)
    ours_grads, theirs_grads = runs.first_grads
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"{name}: {m}")
    assert any(g.abs().max() > 0 for n, g in theirs_grads.items() if n.startswith("predictor."))
    assert runs.mismatches() == {}


def test_three_steps__all_weights_match_and_moved(runs):
    while runs.steps < len(SCHEDULE):
        runs.step()
    assert runs.mismatches() == {}
    for ours_loss, theirs_loss in runs.losses:
        assert ours_loss == pytest.approx(theirs_loss, rel=LOSS_RTOL)
    # Every trained tensor and every target-encoder tensor moved; only fixed position tables may stay (the EMA of
    # two equal tables changes the target's only by rounding, in both implementations).
    final = as_official(runs.ours.state_dict(), runs.config)
    unchanged = {n for n, v in final.items() if torch.equal(v, runs.initial[n])}
    assert {"encoder.pos_embed", "predictor.predictor_pos_embed"} <= unchanged
    assert all(n.endswith("pos_embed") for n in unchanged), unchanged


def test_comparison_detects_a_wrong_weight_decay():
    """Negative control: the same three steps with the official decay applied to every group (biases and norms too)
    end outside the tolerance."""
    wrong = Runs()
    for group in wrong.theirs_optimizer.param_groups:
        group.pop("WD_exclude", None)
    while wrong.steps < len(SCHEDULE):
        wrong.step()
    mismatched = wrong.mismatches()
    # A layer-norm weight of 1 decayed for three steps: sum(lr * wd) = 4e-4 off, 200x the tolerance.
    assert mismatched.get("encoder.blocks.0.norm1.weight", 0.0) > 100 * WEIGHT_ATOL, mismatched


def test_comparison_detects_a_wrong_ema_momentum():
    """Negative control: the official EMA with momentum 0.99 instead of the schedule's ~0.997 ends outside the
    tolerance (on the target encoder, and through the targets of later steps on the trained weights too)."""
    wrong = Runs()
    momentum_update = wrong.theirs.momentum_update
    wrong.theirs.momentum_update = lambda m: momentum_update(0.99)
    while wrong.steps < len(SCHEDULE):
        wrong.step()
    mismatched = wrong.mismatches()
    assert "target_encoder.blocks.0.attn.qkv.weight" in mismatched, mismatched
