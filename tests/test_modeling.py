"""Core models: shapes, save/load, Auto classes, parity with transformers' IJepaModel, predictor/loss/EMA against
plain re-computations, learning on a fixed batch, and clear errors for bad input."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors import safe_open

import modeling_ijepa
from modeling_ijepa import (
    IJepaConfig,
    IJepaForImageClassification,
    IJepaForPreTraining,
    IJepaMaskCollator,
    IJepaModel,
    ema_momentum,
    ijepa_config_from_preset,
    sincos_position_embeddings,
)
from modeling_ijepa.masking_ijepa import MaskSamplingSettings, sample_masks
from modeling_ijepa.modeling_ijepa import layer_outputs_for_trailing_tokens, resample_position_embeddings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 3


def tiny_config(**overrides) -> IJepaConfig:
    # 8x8 patch grid like the tiny-cpu preset, narrower for speed.
    values = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pred_hidden_size=16, pred_num_hidden_layers=2, pred_num_attention_heads=4,
    )
    values.update(overrides)
    return ijepa_config_from_preset("tiny-cpu", **values)


def images(batch=BATCH, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def masks_for(config, batch=BATCH, seed=0):
    collator = IJepaMaskCollator(config, seed=seed)
    return collator.sample(batch)


def run_without_package(code: str) -> str:
    """Run `code` in a fresh interpreter where `import modeling_ijepa` fails (the package is installed editable)."""
    prelude = "import sys\nsys.modules['modeling_ijepa'] = None\n"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, env=env, cwd="/", timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# --------------------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_are_the_paper_vith14_run():
    config = IJepaConfig()
    assert config.model_type == "ijepa" and isinstance(config, transformers.IJepaConfig)
    assert config.layer_norm_eps == 1e-6 and config.qkv_bias is True
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size) == (1280, 32, 14)
    assert config.pred_hidden_size == 384 and config.pred_num_hidden_layers == 12
    assert config.pred_num_attention_heads == config.num_attention_heads == 16
    assert config.pred_mlp_ratio == 4.0
    assert config.num_context_blocks == 1 and config.context_block_scale == (0.85, 1.0)
    assert config.num_target_blocks == 4 and config.target_block_scale == (0.15, 0.2)
    assert config.target_block_aspect_ratio == (0.75, 1.5)
    assert config.min_keep == 10 and config.allow_overlap is False and config.loss_type == "smooth_l1"
    assert config.patch_grid == (16, 16)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vit-base-16", (768, 12, 12, 16, 224, 384, 12)),
        ("vit-large-16", (1024, 24, 16, 16, 224, 384, 12)),
        ("vit-huge-14", (1280, 32, 16, 14, 224, 384, 12)),
        ("vit-huge-16-448", (1280, 32, 16, 16, 448, 384, 12)),
        ("vit-giant-16", (1408, 40, 16, 16, 224, 384, 16)),
    ],
)
def test_presets_match_paper_sizes(name, expected):
    c = ijepa_config_from_preset(name)
    got = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.image_size,
           c.pred_hidden_size, c.pred_num_hidden_layers)
    assert got == expected


def test_config_json_round_trip_keeps_tuples(tmp_path):
    config = tiny_config(target_block_scale=(0.2, 0.3))
    config.save_pretrained(tmp_path)
    loaded = IJepaConfig.from_pretrained(tmp_path)
    assert loaded.target_block_scale == (0.2, 0.3) and loaded.pred_hidden_size == 16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=30), "not divisible by patch_size"),
        (dict(hidden_size=30), "not divisible by num_attention_heads"),
        (dict(pred_hidden_size=18), "pred_hidden_size=18 is not divisible"),
        (dict(target_block_scale=(0.2, 1.5)), "0 < min <= max <= 1"),
        (dict(context_block_scale=(0.0, 0.5)), "0 < min <= max <= 1"),
        (dict(min_keep=64), "min_keep=64 must be in"),
        (dict(loss_type="l1"), "loss_type"),
        (dict(mask_sampling="random"), "mask_sampling"),
    ],
)
def test_config_validation_says_what_to_fix(overrides, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**overrides)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="vit-huge-14"):
        ijepa_config_from_preset("vit-enormous")


# --------------------------------------------------------------------------------------------------------------------
# Shapes


def test_encoder_shapes_with_and_without_context_mask():
    config = tiny_config()
    model = IJepaModel(config).eval()
    pixel_values = images()
    out = model(pixel_values)
    assert out.last_hidden_state.shape == (BATCH, 64, 32)
    assert out.pooler_output.shape == (BATCH, 32)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(1))

    masks = [torch.arange(10).repeat(BATCH, 1), torch.arange(20, 30).repeat(BATCH, 1)]
    masked = model(pixel_values, context_mask=masks)
    assert masked.last_hidden_state.shape == (2 * BATCH, 10, 32)
    single = model(pixel_values, context_mask=masks[1])
    torch.testing.assert_close(single.last_hidden_state, masked.last_hidden_state[BATCH:])

    hidden = model(pixel_values, output_hidden_states=True)
    assert len(hidden.hidden_states) == config.num_hidden_layers + 1
    assert hidden.hidden_states[0].shape == (BATCH, 64, 32)
    model.set_attn_implementation("eager")  # sdpa cannot return attention weights
    attentions = model(pixel_values, context_mask=masks, output_attentions=True).attentions
    assert len(attentions) == config.num_hidden_layers
    assert attentions[0].shape == (2 * BATCH, config.num_attention_heads, 10, 10)


def test_pretraining_output_shapes_official_order():
    config = tiny_config(num_context_blocks=2, num_target_blocks=3)
    model = IJepaForPreTraining(config)
    context_mask, target_mask = masks_for(config)
    out = model(images(), context_mask=context_mask, target_mask=target_mask, output_hidden_states=True)
    kc, kt = context_mask[0].size(1), target_mask[0].size(1)
    assert out.loss.shape == ()
    assert out.predicted_hidden_states.shape == (3 * 2 * BATCH, kt, 32)
    assert out.target_hidden_states.shape == (3 * 2 * BATCH, kt, 32)
    assert out.context_hidden_states.shape == (2 * BATCH, kc, 32)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.hidden_states[0].shape == (2 * BATCH, kc, 32)


def test_pretraining_samples_masks_when_none_given():
    config = tiny_config()
    model = IJepaForPreTraining(config)
    out = model(images(), generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(out.loss)
    assert len(out.context_mask) == 1 and len(out.target_mask) == 4
    again = model(images(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.loss, again.loss)


def test_classifier_shapes_and_loss():
    config = tiny_config(num_labels=5)
    model = IJepaForImageClassification(config)
    out = model(images(), labels=torch.tensor([0, 1, 4]))
    assert out.logits.shape == (BATCH, 5) and out.loss.shape == ()
    torch.testing.assert_close(out.logits, model.classifier(model.ijepa(images()).pooler_output))


# --------------------------------------------------------------------------------------------------------------------
# Initialisation and structure


def test_target_encoder_is_frozen_copy_in_eval_mode():
    model = IJepaForPreTraining(tiny_config())
    assert model.target_encoder is model.ijepa
    for (name, target), context in zip(model.ijepa.named_parameters(), model.context_encoder.parameters()):
        assert torch.equal(target, context), name
        assert not target.requires_grad
    model.train()
    assert model.context_encoder.training and not model.ijepa.training
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in model.ijepa.parameters()}
    # Fixed sin-cos tables are not trained.
    assert id(model.context_encoder.embeddings.position_embeddings) not in trainable
    assert id(model.predictor.position_embeddings) not in trainable
    assert id(model.predictor.mask_token) in trainable


def test_init_follows_official_recipe():
    config = tiny_config(hidden_size=256, intermediate_size=512, pred_hidden_size=128)
    model = IJepaForPreTraining(config)
    layer = model.context_encoder.layers[1]
    for linear in (layer.attention.q_proj, layer.mlp.fc2, model.predictor.input_projection):
        assert abs(linear.weight.std().item() - 0.02) < 0.002
        assert torch.all(linear.bias == 0)
    assert torch.all(layer.layernorm_before.weight == 1) and torch.all(layer.layernorm_before.bias == 0)
    assert abs(model.predictor.mask_token.std().item() - 0.02) < 0.006
    table = sincos_position_embeddings(256, 8, 8)
    torch.testing.assert_close(model.context_encoder.embeddings.position_embeddings[0], table)
    torch.testing.assert_close(model.predictor.position_embeddings[0], sincos_position_embeddings(128, 8, 8))

    rescaled = IJepaForPreTraining(tiny_config(hidden_size=256, intermediate_size=512, rescale_init_by_depth=True))
    std_l2 = rescaled.context_encoder.layers[1].attention.o_proj.weight.std().item()
    assert abs(std_l2 - 0.02 / 2.0) < 0.002  # layer 2: divided by sqrt(2 * 2)


def test_sincos_table_matches_closed_form():
    dim, grid = 8, 4
    table = sincos_position_embeddings(dim, grid, grid)
    omega = [1.0 / 10000 ** (k / 2) for k in range(2)]
    for row in range(grid):
        for col in range(grid):
            expected = (
                [torch.sin(torch.tensor(col * w, dtype=torch.float64)) for w in omega]
                + [torch.cos(torch.tensor(col * w, dtype=torch.float64)) for w in omega]
                + [torch.sin(torch.tensor(row * w, dtype=torch.float64)) for w in omega]
                + [torch.cos(torch.tensor(row * w, dtype=torch.float64)) for w in omega]
            )
            torch.testing.assert_close(table[row * grid + col], torch.stack(expected).float())


# --------------------------------------------------------------------------------------------------------------------
# Predictor, loss and EMA against plain re-computations


def plain_layer_norm(x, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def plain_smooth_l1(a, b):
    diff = (a - b).abs()
    return torch.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).mean()


@pytest.mark.parametrize("loss_type", ["smooth_l1", "mse"])
def test_predictor_and_loss_match_plain_loops(loss_type):
    torch.manual_seed(0)
    config = tiny_config(num_context_blocks=2, num_target_blocks=3, loss_type=loss_type)
    model = IJepaForPreTraining(config).eval()
    # Make the target encoder differ from the context encoder so the test sees which one is used.
    model.update_target_encoder(0.0)
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pixel_values = images()
    context_mask, target_mask = masks_for(config)
    out = model(pixel_values, context_mask=context_mask, target_mask=target_mask)

    predictor = model.predictor
    pos = predictor.position_embeddings[0]
    expected_pred, expected_target = [], []
    with torch.no_grad():
        full_target = model.ijepa(pixel_values).last_hidden_state
        for t, tmask in enumerate(target_mask):
            for c, cmask in enumerate(context_mask):
                for b in range(BATCH):
                    # Context encoder on this sample's context patches only.
                    z = model.context_encoder(pixel_values[b : b + 1], context_mask=[cmask[b : b + 1]]).last_hidden_state[0]
                    tokens = predictor.input_projection(z) + pos[cmask[b]]
                    queries = predictor.mask_token[0] + pos[tmask[b]]
                    x = torch.cat([tokens, queries])[None]
                    for layer in predictor.layers:
                        x = layer(x, None)
                    x = predictor.output_projection(predictor.layernorm(x))[0, len(cmask[b]):]
                    expected_pred.append(x)
                    expected_target.append(plain_layer_norm(full_target[b])[tmask[b]])
    expected_pred = torch.stack(expected_pred)
    expected_target = torch.stack(expected_target)
    torch.testing.assert_close(out.predicted_hidden_states, expected_pred, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.target_hidden_states, expected_target, atol=1e-5, rtol=1e-5)
    if loss_type == "smooth_l1":
        expected_loss = plain_smooth_l1(expected_pred, expected_target)
    else:
        expected_loss = ((expected_pred - expected_target) ** 2).mean()
    torch.testing.assert_close(out.loss, expected_loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_trailing_token_layer_equals_full_layer_slice(attn_implementation):
    # The predictor's last layer computes only the target tokens' outputs; values and gradients must equal running
    # the whole layer and slicing.
    torch.manual_seed(0)
    config = tiny_config()
    model = IJepaForPreTraining(config).train()
    model.set_attn_implementation(attn_implementation)
    layer = model.predictor.layers[-1]
    layer_config = model.predictor.layer_config
    layer_config._attn_implementation = attn_implementation
    x = torch.randn(5, 11, config.pred_hidden_size)
    first_output = 7
    results = []
    for compute in (
        lambda h: layer(h, None)[:, first_output:],
        lambda h: layer_outputs_for_trailing_tokens(layer, h, first_output),
    ):
        h = x.clone().requires_grad_(True)
        layer.zero_grad()
        out = compute(h)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), h.grad, [p.grad.clone() for p in layer.parameters()]))
    (full_out, full_input_grad, full_grads), (ours_out, ours_input_grad, ours_grads) = results
    assert ours_out.shape == (5, 4, config.pred_hidden_size)
    torch.testing.assert_close(ours_out, full_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_input_grad, full_input_grad, atol=1e-6, rtol=1e-5)
    for a, b in zip(ours_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_ema_update_matches_formula_and_schedule():
    model = IJepaForPreTraining(tiny_config())
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(torch.randn_like(p))
    before_target = [p.clone() for p in model.ijepa.parameters()]
    context = [p.clone() for p in model.context_encoder.parameters()]
    model.update_target_encoder(0.9)
    for new, old, ctx in zip(model.ijepa.parameters(), before_target, context):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * ctx)
    with pytest.raises(ValueError, match="momentum"):
        model.update_target_encoder(1.5)
    assert ema_momentum(0, 1000) == 0.996
    assert ema_momentum(1000, 1000) == 1.0
    assert abs(ema_momentum(250, 1000) - (0.996 + 250 * 0.004 / 1000)) < 1e-12


def test_fixed_batch_overfits_and_target_moves_only_through_ema():
    torch.manual_seed(0)
    config = ijepa_config_from_preset("tiny-cpu")
    model = IJepaForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    batch = IJepaMaskCollator(config, seed=0)([{"pixel_values": x} for x in images(batch=16)])
    target_start = [p.clone() for p in model.ijepa.parameters()]
    losses = []
    for step in range(30):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            # No EMA yet: the optimizer alone must not have touched the target encoder.
            assert all(torch.equal(a, b) for a, b in zip(model.ijepa.parameters(), target_start))
        model.update_target_encoder(0.996)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    moved = sum((a - b).abs().sum().item() for a, b in zip(model.ijepa.parameters(), target_start))
    assert moved > 0


# --------------------------------------------------------------------------------------------------------------------
# Parity with transformers' IJepaModel and both key layouts


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_parity_ours_to_transformers_and_back(tmp_path):
    config = tiny_config()
    ours = IJepaModel(config).eval()
    pixel_values = images()
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.IJepaModel.from_pretrained(tmp_path / "ours").eval()
    assert type(theirs).__module__.startswith("transformers.")
    assert max_diff(ours(pixel_values).last_hidden_state, theirs(pixel_values).last_hidden_state) < 1e-5

    # transformers' own save (4.x key layout by default), then 5.x layout: both load into ours.
    theirs.save_pretrained(tmp_path / "v4")
    theirs.save_pretrained(tmp_path / "v5", save_original_format=False)
    with safe_open(str(tmp_path / "v4" / "model.safetensors"), "pt") as f:
        assert any(".attention.attention.query." in k for k in f.keys())
    with safe_open(str(tmp_path / "v5" / "model.safetensors"), "pt") as f:
        assert any(".attention.q_proj." in k for k in f.keys())
    for layout in ("v4", "v5"):
        back, info = IJepaModel.from_pretrained(tmp_path / layout, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (layout, info)
        assert max_diff(back(pixel_values).last_hidden_state, theirs(pixel_values).last_hidden_state) < 1e-5


def test_hub_layout_never_loads_random_weights(tmp_path):
    """A checkpoint in the Hub's 4.x layout must load with every weight, into every class that reads an encoder."""
    config = tiny_config()
    reference = transformers.IJepaModel(transformers.IJepaConfig(**config.to_diff_dict())).eval()
    reference.save_pretrained(tmp_path)  # 4.x layout, like facebook/ijepa_vith14_1k
    pixel_values = images()
    expected = reference(pixel_values).last_hidden_state
    ours = modeling_ijepa.IJepaModel.from_pretrained(tmp_path)
    assert max_diff(ours(pixel_values).last_hidden_state, expected) < 1e-5
    auto = transformers.AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, IJepaModel)
    assert max_diff(auto(pixel_values).last_hidden_state, expected) < 1e-5


