"""F1 as an offline ``evaluate`` metric, computed with scikit-learn.

Shipped inside ``peft_mitp`` because the canonical ``evaluate.load("f1")`` script lives on the
Hugging Face Hub. Load it by path: ``evaluate.load(<this folder>, "multilabel")``; the script
must keep the folder's name for that to work.

Configs:

- ``"default"``: one integer class id per example (UPMC Food-101, SNLI-VE).
- ``"multilabel"``: one 0/1 indicator sequence of length K per example (MM-IMDB).

``average`` may be one sklearn average (``"macro"``, ``"micro"``, ``"weighted"``, ``"samples"``
for multi-label, ``"binary"``) giving ``{"f1": value}``, or a list of them giving
``{"f1_<average>": value, ...}`` so that F1-macro and F1-micro come out of one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = """F1 = 2 * precision * recall / (precision + recall), per class, then averaged.
Single-label class ids ("default") or multi-label 0/1 indicator rows ("multilabel")."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]` or `list[list[int]]` for "multilabel"): predicted labels.
    references (`list[int]` or `list[list[int]]` for "multilabel"): ground-truth labels.
    average (`str` or `list[str]`, default "macro"): sklearn average(s); a list returns one
        `f1_<average>` key per entry instead of `f1`.
    labels (`list[int]`, optional): labels to include (sklearn semantics).
    pos_label (`int`, default 1): positive class for `average="binary"`.
    sample_weight (`list[float]`, optional): per-example weights.
    zero_division (`"warn"`, 0 or 1, default "warn"): value for classes with no predicted and
        no true positives (sklearn semantics; "warn" scores them 0 and warns).
Returns:
    f1 (`float`), or f1_<average> (`float`) for each requested average.
Examples:
    >>> metric = evaluate.load("peft_mitp/metrics/mitp_f1", "multilabel")
    >>> metric.compute(predictions=[[1, 0], [0, 1]], references=[[1, 0], [1, 1]], average=["macro", "micro"])
    {'f1_macro': 0.8333333333333333, 'f1_micro': 0.8}
"""

_CITATION = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython},
author={Pedregosa, F. and others}, journal={JMLR}, volume={12}, pages={2825--2830}, year={2011}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MitpF1(evaluate.Metric):
    """F1 for single-label class ids or multi-label 0/1 rows, via scikit-learn."""

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
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(
        self,
        predictions: list[Any],
        references: list[Any],
        average: str | Sequence[str] = "macro",
        labels: list[int] | None = None,
        pos_label: int = 1,
        sample_weight: list[float] | None = None,
        zero_division: str | float = "warn",
    ) -> dict[str, float]:
        """Return ``{"f1": v}`` for one average, ``{"f1_<avg>": v, ...}`` for a list of them."""

        def score(avg: str) -> float:
            return float(
                f1_score(
                    references,
                    predictions,
                    labels=labels,
                    pos_label=pos_label,
                    average=avg,
                    sample_weight=sample_weight,
                    zero_division=zero_division,
                )
            )

        if isinstance(average, str):
            return {"f1": score(average)}
        return {f"f1_{avg}": score(avg) for avg in average}
