"""Top-1 accuracy as a local `evaluate` module, so that evaluation works offline.

`evaluate.load("accuracy")` downloads its script from the Hugging Face Hub; this project loads its metrics by path
instead: `evaluate.load("modeling_ijepa/metrics/accuracy")`. Same inputs and output key as the Hub's `accuracy` metric.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction of predictions equal to the reference label: (TP + TN) / total."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): ground-truth labels.
    normalize (`bool`, defaults to `True`): return the fraction; `False` returns the number of correct predictions.
    sample_weight (`list[float]`, *optional*): per-example weights.
Returns:
    accuracy (`float`): in [0, 1] when normalized.
Example:
    >>> metric = evaluate.load("modeling_ijepa/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(f"{predictions.shape[0]} predictions but {references.shape[0]} references.")
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float((correct * weights).sum())
        return {"accuracy": total / float(weights.sum()) if normalize else total}