def test_pretraining_round_trip_and_encoder_views(tmp_path):
    config = tiny_config()
    model = IJepaForPreTraining(config).eval()
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))  # context != target, so we can tell which one loads
    model.save_pretrained(tmp_path)
    pixel_values = images()
    context_mask, target_mask = masks_for(config)
    reloaded, info = IJepaForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in reloaded.ijepa.parameters())
    torch.testing.assert_close(
        model(pixel_values, context_mask=context_mask, target_mask=target_mask).loss,
        reloaded(pixel_values, context_mask=context_mask, target_mask=target_mask).loss,
    )
    target_out = model.ijepa(pixel_values).last_hidden_state
    encoder, info = IJepaModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert max_diff(encoder(pixel_values).last_hidden_state, target_out) == 0
    builtin = transformers.IJepaModel.from_pretrained(tmp_path)
    assert max_diff(builtin(pixel_values).last_hidden_state, target_out) < 1e-5
    classifier, info = IJepaForImageClassification.from_pretrained(tmp_path, num_labels=3, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert max_diff(classifier.ijepa(pixel_values).last_hidden_state, target_out) == 0


def test_auto_classes_with_import(tmp_path):
    config = tiny_config()
    IJepaForPreTraining(config).save_pretrained(tmp_path)
    assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), IJepaConfig)
    assert isinstance(transformers.AutoModel.from_pretrained(tmp_path), IJepaModel)
    assert isinstance(transformers.AutoModelForPreTraining.from_pretrained(tmp_path), IJepaForPreTraining)
    assert isinstance(
        transformers.AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=2),
        IJepaForImageClassification,
    )


