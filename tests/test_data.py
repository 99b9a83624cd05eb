"""The data converters on small fixture trees that mimic the public layouts, and easy-VQA."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from peft_mitp.data import (
    DATASETS,
    MMIMDB_DROPPED_GENRES,
    MMIMDB_GENRES,
    QUESTION_TYPES,
    SNLI_VE_LABELS,
    SourceLayoutError,
    convert_food101,
    convert_mmimdb,
    convert_snli_ve,
    get_label_names,
    load_easy_vqa,
    load_prepared,
    read_meta,
)


def _write_image(path: Path, seed: int, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


# --------------------------------------------------------------------------- UPMC Food-101

FOOD_CLASSES = ["apple_pie", "bibimbap", "caesar_salad", "donuts"]


def _food_tree(root: Path, n_train: int = 6, n_test: int = 2) -> Path:
    """images/{train,test}/<class>/<file>.jpg and texts/{split}_titles.csv without header."""
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        for c, name in enumerate(FOOD_CLASSES):
            for i in range(n):
                file_name = f"{name}_{i}.jpg"
                _write_image(root / "images" / split / name / file_name, seed=c * 100 + i)
                # Commas and quotes, as in real recipe pages, exercise the CSV quoting.
                rows.append([file_name, f'{split} recipe {name} #{i}, "easy"', name])
        (root / "texts").mkdir(parents=True, exist_ok=True)
        with (root / "texts" / f"{split}_titles.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    return root


def test_food101_converts_with_a_stratified_validation_holdout(tmp_path: Path) -> None:
    src, out = _food_tree(tmp_path / "food"), tmp_path / "food_out"
    counts = convert_food101(src, out, val_size=8, seed=0)
    assert counts == {"train": 16, "validation": 8, "test": 8}

    shutil.rmtree(src)  # images are embedded: the prepared folder must stand alone
    dsd = load_prepared(out, cache_dir=str(tmp_path / "cache"))
    assert {name: len(ds) for name, ds in dsd.items()} == counts
    assert dsd["train"].column_names == ["image", "text", "label"]
    assert get_label_names(dsd) == FOOD_CLASSES
    # Stratified: 8 of 24 rows over 4 equal classes is exactly 2 per class.
    assert Counter(dsd["validation"]["label"]) == {0: 2, 1: 2, 2: 2, 3: 2}
    train_texts, val_texts = set(dsd["train"]["text"]), set(dsd["validation"]["text"])
    assert not train_texts & val_texts
    assert len(train_texts | val_texts) == 24
    row = dsd["test"][0]
    assert row["image"].size == (12, 8)
    assert row["text"] == 'test recipe apple_pie #0, "easy"'
    assert DATASETS["food101"].label_names(out) == FOOD_CLASSES


def test_food101_holdout_depends_on_the_seed(tmp_path: Path) -> None:
    src = _food_tree(tmp_path / "food")
    convert_food101(src, tmp_path / "a", val_size=4, seed=0)
    convert_food101(src, tmp_path / "b", val_size=4, seed=1)
    a = load_prepared(tmp_path / "a", cache_dir=str(tmp_path / "cache"))["validation"]["text"]
    b = load_prepared(tmp_path / "b", cache_dir=str(tmp_path / "cache"))["validation"]["text"]
    assert sorted(a) != sorted(b)


def test_food101_missing_csv_names_the_file_and_the_layout(tmp_path: Path) -> None:
    src = _food_tree(tmp_path / "food")
    (src / "texts" / "test_titles.csv").unlink()
    with pytest.raises(SourceLayoutError, match=r"test_titles\.csv(.|\n)*Expected layout"):
        convert_food101(src, tmp_path / "out", val_size=4)


def test_food101_missing_image_raises_unless_skipped(tmp_path: Path) -> None:
    src = _food_tree(tmp_path / "food")
    (src / "images" / "test" / "donuts" / "donuts_1.jpg").unlink()
    with pytest.raises(SourceLayoutError, match="donuts_1.jpg"):
        convert_food101(src, tmp_path / "out", val_size=4)
    counts = convert_food101(src, tmp_path / "out", val_size=4, skip_missing=True)
    assert counts["test"] == 7
    assert read_meta(tmp_path / "out")["dropped"]["test"] == {"missing_image": 1}


# --------------------------------------------------------------------------- MM-IMDB

MOVIES = {  # id -> (genres, plots)
    "0000001": (["Drama", "Comedy"], ["short plot", "a much longer plot about a comedy"]),
    "0000002": (["Drama", "Talk-Show"], ["only plot"]),
    "0000003": (["News", "Reality-TV"], ["dropped: no genre left"]),
    "0000004": (["Sci-Fi", "Film-Noir", "Action"], ["x", "the longest plot of movie four", "mid plot"]),
    "0000005": (["Western"], ["plot five"]),
    "0000006": (["Horror"], ["plot six"]),
}
SPLIT = {"train": ["0000001", "0000002", "0000003"], "dev": ["0000004"], "test": ["0000005", "0000006"]}


def _mmimdb_tree(root: Path) -> Path:
    """split.json plus dataset/<id>.json and dataset/<id>.jpeg."""
    (root / "dataset").mkdir(parents=True)
    (root / "split.json").write_text(json.dumps(SPLIT))
    for k, (movie_id, (genres, plots)) in enumerate(MOVIES.items()):
        (root / "dataset" / f"{movie_id}.json").write_text(json.dumps({"genres": genres, "plot": plots, "title": "t"}))
        _write_image(root / "dataset" / f"{movie_id}.jpeg", seed=k)
    return root


def test_mmimdb_converts_to_23_sorted_genres_and_drops_empty_movies(tmp_path: Path) -> None:
    out = tmp_path / "mmimdb_out"
    counts = convert_mmimdb(_mmimdb_tree(tmp_path / "mmimdb"), out)
    assert counts == {"train": 2, "validation": 1, "test": 2}
    assert read_meta(out)["dropped"]["train"] == {"no_genre_left": 1}

    dsd = load_prepared(out, cache_dir=str(tmp_path / "cache"))
    names = get_label_names(dsd)
    assert names == sorted(names) == list(MMIMDB_GENRES)
    assert len(names) == 23
    assert not MMIMDB_DROPPED_GENRES & set(names)
    assert dsd["train"].column_names == ["image", "text", "labels"]
    assert isinstance(dsd["train"].features["labels"], datasets.List)

    def genres_of(row: dict) -> set[str]:
        assert len(row["labels"]) == 23 and set(row["labels"]) <= {0.0, 1.0}
        return {g for g, on in zip(names, row["labels"], strict=True) if on}

    train = dsd["train"]
    assert genres_of(train[0]) == {"Drama", "Comedy"}
    assert genres_of(train[1]) == {"Drama"}  # Talk-Show dropped from the labels, the movie kept
    assert train[0]["text"] == "a much longer plot about a comedy"
    val = dsd["validation"][0]
    assert val["text"] == "the longest plot of movie four"
    assert genres_of(val) == {"Sci-Fi", "Film-Noir", "Action"}
    assert val["image"].size == (12, 8)


def test_mmimdb_missing_poster_names_the_file(tmp_path: Path) -> None:
    src = _mmimdb_tree(tmp_path / "mmimdb")
    (src / "dataset" / "0000005.jpeg").unlink()
    out = tmp_path / "out"
    with pytest.raises(SourceLayoutError, match=r"0000005\.jpeg(.|\n)*Expected layout"):
        convert_mmimdb(src, out)
    assert not list(out.glob("*.tmp"))  # the half-written split was cleaned up


def test_mmimdb_missing_split_file_is_a_clear_error(tmp_path: Path) -> None:
    src = _mmimdb_tree(tmp_path / "mmimdb")
    (src / "split.json").unlink()
    with pytest.raises(SourceLayoutError, match=r"split\.json"):
        convert_mmimdb(src, tmp_path / "out")


# --------------------------------------------------------------------------- SNLI-VE

SNLI_ROWS = {  # split stem -> [(Flickr30K_ID, hypothesis, gold_label)]
    "train": [
        ("1000", "A dog runs.", "entailment"),
        ("1000", "A cat sleeps.", "contradiction"),
        ("2000", "People outside.", "neutral"),
        ("2000", "Unclear.", "-"),
    ],
    "dev": [("3000", "Two men talk.", "neutral")],
    "test": [("3000", "Nobody is there.", "contradiction"), ("1000", "An animal.", "entailment")],
}


def _snli_tree(root: Path) -> Path:
    """snli_ve_{train,dev,test}.jsonl and flickr30k_images/<id>.jpg."""
    for k, image_id in enumerate(("1000", "2000", "3000")):
        _write_image(root / "flickr30k_images" / f"{image_id}.jpg", seed=k)
    for stem, rows in SNLI_ROWS.items():
        lines = [
            json.dumps({"Flickr30K_ID": i, "sentence1": "premise", "sentence2": h, "gold_label": g})
            for i, h, g in rows
        ]
        (root / f"snli_ve_{stem}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_snli_ve_converts_three_classes_and_stores_each_image_once(tmp_path: Path) -> None:
    src, out = _snli_tree(tmp_path / "snli"), tmp_path / "snli_out"
    counts = convert_snli_ve(src, out)
    assert counts == {"train": 3, "validation": 1, "test": 2}
    assert read_meta(out)["dropped"]["train"] == {"gold_label:-": 1}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1000.jpg", "2000.jpg", "3000.jpg"]

    # The prepared folder must survive a move and the removal of the source tree.
    shutil.rmtree(src)
    moved = out.rename(tmp_path / "moved")
    dsd = load_prepared(moved, cache_dir=str(tmp_path / "cache"))
    assert get_label_names(dsd) == list(SNLI_VE_LABELS) == ["entailment", "neutral", "contradiction"]
    assert dsd["train"]["text"] == ["A dog runs.", "A cat sleeps.", "People outside."]
    assert dsd["train"]["label"] == [0, 2, 1]
    assert dsd["test"][1]["image"].size == (12, 8)


def test_snli_ve_missing_jsonl_names_the_file(tmp_path: Path) -> None:
    src = _snli_tree(tmp_path / "snli")
    (src / "snli_ve_dev.jsonl").unlink()
    with pytest.raises(SourceLayoutError, match=r"snli_ve_dev\.jsonl(.|\n)*Expected layout"):
        convert_snli_ve(src, tmp_path / "out")


def test_snli_ve_missing_image_names_the_file(tmp_path: Path) -> None:
    src = _snli_tree(tmp_path / "snli")
    (src / "flickr30k_images" / "2000.jpg").unlink()
    with pytest.raises(SourceLayoutError, match=r"2000\.jpg"):
        convert_snli_ve(src, tmp_path / "out")


# --------------------------------------------------------------------------- registry, easy-VQA


def test_registry_lists_the_three_paper_datasets_with_their_label_kind() -> None:
    assert {name: spec.multi_label for name, spec in DATASETS.items()} == {
        "food101": False,
        "mmimdb": True,
        "snli_ve": False,
    }
    assert DATASETS["mmimdb"].converter is convert_mmimdb
    assert len(DATASETS["mmimdb"].label_names(None)) == 23
    assert DATASETS["snli_ve"].label_names(None) == list(SNLI_VE_LABELS)


def test_easy_vqa_loads_subsampled_splits_with_answers_and_question_types() -> None:
    dsd = load_easy_vqa(max_train=200, max_test=100)
    assert set(dsd) == {"train", "validation", "test"}
    assert len(dsd["train"]) + len(dsd["validation"]) == 200
    assert 10 <= len(dsd["validation"]) <= 40  # about 10 %
    assert len(dsd["test"]) == 100
    for ds in dsd.values():
        assert ds.column_names == ["image", "text", "label", "question_type", "image_id"]
    assert len(get_label_names(dsd)) == 13
    assert isinstance(dsd["train"].features["label"], datasets.ClassLabel)
    assert set(dsd["train"]["question_type"]) == set(QUESTION_TYPES)
    assert set(dsd["test"]["question_type"]) == set(QUESTION_TYPES)
    # Validation is grouped by image: no image is on both sides.
    assert not set(dsd["train"]["image_id"]) & set(dsd["validation"]["image_id"])
    row = dsd["test"][0]
    assert row["image"].size == (64, 64) and row["text"].endswith("?")


def test_easy_vqa_question_type_follows_the_answer() -> None:
    dsd = load_easy_vqa(max_train=300, max_test=10, seed=1)
    names = get_label_names(dsd)
    expected = {"yes": "yes/no", "no": "yes/no", "red": "color", "teal": "color", "circle": "shape"}
    for label, qtype in zip(dsd["train"]["label"], dsd["train"]["question_type"], strict=True):
        if names[label] in expected:
            assert qtype == expected[names[label]]
