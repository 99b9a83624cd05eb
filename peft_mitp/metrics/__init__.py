"""Classification metrics that work offline.

``evaluate.load("accuracy")`` fetches its script from the Hugging Face Hub, so this package ships
its own ``evaluate`` modules (computed with scikit-learn) and loads them by path:

- ``mitp_accuracy``: accuracy; config ``"multilabel"`` gives exact-match (subset) accuracy.
- ``mitp_f1``: F1 with any sklearn average; config ``"multilabel"`` takes 0/1 indicator rows.

``compute_classification_metrics`` turns model logits into the numbers the paper reports
(accuracy for Food-101 and SNLI-VE, F1-macro and F1-micro for MM-IMDB), and
``make_compute_metrics`` wraps it for ``transformers.Trainer(compute_metrics=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import evaluate
import numpy as np

if TYPE_CHECKING:  # transformers is heavy; only the type is needed here
    from transformers import EvalPrediction

__all__ = [
    "METRICS_DIR",
    "METRIC_NAMES",
    "compute_classification_metrics",
    "load_metric",
    "make_compute_metrics",
]

#: Folder holding one sub-folder per shipped metric (``<name>/<name>.py``, as evaluate requires).
METRICS_DIR: Path = Path(__file__).resolve().parent

#: Names accepted by :func:`load_metric`.
METRIC_NAMES: tuple[str, ...] = ("mitp_accuracy", "mitp_f1")

_CONFIGS = (None, "default", "multilabel")


def load_metric(name: str, config_name: str | None = None, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """Load a metric shipped with ``peft_mitp`` by path, without the Hugging Face Hub.

    Args:
        name: ``"mitp_accuracy"`` or ``"mitp_f1"`` (the ``mitp_`` prefix may be left out).
        config_name: ``None``/``"default"`` for class ids, ``"multilabel"`` for 0/1 rows.
        **load_kwargs: passed on to ``evaluate.load`` (e.g. ``keep_in_memory=True``).

    Returns:
        A fresh ``evaluate.EvaluationModule``.

    Raises:
        ValueError: unknown metric or config name.
    """
    full_name = name if name.startswith("mitp_") else f"mitp_{name}"
    if full_name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; shipped metrics: {', '.join(METRIC_NAMES)}")
    if config_name not in _CONFIGS:
        # evaluate would silently treat an unknown config as single-label; fail loudly instead.
        raise ValueError(f"Unknown config {config_name!r} for {full_name}; use None or 'multilabel'")
    return evaluate.load(str(METRICS_DIR / full_name), config_name, **load_kwargs)


@cache
def _cached_metric(name: str, config_name: str | None) -> evaluate.EvaluationModule:
    # evaluate.load copies and hashes the script on every call; an evaluation loop calls us
    # often, so reuse one in-memory instance per (name, config). compute() with explicit
    # predictions/references keeps no state between calls, so sharing is safe.
    return load_metric(name, config_name, keep_in_memory=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Written via tanh so large |logits| neither overflow nor warn.
    return 0.5 * (np.tanh(0.5 * x) + 1.0)


def compute_classification_metrics(
    logits: np.ndarray, labels: np.ndarray, multi_label: bool, threshold: float = 0.5
) -> dict[str, float]:
    """Score logits against labels with the shipped metrics.

    Single-label: ``logits`` (N, K), ``labels`` (N,) class ids; predictions are the arg-max.
    Returns ``{"accuracy", "f1_macro"}``.

    Multi-label: ``logits`` and ``labels`` (N, K), labels 0/1 (floats are fine; >= 0.5 counts
    as positive); predictions are ``sigmoid(logits) >= threshold``. Returns
    ``{"f1_macro", "f1_micro", "accuracy"}`` where ``accuracy`` is *exact-match* (every one of
    the K labels right), the strict number, not the per-label accuracy.

    F1-macro averages over the classes sklearn sees (single-label: those in labels or
    predictions; multi-label: all K columns); a class with no true and no predicted positives
    scores 0, as sklearn's default does, without its warning.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (N, K), got shape {logits.shape}")
    if multi_label:
        if labels.shape != logits.shape:
            raise ValueError(f"multi-label labels must match logits {logits.shape}, got {labels.shape}")
        preds = (_sigmoid(logits) >= threshold).astype(np.int32)
        refs = (labels >= 0.5).astype(np.int32)
        config = "multilabel"
    else:
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"single-label labels must have shape ({logits.shape[0]},), got {labels.shape}")
        preds = logits.argmax(axis=-1).astype(np.int32)
        refs = labels.astype(np.int32)
        config = None
    f1 = _cached_metric("mitp_f1", config).compute(
        predictions=preds, references=refs, average=["macro", "micro"] if multi_label else ["macro"], zero_division=0
    )
    acc = _cached_metric("mitp_accuracy", config).compute(predictions=preds, references=refs)
    return {**acc, **f1}


def make_compute_metrics(multi_label: bool, threshold: float = 0.5) -> Callable[[EvalPrediction], dict[str, float]]:
    """Build a ``compute_metrics`` callable for ``transformers.Trainer``.

    The callable takes an ``EvalPrediction`` and returns the dict of
    :func:`compute_classification_metrics`. When the model returns several outputs,
    ``EvalPrediction.predictions`` is a tuple; the logits are taken to be its first element.
    """

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return compute_classification_metrics(logits, eval_pred.label_ids, multi_label, threshold)

    return compute_metrics