def test_auto_model_without_import_gives_builtin_encoder(tmp_path):
    config = tiny_config()
    model = IJepaForPreTraining(config).eval()
    model.save_pretrained(tmp_path)
    pixel_values = images()
    torch.save(pixel_values, tmp_path / "x.pt")
    expected = model.ijepa(pixel_values).last_hidden_state
    torch.save(expected, tmp_path / "expected.pt")
    out = run_without_package(
        f"""
        import torch, transformers
        model = transformers.AutoModel.from_pretrained({str(tmp_path)!r})
        assert type(model).__module__.startswith("transformers.models.ijepa"), type(model)
        x = torch.load({str(tmp_path / 'x.pt')!r})
        diff = (model(x).last_hidden_state - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max().item()
        print("DIFF", diff)
        """
    )
    diff = float(out.split("DIFF")[1])
    assert diff < 1e-5


# --------------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture(scope="module")
def small_model():
    return IJepaForPreTraining(tiny_config()).eval()


def good_masks():
    context = [torch.arange(0, 20).repeat(BATCH, 1)]
    target = [torch.arange(40 + 4 * i, 44 + 4 * i).repeat(BATCH, 1) for i in range(4)]
    return context, target


def test_good_handmade_masks_pass(small_model):
    context, target = good_masks()
    assert torch.isfinite(small_model(images(), context_mask=context, target_mask=target).loss)


