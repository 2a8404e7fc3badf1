"""Frozen-encoder probes beyond `evaluation.linear_probe`: the I-JEPA paper's low-level protocol (BatchNorm before
the linear head), V-JEPA's attentive probe, and a k-NN probe.

1. Low-level protocol (Assran et al., CVPR 2023, Appendix C): features are the concatenated mean-pooled outputs of
   the last `PAPER_LOW_LEVEL_NUM_LAYERS` = 4 layers (`evaluation.extract_features(model, batches, num_layers=4)`),
   and the linear head is preceded by `BatchNorm1d(affine=False)`. `BatchNormLinearHead` is that head as a module;
   `batchnorm_linear_probe` fits it with `evaluation`'s optimizer and weight-decay sweep and returns the same
   `ProbeResult` as `linear_probe`.
2. Attentive probe (Bardes et al., "V-JEPA", 2024, Sec. 4 / official `src/models/attentive_pooler.py`): one learned
   query token cross-attends over the frozen patch tokens, one MLP block, then a linear classifier, trained with
   AdamW. `extract_patch_tokens` gets the `(N, num_patches, D)` tokens once; `fit_attentive_probe` trains and scores.
3. k-NN probe (DINO's weighted cosine k-NN, `monitors.knn_accuracy`): `knn_probe`, no training, for quick checks.

Every probe takes pre-extracted features, so the same call scores a pretrained encoder, the same architecture at
random init and raw pixels. This file imports only torch and the package's own evaluation and monitors modules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .evaluation import (
    ProbeResult, ProbeSettings, accuracy, count_classes, encode_batches, fit_linear_classifier, held_out_split,
)
from .monitors import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE, knn_accuracy

# Paper Appendix C: the low-level tasks (Clevr counting / distance) use the last 4 layers, concatenated.
PAPER_LOW_LEVEL_NUM_LAYERS = 4
# torch.nn.BatchNorm1d's default epsilon, kept so that `BatchNormLinearHead` is a plain BatchNorm1d.
BATCH_NORM_EPS = 1e-5
# V-JEPA's frozen image-classification config (official `configs/evals/vitl16_in1k.yaml`): 20 epochs, AdamW at a
# constant-start cosine schedule from lr 1e-3 to 0 without warmup, weight decay 1e-3.
DEFAULT_ATTENTIVE_EPOCHS = 20
DEFAULT_ATTENTIVE_LEARNING_RATE = 1e-3
DEFAULT_ATTENTIVE_WEIGHT_DECAY = 1e-3
# V-JEPA's global batch is 16 per GPU x 64 GPUs = 1024; 256 gives small datasets (a few thousand images) enough
# optimizer steps per epoch and fits a CPU.
DEFAULT_ATTENTIVE_BATCH_SIZE = 256
# V-JEPA's AttentivePooler: mlp_ratio 4 (a ViT MLP), trunc-normal init with std 0.02.
DEFAULT_ATTENTIVE_MLP_RATIO = 4.0
ATTENTIVE_INIT_STD = 0.02
# Head width used to pick the probe's head count when none is given: every ViT size (S/B/L/H) uses 64-d heads.
ATTENTIVE_HEAD_DIM = 64
# Test rows scored per forward when computing accuracies, to bound the attention's memory.
SCORING_BATCH_SIZE = 1024


# ---------------------------------------------------------------------------------------------------------------
# 1. BatchNorm + linear head (the paper's low-level protocol)
# ---------------------------------------------------------------------------------------------------------------


class BatchNormLinearHead(nn.Module):
    """`BatchNorm1d(affine=False)` followed by a linear classifier: the paper's low-level probe head.

    In eval mode the BatchNorm is `(x - running_mean) / sqrt(running_var + eps)`, a fixed per-feature
    standardisation; `set_statistics` fills the running statistics from training features.
    """

    def __init__(self, feature_dim: int, num_classes: int, eps: float = BATCH_NORM_EPS):
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim, eps=eps, affine=False)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`(batch, feature_dim)` -> logits `(batch, num_classes)`."""
        return self.classifier(self.norm(features))

    @torch.no_grad()
    def set_statistics(self, features: torch.Tensor) -> None:
        """Set the BatchNorm's running mean and variance to those of `features` `(N, feature_dim)`.

        The variance is the biased one: that is what a BatchNorm in train mode divides by on a batch holding all of
        `features`, so a full-batch fit (L-BFGS) sees exactly the normalisation the eval-mode head applies.
        (PyTorch's own running update would store the unbiased variance instead.)
        """
        self.norm.running_mean.copy_(features.mean(0))
        self.norm.running_var.copy_(features.var(0, unbiased=False))
        self.norm.num_batches_tracked.fill_(1)


