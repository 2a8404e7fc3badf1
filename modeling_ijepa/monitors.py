"""Health monitors for self-supervised pretraining: RankMe (the effective rank of a batch of embeddings) and a
weighted k-NN classifier on frozen features.

- RankMe: Garrido, Balestriero, Najman, LeCun, "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", ICML 2023, Eq. 1. It needs no labels; it falls towards 1 when the
  embeddings collapse to a point and towards r when they collapse to an r-dimensional subspace, which is the failure
  JEPA-style objectives are prone to (facebookresearch/ijepa issues #41, #55, #58). stable-pretraining logs it for
  the same reason.
- k-NN: the weighted cosine k-NN of Wu et al. 2018 as used for DINO's evaluation (Caron et al., ICCV 2021,
  `eval_knn.py::knn_classifier`): cosine similarity to the training features, the top k neighbours vote for their
  class with weight exp(similarity / T). No training, so it is the cheapest label-based check of a run.

Pure torch (no sklearn), so that the pretraining loop can call both every N steps on whatever device it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Garrido et al. 2023, Eq. 1: a small epsilon added to the normalised singular values keeps log(p) finite when some
# singular values are exactly 0 (rank-deficient batches).
RANKME_EPS = 1e-7
# PROVISIONAL: a RankMe below this fraction of min(num_samples, feature_dim) is reported as collapse. 0.1 is a
# placeholder chosen only so that full collapse (RankMe ~ 1) and collapse to a handful of directions are flagged for
# the batch sizes used here (N = 256, D = 128-384 gives a threshold of 12.8-25.6); it has not yet been measured
# against healthy and collapsed I-JEPA runs. Replace it, with the measurement in this comment, once it has.
DEFAULT_COLLAPSE_FRACTION = 0.1
# DINO's k-NN protocol (Caron et al. 2021, Sec. 4.1 / `eval_knn.py` defaults): 20 neighbours, temperature 0.07.
DEFAULT_KNN_K = 20
DEFAULT_KNN_TEMPERATURE = 0.07
# Test rows scored per chunk: the (chunk, num_train) similarity matrix is 40 MB in float32 for 10k training features,
# small enough for any device while keeping the matrix product large enough to be efficient.
DEFAULT_KNN_CHUNK_SIZE = 1024


@torch.no_grad()
def rankme(features: torch.Tensor, eps: float = RANKME_EPS, center: bool = False) -> float:
    """RankMe (Garrido et al. 2023, Eq. 1): `exp(-sum_k p_k log p_k)` with `p_k = s_k / sum(s) + eps`, where `s` are
    the singular values of the feature matrix.

    Args:
        features: `(N, D)` embeddings of one batch (e.g. mean-pooled target-encoder tokens), any device and float
            dtype.
        eps: added to each normalised singular value, as in the paper.
        center: subtract the batch mean first. The paper does not (default). Mean-pooled ViT features share a large
            common mean that then takes most of the spectrum: a random-init tiny-cpu encoder on 256 noise images
            gives 3.9 uncentered and 53 centered (of at most 128), so centering measures the spread around the mean.
    Returns:
        A float in `[~1, min(N, D)]`: ~1 when all rows are equal (uncentered), ~r for a rank-r matrix with equal
        singular values; 0.0 for a matrix of zeros (e.g. equal rows with `center=True`).
    """
    if features.dim() != 2:
        raise ValueError(f"rankme expects an (N, D) feature matrix, got shape {tuple(features.shape)}.")
    if min(features.shape) == 0:
        raise ValueError(f"rankme needs at least one sample and one feature, got shape {tuple(features.shape)}.")
    # float64 on the CPU: for N ~ 256, D ~ 384 LAPACK takes about a millisecond, is faster than a GPU solver's
    # launch overhead at this size, works for every device (MPS has no float64) and keeps bf16 features exact enough.
    features = features.detach().to(device="cpu", dtype=torch.float64)
    if center:
        features = features - features.mean(0)
    singular_values = torch.linalg.svdvals(features)  # (min(N, D),)
    total = singular_values.sum()
    if total <= 0:
        # An all-zero matrix (or, centered, all rows equal) spans no direction at all: the most collapsed batch
        # there is. Eq. 1 is 0/0 there; 0 keeps the monitor a number below any collapse threshold.
        return 0.0
    p = singular_values / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def rankme_signals_collapse(
    rank: float, num_samples: int, feature_dim: int, threshold_fraction: float = DEFAULT_COLLAPSE_FRACTION
) -> bool:
    """Whether a RankMe value means the embeddings have collapsed.

    RankMe cannot exceed `min(num_samples, feature_dim)`, so the threshold is a fraction of that bound and stays
    meaningful when the monitoring batch size or the encoder width changes.

    Args:
        rank: a `rankme(...)` value for an `(num_samples, feature_dim)` batch.
        threshold_fraction: collapse below `threshold_fraction * min(num_samples, feature_dim)`; the default
            `DEFAULT_COLLAPSE_FRACTION` is provisional (see its comment).
    """
    if not 0.0 < threshold_fraction <= 1.0:
        raise ValueError(f"threshold_fraction must be in (0, 1], got {threshold_fraction}.")
    if num_samples < 1 or feature_dim < 1:
        raise ValueError(f"num_samples and feature_dim must be positive, got {num_samples} and {feature_dim}.")
    return rank < threshold_fraction * min(num_samples, feature_dim)


@torch.no_grad()
def knn_class_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = DEFAULT_KNN_K,
    temperature: float = DEFAULT_KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_KNN_CHUNK_SIZE,
) -> torch.Tensor:
    """Weighted cosine k-NN votes (DINO's `knn_classifier`): for each test row, the k most cosine-similar training
    rows each add `exp(similarity / temperature)` to the score of their class.

    Args:
        train_features: `(N, D)`; train_labels: `(N,)` class ids in `[0, num_classes)`.
        test_features: `(M, D)`, on the same device as `train_features`.
        k: neighbours per test row; capped at N.
        num_classes: defaults to `max(train_labels) + 1` (classes never seen in train can never be voted for).
        chunk_size: test rows per similarity matrix `(chunk_size, N)`, to bound memory.
    Returns:
        `(M, num_classes)` float32 scores; the prediction is their argmax.
    """
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.size(1) != test_features.size(1):
        raise ValueError(
            f"k-NN expects (N, D) train and (M, D) test features, got {tuple(train_features.shape)} and "
            f"{tuple(test_features.shape)}."
        )
    if train_features.size(0) != train_labels.size(0):
        raise ValueError(f"{train_features.size(0)} training features but {train_labels.size(0)} labels.")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}.")
    train_labels = train_labels.to(train_features.device).long()
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, train_features.size(0))
    # Cosine similarity = dot product of L2-normalised rows; float32 so that bf16 features do not round the
    # similarities that the temperature then sharpens.
    train_unit = F.normalize(train_features.float(), dim=1)
    scores = []
    for start in range(0, test_features.size(0), chunk_size):
        test_unit = F.normalize(test_features[start:start + chunk_size].float(), dim=1)
        similarity = test_unit @ train_unit.T  # (chunk, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (chunk, k)
        weights = (top_similarity / temperature).exp()  # (chunk, k)
        chunk_scores = torch.zeros(test_unit.size(0), num_classes, device=weights.device)
        chunk_scores.scatter_add_(1, train_labels[top_index], weights)  # sum the weights per neighbour class
        scores.append(chunk_scores)
    return torch.cat(scores)


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = DEFAULT_KNN_K,
    temperature: float = DEFAULT_KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_KNN_CHUNK_SIZE,
) -> float:
    """Top-1 accuracy of the weighted cosine k-NN classifier (DINO's protocol; see `knn_class_scores`).

    Args:
        train_features: `(N, D)`; train_labels: `(N,)`; test_features: `(M, D)`; test_labels: `(M,)`.
        num_classes: defaults to `max label + 1` over train and test.
    Returns:
        The fraction of test rows whose highest-scoring class is their label.
    """
    if test_features.size(0) != test_labels.size(0):
        raise ValueError(f"{test_features.size(0)} test features but {test_labels.size(0)} labels.")
    if num_classes is None:
        num_classes = max(int(train_labels.max()), int(test_labels.max())) + 1
    scores = knn_class_scores(
        train_features, train_labels, test_features, k=k, temperature=temperature, num_classes=num_classes,
        chunk_size=chunk_size,
    )
    return float((scores.argmax(1) == test_labels.to(scores.device)).float().mean())


__all__ = [
    "DEFAULT_COLLAPSE_FRACTION",
    "DEFAULT_KNN_K",
    "DEFAULT_KNN_TEMPERATURE",
    "RANKME_EPS",
    "knn_accuracy",
    "knn_class_scores",
    "rankme",
    "rankme_signals_collapse",
]