@pytest.mark.parametrize(
    "case, message",
    [
        ("channels", "channel"),
        ("image_size", "doesn't match model"),
        ("out_of_range", "patch indices in"),
        ("negative", "patch indices in"),
        ("overlap", "overlaps the context"),
        ("empty_list", "empty list"),
        ("empty_mask", "keeps no patch"),
        ("batch", "pixel_values has 3 images"),
        ("only_one_mask", "Pass both"),
        ("float_mask", "integer patch indices"),
        ("ndim", r"\(batch, channels, height, width\)"),
    ],
)
def test_bad_input_raises_clear_error(small_model, case, message):
    pixel_values = images()
    context, target = good_masks()
    kwargs = dict(context_mask=context, target_mask=target)
    if case == "channels":
        pixel_values = torch.randn(BATCH, 1, 32, 32)
    elif case == "image_size":
        pixel_values = torch.randn(BATCH, 3, 48, 48)
    elif case == "out_of_range":
        target[0] = target[0] + 30
    elif case == "negative":
        context[0] = context[0] - 1
    elif case == "overlap":
        target[0] = torch.arange(10, 14).repeat(BATCH, 1)
    elif case == "empty_list":
        kwargs["target_mask"] = []
    elif case == "empty_mask":
        target[1] = torch.zeros(BATCH, 0, dtype=torch.long)
    elif case == "batch":
        context[0] = context[0][:2]
    elif case == "only_one_mask":
        kwargs["target_mask"] = None
    elif case == "float_mask":
        target[0] = target[0].float()
    elif case == "ndim":
        pixel_values = pixel_values[0]
    with pytest.raises(ValueError, match=message):
        small_model(pixel_values, **kwargs)