def fit_batchnorm_linear_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, settings: ProbeSettings
) -> BatchNormLinearHead:
    """Fit a `BatchNormLinearHead` on `(N, D)` features and `(N,)` labels; returned in eval mode.

    The BatchNorm statistics are those of `features` (`set_statistics`); the linear layer is then fitted on the
    normalised features by `evaluation.fit_linear_classifier` (`settings.method`: full-batch L-BFGS, for which this
    equals training the BatchNorm in train mode, or mini-batch SGD, which differs from train-mode BatchNorm only by
    the noise of per-batch statistics). `settings.standardize` is ignored: the BatchNorm is the standardisation.
    """
    head = BatchNormLinearHead(features.size(1), num_classes)
    head.set_statistics(features)
    head.eval()
    with torch.no_grad():
        normalised = head.norm(features)
    head.classifier.load_state_dict(
        fit_linear_classifier(normalised, labels, num_classes, weight_decay, settings).state_dict()
    )
    return head


def batchnorm_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    settings: ProbeSettings | None = None,
) -> ProbeResult:
    """The paper's low-level probe: `BatchNorm1d(affine=False)` + linear head, with `linear_probe`'s weight-decay
    sweep (the same held-out split of train, the same optimizer) and result.

    Args:
        train_features: `(N, D)`, for the paper's protocol `extract_features(..., num_layers=4)`;
        train_labels: `(N,)` class ids in `[0, num_classes)`.
        test_features / test_labels: `(M, D)` / `(M,)`, optional (then `test_accuracy` is None).
        num_classes: defaults to `max(label) + 1` over train and test.
    """
    settings = settings or ProbeSettings()
    train_features, train_labels = train_features.float(), train_labels.long()
    num_classes = count_classes(train_features, train_labels, test_labels, num_classes)

    # The same held-out subset as `linear_probe` (same seed, same permutation), so the two protocols pick their
    # weight decay on the same images; the BatchNorm statistics come from the fitting part only.
    val_index, fit_index = held_out_split(train_features.size(0), settings)
    validation_accuracy = {}
    for weight_decay in settings.weight_decays:
        head = fit_batchnorm_linear_head(
            train_features[fit_index], train_labels[fit_index], num_classes, weight_decay, settings
        )
        validation_accuracy[str(weight_decay)] = accuracy(head, train_features[val_index], train_labels[val_index])
    # Ties go to the larger decay (the simpler model), as in `linear_probe`.
    best = max(settings.weight_decays, key=lambda wd: (validation_accuracy[str(wd)], wd))

    head = fit_batchnorm_linear_head(train_features, train_labels, num_classes, best, settings)
    test_accuracy = None
    if test_features is not None:
        if test_labels is None:
            raise ValueError("test_features were given without test_labels.")
        test_accuracy = accuracy(head, test_features.float(), test_labels.long())
    return ProbeResult(
        test_accuracy=test_accuracy,
        train_accuracy=accuracy(head, train_features, train_labels),
        best_weight_decay=float(best),
        validation_accuracy=validation_accuracy,
        num_train=int(train_features.size(0)),
        num_test=int(test_features.size(0)) if test_features is not None else 0,
        feature_dim=int(train_features.size(1)),
        num_classes=int(num_classes),
    )


# ---------------------------------------------------------------------------------------------------------------
# 2. Attentive probe (V-JEPA)
# ---------------------------------------------------------------------------------------------------------------


def default_attentive_num_heads(hidden_size: int) -> int:
    """`hidden_size // 64` heads when 64 divides `hidden_size` (the encoder's own head count for ViT-S/B/L/H), else
    1 head."""
    if hidden_size % ATTENTIVE_HEAD_DIM == 0:
        return hidden_size // ATTENTIVE_HEAD_DIM
    return 1


