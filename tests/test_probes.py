"""Frozen-encoder probes: the paper's BatchNorm + linear protocol against a hand re-computation, the last-4-layer
features against a manual forward, V-JEPA's attentive probe on data that mean pooling cannot separate, and the
k-NN probe."""

import copy

import pytest
import torch

from modeling_ijepa import IJepaModel, ijepa_config_from_preset
from modeling_ijepa.evaluation import ProbeSettings, extract_features, linear_probe, pooled_features
from modeling_ijepa.probes import (
    BATCH_NORM_EPS,
    PAPER_LOW_LEVEL_NUM_LAYERS,
    AttentiveProbe,
    AttentiveProbeSettings,
    BatchNormLinearHead,
    batchnorm_linear_probe,
    cosine_learning_rate,
    extract_patch_tokens,
    fit_attentive_probe,
    fit_batchnorm_linear_head,
    knn_probe,
    train_attentive_probe,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def blobs(num_per_class, num_classes=4, dim=16, spread=0.3, seed=0):
    # Same class centres for every seed, with per-feature scales and offsets that a BatchNorm has to undo.
    centre_generator = torch.Generator().manual_seed(1234)
    centres = 3 * torch.randn(num_classes, dim, generator=centre_generator)
    scales = torch.logspace(-2, 2, dim)
    offsets = 10 * torch.randn(dim, generator=centre_generator)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features * scales + offsets, labels


def tiny_encoder():
    torch.manual_seed(0)
    return IJepaModel(ijepa_config_from_preset("tiny-cpu")).eval()


# --- BatchNorm + linear (paper, low-level protocol) -------------------------------------------------------------


@pytest.mark.parametrize("method", ["lbfgs", "sgd"])
def test_batchnorm_head__eval_logits_equal_hand_normalisation_then_linear(method):
    train_x, train_y = blobs(50)
    test_x, _ = blobs(10, seed=1)
    settings = ProbeSettings(method=method, sgd_epochs=5)
    head = fit_batchnorm_linear_head(train_x, train_y, num_classes=4, weight_decay=1e-4, settings=settings)
    assert not head.training and not head.norm.affine
    # By hand: standardise with the training mean and (biased) variance, then the linear layer.
    normalised = (test_x - train_x.mean(0)) / torch.sqrt(train_x.var(0, unbiased=False) + BATCH_NORM_EPS)
    expected = normalised @ head.classifier.weight.T + head.classifier.bias
    with torch.no_grad():
        torch.testing.assert_close(head(test_x), expected, atol=1e-4, rtol=1e-4)
        # A BatchNorm in train mode on the whole training set normalises exactly like the eval-mode head.
        train_mode = copy.deepcopy(head).train()
        torch.testing.assert_close(train_mode(train_x), head(train_x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lbfgs", "sgd"])
def test_batchnorm_linear_probe__separable_blobs_reach_100_percent(method):
    train_x, train_y = blobs(50)
    test_x, test_y = blobs(20, seed=1)
    settings = ProbeSettings(method=method, weight_decays=(1e-4, 1e-2), sgd_epochs=20)
    result = batchnorm_linear_probe(train_x, train_y, test_x, test_y, settings=settings)
    assert result.test_accuracy == 1.0 and result.train_accuracy == 1.0
    assert (result.num_classes, result.num_train, result.num_test, result.feature_dim) == (4, 200, 80, 16)
    assert set(result.validation_accuracy) == {"0.0001", "0.01"}
    assert result.best_weight_decay in (1e-4, 1e-2)


def test_batchnorm_linear_head__shapes():
    head = BatchNormLinearHead(feature_dim=12, num_classes=3).eval()
    assert head(torch.randn(5, 12)).shape == (5, 3)


def test_pooled_features__paper_last_4_layers_equal_a_manual_forward():
    encoder = tiny_encoder()  # tiny-cpu: 4 layers of width 128, 8 x 8 patches
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = encoder.embeddings(pixel_values)  # (3, 64, 128)
        layer_outputs = []
        for layer in encoder.layers:
            hidden = layer(hidden, None)
            layer_outputs.append(hidden)
        # Deepest first; the last layer goes through the final LayerNorm, as in `pooler_output`.
        expected = torch.cat(
            [encoder.layernorm(layer_outputs[-1]).mean(1)] + [output.mean(1) for output in layer_outputs[-2::-1]],
            dim=-1,
        )
    features = pooled_features(encoder, pixel_values, num_layers=PAPER_LOW_LEVEL_NUM_LAYERS)
    assert features.shape == (3, 4 * 128)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    extracted, labels = extract_features(
        encoder, [(pixel_values, torch.tensor([0, 1, 2]))], num_layers=PAPER_LOW_LEVEL_NUM_LAYERS
    )
    torch.testing.assert_close(extracted, expected, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [0, 1, 2]


def test_extract_patch_tokens__are_the_final_layer_normed_tokens():
    encoder = tiny_encoder()
    pixel_values = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens, labels = extract_patch_tokens(
        encoder, [{"pixel_values": pixel_values[:2], "labels": [0, 1]}, (pixel_values[2:], torch.tensor([2, 3, 4]))]
    )
    with torch.no_grad():
        expected = encoder(pixel_values).last_hidden_state
    assert tokens.shape == (5, 64, 128) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [0, 1, 2, 3, 4]
    half, none = extract_patch_tokens(encoder, [pixel_values], dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and none is None


# --- attentive probe (V-JEPA) -----------------------------------------------------------------------------------


def one_token_carries_the_class(num_examples, num_classes=4, num_tokens=16, dim=16, seed=0):
    """Token sets `(N, num_tokens, dim)` whose label is carried by ONE token at a random position.

    Every token is a class code (one-hot * 2 in dims 1..num_classes, plus noise); the distractors carry random
    classes and only the signal token, flagged by +3 in dim 0, carries the label. The mean over tokens mixes the
    label with 15 random codes, so a linear probe on mean-pooled tokens is far from perfect; attending to the
    flagged token recovers the label.
    """
    generator = torch.Generator().manual_seed(seed)
    codes = torch.zeros(num_classes, dim)
    codes[:, 1:num_classes + 1] = 2.0 * torch.eye(num_classes)
    labels = torch.randint(0, num_classes, (num_examples,), generator=generator)
    token_classes = torch.randint(0, num_classes, (num_examples, num_tokens), generator=generator)
    signal_position = torch.randint(0, num_tokens, (num_examples,), generator=generator)
    rows = torch.arange(num_examples)
    token_classes[rows, signal_position] = labels
    tokens = codes[token_classes] + 0.1 * torch.randn(num_examples, num_tokens, dim, generator=generator)
    tokens[rows, signal_position, 0] += 3.0
    return tokens, labels


def test_attentive_probe__one_informative_token_beats_mean_pooled_linear_probe():
    train_tokens, train_labels = one_token_carries_the_class(256)
    test_tokens, test_labels = one_token_carries_the_class(512, seed=1)
    # Fewer, larger steps than V-JEPA's defaults so that the test stays near a second.
    settings = AttentiveProbeSettings(epochs=20, batch_size=32, learning_rate=5e-3, num_heads=1)
    attentive = fit_attentive_probe(train_tokens, train_labels, test_tokens, test_labels, settings=settings)
    mean_pooled = linear_probe(
        train_tokens.mean(1), train_labels, test_tokens.mean(1), test_labels,
        settings=ProbeSettings(weight_decays=(1e-4, 1e-2)),
    )
    assert attentive.test_accuracy >= 0.98
    # Chance is 25%; the label is 1 of 16 codes in the mean.
    assert mean_pooled.test_accuracy < 0.5
    assert (attentive.num_train, attentive.num_test, attentive.num_tokens, attentive.feature_dim) == (256, 512, 16, 16)
    assert attentive.num_classes == 4 and attentive.to_dict()["test_accuracy"] == attentive.test_accuracy


def test_attentive_probe__shapes_and_token_order_invariance():
    probe = AttentiveProbe(hidden_size=128, num_classes=10).eval()
    assert probe.num_heads == 2  # 128 / 64-d heads
    tokens = torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, pooled = probe(tokens), probe.pool(tokens)
        # No positions inside the probe: it pools a set, so shuffling the tokens changes nothing.
        shuffled = probe(tokens[:, torch.randperm(64, generator=torch.Generator().manual_seed(1))])
    assert logits.shape == (3, 10) and pooled.shape == (3, 128)
    torch.testing.assert_close(shuffled, logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        AttentiveProbe(hidden_size=10, num_classes=2, num_heads=3)


def test_train_attentive_probe__is_seeded_and_leaves_the_global_rng_alone():
    tokens, labels = one_token_carries_the_class(64)
    settings = AttentiveProbeSettings(epochs=2, batch_size=16, seed=3)
    before = torch.random.get_rng_state()
    first = train_attentive_probe(tokens, labels, num_classes=4, settings=settings)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = train_attentive_probe(tokens, labels, num_classes=4, settings=settings)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert not first.training


def test_cosine_learning_rate__starts_at_base_ends_at_zero():
    assert cosine_learning_rate(0, 100, 1e-3) == pytest.approx(1e-3)
    assert cosine_learning_rate(50, 100, 1e-3) == pytest.approx(5e-4)
    assert cosine_learning_rate(100, 100, 1e-3) == pytest.approx(0.0, abs=1e-12)


# --- k-NN probe -------------------------------------------------------------------------------------------------


def test_knn_probe__separable_blobs_reach_100_percent():
    train_x, train_y = blobs(50, spread=0.1)
    test_x, test_y = blobs(20, spread=0.1, seed=1)
    # Cosine k-NN needs directions, not offsets: centre with the training mean, as a BatchNorm would.
    mean = train_x.mean(0)
    result = knn_probe(train_x - mean, train_y, test_x - mean, test_y)
    assert result.test_accuracy == 1.0
    assert result.to_dict() == {
        "test_accuracy": 1.0, "k": 20, "temperature": 0.07, "num_train": 200, "num_test": 80, "feature_dim": 16,
        "num_classes": 4,
    }