def test_overlap_allowed_when_configured():
    model = IJepaForPreTraining(tiny_config(allow_overlap=True)).eval()
    context, _ = good_masks()
    target = [torch.arange(10, 14).repeat(BATCH, 1)] * 4
    assert torch.isfinite(model(images(), context_mask=context, target_mask=target).loss)


def test_interpolate_pos_encoding_accepts_other_sizes():
    model = IJepaModel(tiny_config()).eval()
    out = model(torch.randn(2, 3, 48, 48), interpolate_pos_encoding=True)
    assert out.last_hidden_state.shape == (2, 144, 32)


# 48 px images on the 32 px tiny config (patch 4): a 12x12 patch grid instead of 8x8.
LARGE_SIZE, LARGE_GRID = 48, (12, 12)


def test_resampled_predictor_positions_equal_the_encoders_resampling():
    # The predictor resamples its table exactly as transformers' encoder resamples its own (bicubic), so the
    # positions the predictor adds mean what the context features' positions mean.
    model = IJepaForPreTraining(tiny_config()).eval()
    predictor_table = model.predictor.position_embeddings.detach()
    encoder_embeddings = model.context_encoder.embeddings
    resampled = resample_position_embeddings(predictor_table, (8, 8), LARGE_GRID)
    assert resampled.shape == (1, 144, 16)
    with torch.no_grad():
        encoder_embeddings.position_embeddings.copy_(torch.nn.functional.pad(predictor_table, (0, 16)))
        encoder_resampled = encoder_embeddings.interpolate_pos_encoding(
            torch.zeros(1, 144, 32), LARGE_SIZE, LARGE_SIZE
        )
    assert torch.equal(resampled, encoder_resampled[..., :16])
    assert resample_position_embeddings(predictor_table, (8, 8), (8, 8)) is predictor_table


