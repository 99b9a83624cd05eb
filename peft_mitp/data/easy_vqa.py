"""easy-VQA (pip package ``easy-vqa``): real image-question pairs that install offline.

64x64 images of one coloured shape and short questions about it, 13 answer classes; answering
needs both modalities, which makes it the project's small end-to-end benchmark.
"""

from __future__ import annotations

import json
import warnings

import datasets
import numpy as np

__all__ = ["EASY_VQA_COLORS", "EASY_VQA_SHAPES", "QUESTION_TYPES", "load_easy_vqa", "question_type"]

#: Question types, derived from the answer (benchmarks report accuracy per type).
QUESTION_TYPES: tuple[str, ...] = ("yes/no", "color", "shape")

#: Answers that make a question a "color" question.
EASY_VQA_COLORS: frozenset[str] = frozenset({"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"})
#: Answers that make a question a "shape" question.
EASY_VQA_SHAPES: frozenset[str] = frozenset({"circle", "rectangle", "triangle"})


def question_type(answer: str) -> str:
    """Map an easy-VQA answer to its question type: "yes/no", "color" or "shape"."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in EASY_VQA_COLORS:
        return "color"
    if answer in EASY_VQA_SHAPES:
        return "shape"
    raise ValueError(f"Unknown easy-VQA answer {answer!r}")


def _subsample(n_rows: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= n_rows:
        return np.arange(n_rows)
    return np.sort(rng.choice(n_rows, size=limit, replace=False))


def _validation_mask(labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Pick ~``val_fraction`` of the rows, stratified by answer and grouped by image.

    Grouping keeps every question about one image on the same side, so validation (like test)
    sees only unseen images.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # slow import; only when needed

    n_splits = max(2, round(1 / val_fraction))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Small subsamples have answers rarer than n_splits; sklearn warns, the split is still fine.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        if np.unique(labels, return_counts=True)[1].max() < n_splits:  # sklearn's own error does not say why
            raise ValueError(
                f"{len(labels)} training questions are too few to hold out a stratified validation split of "
                f"{val_fraction:.0%} (no answer occurs {n_splits} times): use more (`max_train` / mitp train's "
                "--max-train-samples; 64 or more)."
            )
        _, val_idx = next(splitter.split(np.zeros(len(labels)), labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[val_idx] = True
    return mask


def _split(
    texts: list[str], answers: list[str], image_ids: list[int], paths: dict[int, str], keep: np.ndarray
) -> dict:
    return {
        "image": [paths[image_ids[i]] for i in keep],
        "text": [texts[i] for i in keep],
        "label": [answers[i] for i in keep],
        "question_type": [question_type(answers[i]) for i in keep],
        "image_id": [image_ids[i] for i in keep],
    }


def load_easy_vqa(
    max_train: int | None = None, max_test: int | None = None, seed: int = 0, val_fraction: float = 0.1
) -> datasets.DatasetDict:
    """Load easy-VQA as ``train``/``validation``/``test``, in about a second.

    Columns: ``image`` (``Image()``, paths into the installed package), ``text`` (the question),
    ``label`` (``ClassLabel`` over the 13 answers, in the package's ``get_answers()`` order),
    ``question_type`` ("yes/no", "color" or "shape") and ``image_id``.

    Args:
        max_train: keep at most this many training questions, drawn at random *before* the
            validation split is carved out of them (None: all 38,575).
        max_test: keep at most this many test questions, drawn at random (None: all 9,673).
        seed: seed of the draws and of the validation split.
        val_fraction: share of the (sub-sampled) training questions that become
            ``validation``; stratified by answer and grouped by image (no image on both sides).
    """
    # Imported here so that the rest of peft_mitp.data works without the optional package.
    from easy_vqa import (
        get_answers,
        get_test_image_paths,
        get_test_questions,
        get_train_image_paths,
        get_train_questions,
    )

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    answers = get_answers()
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=answers),
            "question_type": datasets.Value("string"),
            "image_id": datasets.Value("int32"),
        }
    )
    train_texts, train_answers, train_images = get_train_questions()
    keep = _subsample(len(train_texts), max_train, rng)
    val_mask = _validation_mask(np.asarray(train_answers)[keep], np.asarray(train_images)[keep], val_fraction, seed)
    test_texts, test_answers, test_images = get_test_questions()
    train_paths, test_paths = get_train_image_paths(), get_test_image_paths()
    columns = {
        "train": _split(train_texts, train_answers, train_images, train_paths, keep[~val_mask]),
        "validation": _split(train_texts, train_answers, train_images, train_paths, keep[val_mask]),
        "test": _split(test_texts, test_answers, test_images, test_paths, _subsample(len(test_texts), max_test, rng)),
    }
    description = json.dumps(
        {"dataset": "easy_vqa", "multi_label": False, "label_column": "label", "label_names": answers}, sort_keys=True
    )
    dsd = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(cols, features=features) for name, cols in columns.items()}
    )
    for ds in dsd.values():
        ds.info.description = description  # same convention as load_prepared (see get_label_names)
    return dsd
