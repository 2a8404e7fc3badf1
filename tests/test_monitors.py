"""Health monitors: RankMe against a direct SVD computation and on collapsed batches, the collapse threshold, and
DINO's weighted cosine k-NN against a hand computation and on separable / random-label data."""

import math

import numpy as np
import pytest
import torch

from modeling_ijepa.monitors import (
    DEFAULT_COLLAPSE_FRACTION,
    RANKME_EPS,
    knn_accuracy,
    knn_class_scores,
    rankme,
    rankme_signals_collapse,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def numpy_rankme(matrix: np.ndarray, eps: float = RANKME_EPS) -> float:
    # Garrido et al. 2023, Eq. 1, written independently with numpy's SVD.
    singular_values = np.linalg.svd(matrix, compute_uv=False)
    p = singular_values / singular_values.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def test_rankme__equals_direct_numpy_svd():
    matrix = np.random.default_rng(0).normal(size=(40, 12))
    assert rankme(torch.from_numpy(matrix)) == pytest.approx(numpy_rankme(matrix), rel=1e-12)
    # float32 input on its way in, same number to float32 precision.
    assert rankme(torch.from_numpy(matrix).float()) == pytest.approx(numpy_rankme(matrix), rel=1e-6)


def test_rankme__known_spectrum_by_hand():
    # Singular values (3, 1): p = (0.75, 0.25) (+ eps), RankMe = exp(H(p)) = 1.7548...
    matrix = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    p = np.array([0.75, 0.25]) + RANKME_EPS
    expected = math.exp(-(p * np.log(p)).sum())
    assert rankme(matrix) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(1.7548, abs=1e-4)


@pytest.mark.parametrize("rank", [1, 5, 20])
def test_rankme__rank_r_matrix_with_equal_singular_values_is_r(rank):
    generator = torch.Generator().manual_seed(rank)
    left, _ = torch.linalg.qr(torch.randn(256, rank, generator=generator, dtype=torch.float64))  # (256, r)
    right, _ = torch.linalg.qr(torch.randn(384, rank, generator=generator, dtype=torch.float64))  # (384, r)
    features = left @ right.T  # rank r, all r singular values 1
    # p = 1/r + eps on r values and eps on the 256 - r zero ones, whose eps * log(eps) terms add 0.04% at r = 20.
    p = np.array([1.0 / rank] * rank + [0.0] * (256 - rank)) + RANKME_EPS
    assert rankme(features) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert rankme(features) == pytest.approx(rank, rel=1e-3)


def test_rankme__gaussian_rank_r_matrix_is_close_to_r():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(256, 10, generator=generator) @ torch.randn(10, 384, generator=generator)
    assert 8.5 < rankme(features) <= 10.0


def test_rankme__drops_to_about_one_on_a_collapsed_batch():
    generator = torch.Generator().manual_seed(0)
    healthy = torch.randn(256, 128, generator=generator)
    collapsed = torch.randn(1, 128, generator=generator).expand(256, -1)  # every row the same embedding
    healthy_rank, collapsed_rank = rankme(healthy), rankme(collapsed)
    assert healthy_rank > 100.0
    assert collapsed_rank == pytest.approx(1.0, abs=1e-3)
    assert not rankme_signals_collapse(healthy_rank, 256, 128)
    assert rankme_signals_collapse(collapsed_rank, 256, 128)
    # Centered, equal rows span nothing at all.
    assert rankme(collapsed, center=True) == 0.0


def test_rankme__center_removes_the_common_mean():
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(256, 64, generator=generator)
    shifted = spread + 50.0 * torch.randn(1, 64, generator=generator)  # a shared offset dominates the spectrum
    assert rankme(shifted) < 5.0
    assert rankme(shifted, center=True) == pytest.approx(rankme(spread - spread.mean(0)), rel=1e-9)


def test_rankme__rejects_non_matrices():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        rankme(torch.randn(2, 3, 4))


def test_rankme_signals_collapse__threshold_is_a_fraction_of_min_n_d():
    threshold = DEFAULT_COLLAPSE_FRACTION * 128  # min(256, 128)
    assert rankme_signals_collapse(threshold - 0.01, 256, 128)
    assert not rankme_signals_collapse(threshold + 0.01, 256, 128)
    assert rankme_signals_collapse(49.0, 100, 384, threshold_fraction=0.5)  # min(N, D) = 100 -> threshold 50
    with pytest.raises(ValueError, match="threshold_fraction"):
        rankme_signals_collapse(1.0, 256, 128, threshold_fraction=0.0)


def test_knn_class_scores__five_points_by_hand():
    # Test point (1, 0). Training rows (norms differ: cosine ignores them) and their cosine similarity to it:
    # (5, 0) class 0 -> 1; (cos 60, sin 60) class 1 -> 0.5; (2 cos 60, -2 sin 60) class 1 -> 0.5;
    # (0, 1) class 2 -> 0; (-1, 0) class 0 -> -1. The top 3 are the first three.
    angle = math.radians(60)
    train = torch.tensor(
        [[5.0, 0.0], [math.cos(angle), math.sin(angle)], [2 * math.cos(angle), -2 * math.sin(angle)],
         [0.0, 1.0], [-1.0, 0.0]]
    )
    labels = torch.tensor([0, 1, 1, 2, 0])
    test = torch.tensor([[1.0, 0.0]])
    # Sharp temperature: the single closest neighbour outweighs two farther ones (a majority vote would say 1).
    sharp = knn_class_scores(train, labels, test, k=3, temperature=0.1)
    torch.testing.assert_close(sharp, torch.tensor([[math.exp(10.0), 2 * math.exp(5.0), 0.0]]), rtol=1e-5, atol=0)
    assert int(sharp.argmax()) == 0
    # Soft temperature: exp(1) = 2.72 < 2 exp(0.5) = 3.30, the two class-1 neighbours win.
    soft = knn_class_scores(train, labels, test, k=3, temperature=1.0)
    torch.testing.assert_close(soft, torch.tensor([[math.e, 2 * math.exp(0.5), 0.0]]), rtol=1e-5, atol=0)
    assert knn_accuracy(train, labels, test, torch.tensor([1]), k=3, temperature=1.0) == 1.0
    assert knn_accuracy(train, labels, test, torch.tensor([1]), k=3, temperature=0.1) == 0.0
    # k larger than the training set is capped: all five neighbours vote.
    everyone = knn_class_scores(train, labels, test, k=50, temperature=1.0)
    torch.testing.assert_close(
        everyone, torch.tensor([[math.e + math.exp(-1.0), 2 * math.exp(0.5), 1.0]]), rtol=1e-5, atol=0
    )


def clusters(num_per_class, num_classes=10, dim=32, spread=0.2, seed=0):
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def test_knn_accuracy__well_separated_clusters_reach_100_percent():
    train_x, train_y = clusters(100)
    test_x, test_y = clusters(50, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y) == 1.0
    # Chunking the test rows changes nothing.
    torch.testing.assert_close(
        knn_class_scores(train_x, train_y, test_x, chunk_size=7), knn_class_scores(train_x, train_y, test_x)
    )


def test_knn_accuracy__random_labels_are_at_chance():
    generator = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(2000, 32, generator=generator), torch.randn(2000, 32, generator=generator)
    train_y = torch.randint(0, 10, (2000,), generator=generator)
    test_y = torch.randint(0, 10, (2000,), generator=generator)
    # Chance is 10%; the binomial standard deviation over 2000 test rows is 0.7 points.
    assert 0.07 < knn_accuracy(train_x, train_y, test_x, test_y) < 0.13


def test_knn_accuracy__checks_shapes():
    with pytest.raises(ValueError, match="labels"):
        knn_accuracy(torch.randn(5, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(M, D\)"):
        knn_accuracy(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 4), torch.zeros(2))