def test_pretraining_at_another_size__given_masks_index_the_image_grid():
    config = tiny_config()
    model = IJepaForPreTraining(config).eval()
    context_mask, target_mask = IJepaMaskCollator(
        config, seed=0, grid_height=LARGE_GRID[0], grid_width=LARGE_GRID[1]
    ).sample(BATCH)
    assert max(int(m.max()) for m in context_mask + target_mask) >= config.num_patches  # beyond the 8x8 grid
    pixel_values = images(size=LARGE_SIZE)
    out = model(pixel_values, context_mask=context_mask, target_mask=target_mask, interpolate_pos_encoding=True)
    assert torch.isfinite(out.loss)
    assert out.predicted_hidden_states.shape == (4 * BATCH, target_mask[0].size(1), 32)

    # Independent check of the predictor's positions: a copy whose stored table is the bicubic 12x12 one, called
    # without a grid, predicts the same.
    table = model.predictor.position_embeddings.detach().reshape(1, 8, 8, 16).permute(0, 3, 1, 2)
    table = torch.nn.functional.interpolate(table, size=LARGE_GRID, mode="bicubic", align_corners=False)
    reference = copy.deepcopy(model.predictor)
    reference.position_embeddings = torch.nn.Parameter(table.permute(0, 2, 3, 1).reshape(1, 144, 16))
    with torch.no_grad():
        expected = reference(out.context_hidden_states, context_mask, target_mask)
    torch.testing.assert_close(out.predicted_hidden_states, expected, atol=0, rtol=0)
    targets = model.compute_targets(pixel_values, target_mask, 1, interpolate_pos_encoding=True)
    torch.testing.assert_close(out.target_hidden_states, targets, atol=0, rtol=0)


