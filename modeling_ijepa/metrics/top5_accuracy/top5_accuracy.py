"""Top-k accuracy (default k = 5) from logits or scores, as a local `evaluate` module (works offline).

Load it by path: `evaluate.load("modeling_ijepa/metrics/top5_accuracy")`. Unlike `accuracy`, `predictions` are the per-class scores
`(num_examples, num_classes)` (logits or probabilities), not labels.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of examples whose reference label is among the k highest-scoring classes."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): scores of shape (num_examples, num_classes).
    references (`list[int]`): ground-truth labels.
    k (`int`, defaults to 5): how many top classes count as correct.
Returns:
    top5_accuracy (`float`): in [0, 1]. The key stays `top5_accuracy` whatever k is, so reports are comparable.
Example:
    >>> metric = evaluate.load("modeling_ijepa/metrics/top5_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], references=[0])
    {'top5_accuracy': 0.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Top5Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=5):
        scores = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references)
        if scores.ndim != 2 or scores.shape[0] != references.shape[0]:
            raise ValueError(
                f"predictions must be (num_examples, num_classes) scores matching {references.shape[0]} references, "
                f"got shape {scores.shape}."
            )
        if k > scores.shape[1]:
            raise ValueError(f"k={k} is larger than the number of classes ({scores.shape[1]}).")
        # Stable sort so that ties are resolved the same way every time.
        top_k = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        correct = (top_k == references[:, None]).any(axis=1)
        return {"top5_accuracy": float(correct.mean())}