class AttentiveProbe(nn.Module):
    """One learned query token cross-attending over frozen patch tokens, an MLP block, then a linear classifier.

    This corresponds to V-JEPA's `AttentiveClassifier` with `AttentivePooler(num_queries=1, depth=1,
    complete_block=True)` (`CrossAttentionBlock`: `q = q + proj(attn(q, norm1(x)))`, `q = q + mlp(norm2(q))`); the
    submodule names (`query_token`, `norm1`, `q`, `kv`, `proj`, `norm2`, `mlp`, `linear`) follow the original.
    """

    def __init__(
        self,
        hidden_size: int,
        num_classes: int,
        num_heads: int | None = None,
        mlp_ratio: float = DEFAULT_ATTENTIVE_MLP_RATIO,
    ):
        super().__init__()
        num_heads = num_heads or default_attentive_num_heads(hidden_size)
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.query_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size)  # on the patch tokens (keys / values), not on the query
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, hidden_size))
        self.linear = nn.Linear(hidden_size, num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # V-JEPA AttentivePooler: trunc-normal(0.02) query and linear weights, zero biases, and the residual
        # projections (attention output, MLP output) divided by sqrt(2 * layer_id) with layer_id = 1.
        nn.init.trunc_normal_(self.query_token, std=ATTENTIVE_INIT_STD)
        for module in (self.q, self.kv, self.proj, self.mlp[0], self.mlp[2]):
            nn.init.trunc_normal_(module.weight, std=ATTENTIVE_INIT_STD)
            nn.init.zeros_(module.bias)
        self.proj.weight.div_(math.sqrt(2.0))
        self.mlp[2].weight.div_(math.sqrt(2.0))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens `(B, N, D)` -> pooled feature `(B, D)` (the query token after the cross-attention block)."""
        batch, num_tokens, dim = tokens.shape
        head_dim = dim // self.num_heads
        query = self.query_token.expand(batch, -1, -1)  # (B, 1, D)
        q = self.q(query).view(batch, 1, self.num_heads, head_dim).transpose(1, 2)  # (B, nh, 1, hd)
        kv = self.kv(self.norm1(tokens)).view(batch, num_tokens, 2, self.num_heads, head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, nh, N, hd)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hd)
        query = query + self.proj(attended.transpose(1, 2).reshape(batch, 1, dim))
        query = query + self.mlp(self.norm2(query))
        return query.squeeze(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen patch tokens `(B, N, D)` -> logits `(B, num_classes)`."""
        return self.linear(self.pool(tokens))


@dataclass
class AttentiveProbeSettings:
    """How `fit_attentive_probe` trains (defaults: V-JEPA's frozen-evaluation config, see the constants)."""

    epochs: int = DEFAULT_ATTENTIVE_EPOCHS
    learning_rate: float = DEFAULT_ATTENTIVE_LEARNING_RATE
    weight_decay: float = DEFAULT_ATTENTIVE_WEIGHT_DECAY
    batch_size: int = DEFAULT_ATTENTIVE_BATCH_SIZE
    num_heads: int | None = None  # None: `default_attentive_num_heads(D)`
    mlp_ratio: float = DEFAULT_ATTENTIVE_MLP_RATIO
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")


@dataclass
class AttentiveProbeResult:
    """Outcome of `fit_attentive_probe`; `to_dict()` is JSON-ready."""

    test_accuracy: float | None
    train_accuracy: float
    num_train: int = 0
    num_test: int = 0
    num_tokens: int = 0
    feature_dim: int = 0
    num_classes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_learning_rate(step: int, total_steps: int, base: float, final: float = 0.0) -> float:
    """Cosine decay from `base` at step 0 to `final` at `total_steps` (V-JEPA's probe schedule with warmup 0)."""
    progress = min(step / max(total_steps, 1), 1.0)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def train_attentive_probe(
    tokens: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: AttentiveProbeSettings | None = None
) -> AttentiveProbe:
    """Train an `AttentiveProbe` with AdamW on frozen tokens `(N, num_tokens, D)` and labels `(N,)`.

    Runs on `tokens.device`; tokens may be stored in a low-precision dtype (they are cast per batch to float32).
    Returns the probe in eval mode.
    """
    settings = settings or AttentiveProbeSettings()
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (N, num_tokens, D), got shape {tuple(tokens.shape)}.")
    if tokens.size(0) != labels.size(0):
        raise ValueError(f"{tokens.size(0)} token sets but {labels.size(0)} labels.")
    # Seeded initialisation without leaving the caller's global RNG changed (the batch order has its own generator).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        probe = AttentiveProbe(tokens.size(2), num_classes, settings.num_heads, settings.mlp_ratio)
    probe = probe.to(tokens.device)
    labels = labels.to(tokens.device).long()
    # V-JEPA's eval `init_opt`: no weight decay on biases and norm parameters (the 1-d tensors).
    decay = [p for p in probe.parameters() if p.dim() > 1]
    no_decay = [p for p in probe.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate,
    )
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(tokens.size(0) / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    probe.train()
    step = 0
    for _ in range(settings.epochs):
        order = torch.randperm(tokens.size(0), generator=generator).to(tokens.device)
        for start in range(0, tokens.size(0), settings.batch_size):
            index = order[start:start + settings.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = cosine_learning_rate(step, total_steps, settings.learning_rate)
            loss = F.cross_entropy(probe(tokens[index].float()), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return probe.eval()


@torch.no_grad()
def attentive_accuracy(probe: AttentiveProbe, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of `probe` on tokens `(N, num_tokens, D)`, scored in chunks of `SCORING_BATCH_SIZE`."""
    labels = labels.to(tokens.device).long()
    correct = 0
    for start in range(0, tokens.size(0), SCORING_BATCH_SIZE):
        logits = probe(tokens[start:start + SCORING_BATCH_SIZE].float())
        correct += int((logits.argmax(-1) == labels[start:start + SCORING_BATCH_SIZE]).sum())
    return correct / tokens.size(0)


def fit_attentive_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    settings: AttentiveProbeSettings | None = None,
) -> AttentiveProbeResult:
    """Train V-JEPA's attentive probe on frozen tokens and score it.

    Args:
        train_tokens: `(N, num_tokens, D)`, e.g. `extract_patch_tokens(...)`; train_labels: `(N,)`.
        test_tokens / test_labels: `(M, num_tokens, D)` / `(M,)`, optional (then `test_accuracy` is None).
        num_classes: defaults to `max(label) + 1` over train and test.
    """
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
        if test_labels is not None:
            num_classes = max(num_classes, int(test_labels.max()) + 1)
    probe = train_attentive_probe(train_tokens, train_labels, num_classes, settings)
    test_accuracy = None
    if test_tokens is not None:
        if test_labels is None:
            raise ValueError("test_tokens were given without test_labels.")
        test_accuracy = attentive_accuracy(probe, test_tokens, test_labels)
    return AttentiveProbeResult(
        test_accuracy=test_accuracy,
        train_accuracy=attentive_accuracy(probe, train_tokens, train_labels),
        num_train=int(train_tokens.size(0)),
        num_test=int(test_tokens.size(0)) if test_tokens is not None else 0,
        num_tokens=int(train_tokens.size(1)),
        feature_dim=int(train_tokens.size(2)),
        num_classes=int(num_classes),
    )


def extract_patch_tokens(
    model: nn.Module,
    batches: Iterable[dict | tuple | torch.Tensor],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a frozen encoder once and return `(tokens (N, num_patches, D), labels (N,) or None)` on the CPU.

    The tokens are `last_hidden_state` (after the final LayerNorm), what V-JEPA's attentive probe reads. `batches`
    takes the same forms as `evaluation.extract_features`. `dtype=torch.bfloat16` halves the memory (10k
    Fashion-MNIST images with 64 tokens of 128 dims are 330 MB in float32); the probe casts batches back to float32.
    """
    return encode_batches(
        model, batches, lambda m, pixels: m(pixels).last_hidden_state.to(device="cpu", dtype=dtype), device
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. k-NN probe
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class KnnProbeResult:
    """Outcome of `knn_probe`; `to_dict()` is JSON-ready."""

    test_accuracy: float
    k: int = DEFAULT_KNN_K
    temperature: float = DEFAULT_KNN_TEMPERATURE
    num_train: int = 0
    num_test: int = 0
    feature_dim: int = 0
    num_classes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def knn_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = DEFAULT_KNN_K,
    temperature: float = DEFAULT_KNN_TEMPERATURE,
    num_classes: int | None = None,
) -> KnnProbeResult:
    """DINO's weighted cosine k-NN (`monitors.knn_accuracy`) on `(N, D)` train and `(M, D)` test features."""
    if num_classes is None:
        num_classes = max(int(train_labels.max()), int(test_labels.max())) + 1
    return KnnProbeResult(
        test_accuracy=knn_accuracy(
            train_features, train_labels, test_features, test_labels, k=k, temperature=temperature,
            num_classes=num_classes,
        ),
        k=int(min(k, train_features.size(0))),
        temperature=float(temperature),
        num_train=int(train_features.size(0)),
        num_test=int(test_features.size(0)),
        feature_dim=int(train_features.size(1)),
        num_classes=int(num_classes),
    )


__all__ = [
    "PAPER_LOW_LEVEL_NUM_LAYERS",
    "AttentiveProbe",
    "AttentiveProbeResult",
    "AttentiveProbeSettings",
    "BatchNormLinearHead",
    "KnnProbeResult",
    "attentive_accuracy",
    "batchnorm_linear_probe",
    "cosine_learning_rate",
    "default_attentive_num_heads",
    "extract_patch_tokens",
    "fit_attentive_probe",
    "fit_batchnorm_linear_head",
    "knn_probe",
    "train_attentive_probe",
]
