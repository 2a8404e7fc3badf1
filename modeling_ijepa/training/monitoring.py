"""Is the run learning? Health monitors computed during pretraining and the closing answer of a run.

* RankMe (Garrido et al. 2023) of the batch's pooled target features (centred), at logging steps: the effective
  rank falls when the representations collapse. It needs no labels.
* Online k-NN accuracy (DINO's weighted cosine k-NN, k=20) of the EMA target encoder on a small labelled set, every
  `--monitor_steps` when `--monitor_label_column` names the label column: a bank of `--monitor_train_samples` images
  of `--monitor_train_split` against `--monitor_eval_samples` images of `--monitor_eval_split`, centre-resized to the
  model's input with the evaluation transform of the run's image processor.
* At the end of a run with labels: the same k-NN for the same architecture at random init (same seed), so a run
  closes with "pretrained X% vs random init Y%" — the margin over random init is what shows learning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..evaluation import image_transform_from_processor, pooled_features
from ..monitors import knn_accuracy, rankme
from .data import decode_image, detect_image_column, load_train_dataset

logger = logging.getLogger(__name__)

# RankMe (centred: the features' common mean would otherwise dominate the spectrum) below this fraction of
# min(batch, hidden size) triggers a warning. Measured on one batch of 64 Fashion-MNIST test images, tiny-cpu
# (min(64, 128) = 64; `docs/evaluation.md`, "Health monitors"): healthy runs 11.3-13.3 (random init 11.6, the demo
# after 100 steps 11.3, a 500-step benchmark run 13.3), a collapsed encoder (patch embedding zeroed: features no
# longer depend on the image) 5.1. 0.12 x 64 = 7.7 sits between them.
RANKME_WARNING_FRACTION = 0.12
# Feature-extraction batch of the k-NN monitor (memory only; the result does not depend on it).
MONITOR_BATCH_SIZE = 256


def pooled_target_features(outputs) -> torch.Tensor:
    """`(B, D)`: the layer-normed target features of one step's output, averaged over target blocks and patches per
    image (`target_hidden_states` is `(T * C * B, Kt, D)` in the official order, batch fastest)."""
    target = outputs.target_hidden_states.detach().float()
    batch = outputs.context_hidden_states.size(0) // max(1, len(outputs.context_mask))
    return target.view(-1, batch, *target.shape[1:]).mean(dim=(0, 2))


def rankme_of_step(outputs) -> tuple[float, float]:
    """(RankMe, the warning threshold for it) of one step's pooled target features."""
    features = pooled_target_features(outputs)
    return rankme(features, center=True), RANKME_WARNING_FRACTION * min(features.shape)


def warn_if_collapsing(value: float, threshold: float, step: int) -> None:
    if value < threshold:
        logger.warning(
            "RankMe of the target features is %.2f at step %d (below %.2f): the representations may be collapsing. "
            "Lower the learning rate, raise the EMA momentum start (--ema_momentum_start) or check the masks "
            "(larger targets give a harder task).", value, step, threshold,
        )


@dataclass
class LabelledImages:
    """Images ready for the encoder, `(N, C, H, W)` float, and their labels `(N,)`."""

    pixel_values: torch.Tensor
    labels: torch.Tensor


def load_labelled_images(data_args, split: str, label_column: str, num_samples: int, image_processor,
                         num_channels: int = 3) -> LabelledImages:
    """The first `num_samples` records of `split` (not streamed: a small set), through the evaluation transform."""
    from dataclasses import replace

    dataset = load_train_dataset(replace(data_args, train_split=split, streaming=True))
    columns = dataset.features or {}
    if label_column not in columns:
        raise ValueError(f"--monitor_label_column {label_column!r} is not a column of {split!r}: {list(columns)}.")
    image_column = detect_image_column(dataset.features, data_args.image_column_name)
    transform = image_transform_from_processor(image_processor, train=False, num_channels=num_channels)
    pixels, labels = [], []
    for record in dataset.take(num_samples):
        pixels.append(transform(decode_image(record[image_column])))
        labels.append(int(record[label_column]))
    if len(set(labels)) < 2:
        raise ValueError(f"The monitor set ({split!r}, {len(labels)} records) holds fewer than 2 classes.")
    return LabelledImages(torch.stack(pixels), torch.tensor(labels))


@torch.no_grad()
def encoder_features(encoder, pixel_values: torch.Tensor, device) -> torch.Tensor:
    """`(N, D)` mean-pooled final features of a frozen encoder, in batches, on the CPU in float32."""
    was_training = encoder.training
    encoder.eval()
    chunks = [
        pooled_features(encoder, batch.to(device)).float().cpu()
        for batch in pixel_values.split(MONITOR_BATCH_SIZE)
    ]
    encoder.train(was_training)
    return torch.cat(chunks)


class KnnMonitor:
    """Online k-NN accuracy of an encoder on a fixed labelled bank and evaluation set."""

    def __init__(self, bank: LabelledImages, evaluation: LabelledImages):
        self.bank, self.evaluation = bank, evaluation

    def accuracy(self, encoder, device) -> float:
        train = encoder_features(encoder, self.bank.pixel_values, device)
        test = encoder_features(encoder, self.evaluation.pixel_values, device)
        return knn_accuracy(train, self.bank.labels, test, self.evaluation.labels)

    def random_init_accuracy(self, config, seed: int, device) -> float:
        """The same k-NN for an encoder of `config` at random init (seeded, global RNG left as it was)."""
        from .. import IJepaModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = IJepaModel(config).to(device)
        return self.accuracy(encoder, device)


def build_knn_monitor(data_args, args, image_processor, num_channels: int) -> KnnMonitor | None:
    """The run's k-NN monitor, or None when `--monitor_label_column` is not set."""
    if not args.monitor_label_column:
        return None
    bank = load_labelled_images(data_args, args.monitor_train_split, args.monitor_label_column,
                                args.monitor_train_samples, image_processor, num_channels)
    evaluation = load_labelled_images(data_args, args.monitor_eval_split, args.monitor_label_column,
                                      args.monitor_eval_samples, image_processor, num_channels)
    logger.info("k-NN monitor: %d %s images as the bank, %d %s images evaluated.", len(bank.labels),
                args.monitor_train_split, len(evaluation.labels), args.monitor_eval_split)
    return KnnMonitor(bank, evaluation)
