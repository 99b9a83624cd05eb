"""Accuracy as an offline ``evaluate`` metric, computed with scikit-learn.

The canonical ``evaluate.load("accuracy")`` script lives on the Hugging Face Hub, which is not
always reachable, so ``peft_mitp`` ships this module and loads it by path
(``evaluate.load(<this folder>)``; the script must keep the folder's name for that to work).

Configs:

- ``"default"``: one integer class id per example.
- ``"multilabel"``: one 0/1 indicator sequence of length K per example; the score is the
  *exact-match* (subset) accuracy, i.e. the fraction of examples whose whole label set is right.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = """Fraction of correct predictions: (TP + TN) / N for single-label class ids,
exact-match (subset) accuracy for multi-label 0/1 indicator rows ("multilabel" config)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]` or `list[list[int]]` for "multilabel"): predicted labels.
    references (`list[int]` or `list[list[int]]` for "multilabel"): ground-truth labels.
    normalize (`bool`, default True): return a fraction; if False, the number of correct examples.
    sample_weight (`list[float]`, optional): per-example weights.
Returns:
    accuracy (`float`): the accuracy (a count when `normalize=False`).
Examples:
    >>> metric = evaluate.load("peft_mitp/metrics/mitp_accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython},
author={Pedregosa, F. and others}, journal={JMLR}, volume={12}, pages={2825--2830}, year={2011}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MitpAccuracy(evaluate.Metric):
    """Accuracy (single-label) or exact-match accuracy (multi-label), via scikit-learn."""

    def _info(self) -> evaluate.MetricInfo:
        """Declare the input features, which depend on the config (class ids vs 0/1 rows)."""
        if self.config_name == "multilabel":
            features = datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("int32")),
                    "references": datasets.List(datasets.Value("int32")),
                }
            )
        else:
            features = datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(
        self,
        predictions: list[Any],
        references: list[Any],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, float]:
        """Return ``{"accuracy": value}``; sklearn treats 2-D 0/1 input as exact match."""
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}
