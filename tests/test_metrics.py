"""The shipped evaluate metrics load without the Hub and agree with scikit-learn."""

from __future__ import annotations

import socket

import evaluate
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction

from peft_mitp.metrics import compute_classification_metrics, load_metric, make_compute_metrics


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test as on a machine without the Hub: offline flags set and sockets refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    # evaluate reads its flag at import time, so also set the attribute it consults.
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def test_hub_metric_names_are_unavailable_offline_but_shipped_ones_load() -> None:
    # Guards the premise: were "accuracy" loadable here, the offline fixture would not be offline.
    with pytest.raises(Exception):  # noqa: B017 - evaluate raises several types depending on version
        evaluate.load("accuracy")
    assert isinstance(load_metric("mitp_accuracy"), evaluate.EvaluationModule)
    assert load_metric("f1", "multilabel").config_name == "multilabel"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_label_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    refs, preds = rng.integers(0, 7, 300), rng.integers(0, 7, 300)
    acc = load_metric("mitp_accuracy").compute(predictions=preds, references=refs)
    assert acc == {"accuracy": pytest.approx(accuracy_score(refs, preds))}
    f1 = load_metric("mitp_f1")
    for average in ("macro", "micro", "weighted"):
        got = f1.compute(predictions=preds, references=refs, average=average)
        assert got == {"f1": pytest.approx(f1_score(refs, preds, average=average))}


@pytest.mark.parametrize("seed", [0, 1])
def test_multilabel_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    refs, preds = rng.integers(0, 2, (120, 23)), rng.integers(0, 2, (120, 23))
    got = load_metric("mitp_f1", "multilabel").compute(
        predictions=preds.tolist(), references=refs.tolist(), average=["macro", "micro"]
    )
    assert got == {
        "f1_macro": pytest.approx(f1_score(refs, preds, average="macro")),
        "f1_micro": pytest.approx(f1_score(refs, preds, average="micro")),
    }
    exact = load_metric("mitp_accuracy", "multilabel").compute(predictions=preds.tolist(), references=refs.tolist())
    assert exact == {"accuracy": pytest.approx(accuracy_score(refs, preds))}  # subset accuracy


def test_load_metric_rejects_unknown_names_and_configs() -> None:
    with pytest.raises(ValueError, match="Unknown metric"):
        load_metric("mitp_bleu")
    with pytest.raises(ValueError, match="Unknown config"):
        load_metric("mitp_f1", "multi-label")


def test_single_label_logits_are_scored_by_argmax() -> None:
    rng = np.random.default_rng(3)
    logits, labels = rng.normal(size=(200, 5)), rng.integers(0, 5, 200)
    got = compute_classification_metrics(logits, labels, multi_label=False)
    preds = logits.argmax(-1)
    assert got == {
        "accuracy": pytest.approx(accuracy_score(labels, preds)),
        "f1_macro": pytest.approx(f1_score(labels, preds, average="macro")),
    }


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_multilabel_logits_are_thresholded_after_sigmoid(threshold: float) -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=2.0, size=(150, 23))
    labels = rng.integers(0, 2, (150, 23)).astype(np.float32)  # float targets, as BCE training uses
    got = compute_classification_metrics(logits, labels, multi_label=True, threshold=threshold)
    preds = (_sigmoid(logits) >= threshold).astype(int)
    assert got == {
        "f1_macro": pytest.approx(f1_score(labels.astype(int), preds, average="macro", zero_division=0)),
        "f1_micro": pytest.approx(f1_score(labels.astype(int), preds, average="micro", zero_division=0)),
        "accuracy": pytest.approx(accuracy_score(labels.astype(int), preds)),
    }


def test_a_higher_threshold_predicts_fewer_positives() -> None:
    # One positive label with logit 1.0 (sigmoid 0.73): kept at 0.5, lost at 0.8.
    logits, labels = np.array([[1.0, -3.0]]), np.array([[1.0, 0.0]])
    assert compute_classification_metrics(logits, labels, True, threshold=0.5)["f1_micro"] == 1.0
    assert compute_classification_metrics(logits, labels, True, threshold=0.8)["f1_micro"] == 0.0


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="single-label labels"):
        compute_classification_metrics(np.zeros((4, 3)), np.zeros((4, 3)), multi_label=False)
    with pytest.raises(ValueError, match="multi-label labels"):
        compute_classification_metrics(np.zeros((4, 3)), np.zeros(4), multi_label=True)


def test_make_compute_metrics_accepts_eval_prediction_and_tuple_outputs() -> None:
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]])
    labels = np.array([0, 1, 2, 1])
    compute = make_compute_metrics(multi_label=False)
    assert compute(EvalPrediction(predictions=logits, label_ids=labels))["accuracy"] == pytest.approx(0.75)
    # Models returning several outputs give a tuple whose first element is the logits.
    hidden = np.zeros((4, 8))
    assert compute(EvalPrediction(predictions=(logits, hidden), label_ids=labels))["accuracy"] == pytest.approx(0.75)

    multi = make_compute_metrics(multi_label=True)
    logits2, labels2 = np.array([[3.0, -3.0], [-3.0, 3.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])
    assert multi(EvalPrediction(predictions=logits2, label_ids=labels2)) == {
        "f1_macro": 1.0,
        "f1_micro": 1.0,
        "accuracy": 1.0,
    }
    # A class with no true and no predicted positive scores 0 and still counts in the macro mean.
    result = multi(EvalPrediction(predictions=logits2[:1], label_ids=labels2[:1]))
    assert result == {"f1_macro": 0.5, "f1_micro": 1.0, "accuracy": 1.0}