def test_pretraining_at_another_size__samples_masks_on_the_image_grid():
    config = tiny_config()
    model = IJepaForPreTraining(config).eval()
    out = model(images(size=LARGE_SIZE), interpolate_pos_encoding=True, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(out.loss)
    settings = MaskSamplingSettings.from_config(config, grid_height=LARGE_GRID[0], grid_width=LARGE_GRID[1])
    expected_context, expected_target, _ = sample_masks(settings, BATCH, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(out.context_mask, expected_context, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(out.target_mask, expected_target, strict=True))
    assert 0 <= min(int(m.min()) for m in out.context_mask + out.target_mask)
    assert max(int(m.max()) for m in out.context_mask + out.target_mask) < 144


def test_pretraining_at_config_size__grid_argument_changes_nothing():
    # The default path (config grid) is bitwise what it was: same sampled masks, same loss, same predictions.
    model = IJepaForPreTraining(tiny_config()).eval()
    plain = model(images(), generator=torch.Generator().manual_seed(5))
    interpolated = model(images(), interpolate_pos_encoding=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain.loss, interpolated.loss)
    assert torch.equal(plain.predicted_hidden_states, interpolated.predicted_hidden_states)


def test_attention_implementations_agree():
    config = tiny_config()
    eager = IJepaForPreTraining(config).eval()
    eager.set_attn_implementation("eager")
    sdpa = IJepaForPreTraining(tiny_config()).eval()
    sdpa.load_state_dict(eager.state_dict())
    sdpa.set_attn_implementation("sdpa")
    context_mask, target_mask = masks_for(config)
    a = eager(images(), context_mask=context_mask, target_mask=target_mask)
    b = sdpa(images(), context_mask=context_mask, target_mask=target_mask)
    assert eager.predictor.layer_config._attn_implementation == "eager"
    assert sdpa.predictor.layer_config._attn_implementation == "sdpa"
    torch.testing.assert_close(a.predicted_hidden_states, b.predicted_hidden_states, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    config = tiny_config()
    plain = IJepaForPreTraining(config).train()
    checkpointed = IJepaForPreTraining(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    layers = list(checkpointed.context_encoder.layers) + list(checkpointed.predictor.layers)
    assert all(layer.gradient_checkpointing for layer in layers)
    context_mask, target_mask = masks_for(config)
    # Count the checkpointed calls of the predictor's last layer (it runs outside `IJepaLayer.__call__`).
    last_layer, calls = checkpointed.predictor.layers[-1], []
    checkpoint_function = last_layer._gradient_checkpointing_func

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint_function(*args, **kwargs)

    last_layer._gradient_checkpointing_func = counting_checkpoint
    for model in (plain, checkpointed):
        model(images(), context_mask=context_mask, target_mask=target_mask).loss.backward()
    assert calls == [1]  # the predictor's last layer (targets-only outputs) is checkpointed too
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=name)
