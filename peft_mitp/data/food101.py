"""UPMC Food-101 (recipe-page text + food photo, 101 classes) to local parquet.

Public layout (``src_dir``)::

    images/train/<class>/<file>.jpg     images/test/<class>/<file>.jpg
    texts/train_titles.csv              texts/test_titles.csv

Each CSV row is ``image_file_name,text,label`` with no header. There is no official
validation split, so, as in the prompt-fusion literature, ``val_size`` stratified training
rows (default 5,000) become ``validation``.
"""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np

from .prepared import SourceLayoutError, read_meta, require_path, stratified_holdout, write_meta, write_split

__all__ = ["FOOD101_LAYOUT", "convert_food101", "food101_label_names"]

logger = logging.getLogger(__name__)

#: Shown in errors when the source tree is wrong.
FOOD101_LAYOUT = """\
  <src_dir>/images/{train,test}/<class>/<file>.jpg
  <src_dir>/texts/{train,test}_titles.csv   (rows: image_file_name,text,label; no header)"""

_HEADER = ["image_file_name", "text", "label"]

_Record = tuple[Path, str, str]  # (image path, text, class name)


def _read_titles(src: Path, split: str) -> list[_Record]:
    csv_path = require_path(src / "texts" / f"{split}_titles.csv", FOOD101_LAYOUT, src)
    image_dir = require_path(src / "images" / split, FOOD101_LAYOUT, src)
    # Recipe pages can exceed csv's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))
    records: list[_Record] = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if line_no == 1 and row == _HEADER:  # tolerate copies that gained a header
                continue
            if len(row) != 3:
                raise SourceLayoutError(f"{csv_path}:{line_no}: expected 3 fields, got {len(row)}.\n{FOOD101_LAYOUT}")
            file_name, text, label = row
            records.append((image_dir / label / file_name, text, label))
    return records


def _drop_missing(records: list[_Record], skip_missing: bool, src: Path) -> tuple[list[_Record], int]:
    kept = [r for r in records if r[0].is_file()]
    missing = len(records) - len(kept)
    if missing and not skip_missing:
        first = next(r[0] for r in records if not r[0].is_file())
        raise SourceLayoutError(
            f"{missing} image(s) listed in the CSV are missing, e.g. {first} (looked under {src}). "
            f"Pass skip_missing=True to drop those rows.\nExpected layout:\n{FOOD101_LAYOUT}"
        )
    return kept, missing


def _rows(records: list[_Record], label_ids: dict[str, int]) -> Iterator[dict]:
    for path, text, label in records:
        # Embed the original file bytes (no re-encoding); keep only the file name as path.
        yield {"image": {"bytes": path.read_bytes(), "path": path.name}, "text": text, "label": label_ids[label]}


def convert_food101(
    src_dir: str | Path, out_dir: str | Path, val_size: int = 5000, seed: int = 0, skip_missing: bool = False
) -> dict[str, int]:
    """Convert UPMC Food-101 to ``train``/``validation``/``test`` parquet files in ``out_dir``.

    Args:
        src_dir: root of the public release (see ``FOOD101_LAYOUT``).
        out_dir: folder to write (created if needed); load it with ``load_prepared``.
        val_size: training rows held out, stratified by class, as ``validation`` (0: none).
        seed: seed of the holdout draw.
        skip_missing: drop CSV rows whose image file is missing instead of raising.

    Returns:
        Rows written per split. Rows dropped for missing images are recorded in the sidecar.

    Raises:
        SourceLayoutError: a file or folder of the expected layout is missing.
        ValueError: a test label unseen in training, or a holdout sklearn cannot stratify.
    """
    src, out = Path(src_dir), Path(out_dir)
    records = {split: _read_titles(src, split) for split in ("train", "test")}
    class_names = sorted({r[2] for r in records["train"]})
    unseen = sorted({r[2] for r in records["test"]} - set(class_names))
    if unseen:
        raise ValueError(f"Test classes absent from training: {unseen[:5]}")
    missing: dict[str, int] = {}
    for split in records:
        records[split], missing[split] = _drop_missing(records[split], skip_missing, src)
        if missing[split]:
            logger.warning("Food-101 %s: dropped %d rows whose image is missing", split, missing[split])

    label_ids = {name: i for i, name in enumerate(class_names)}
    train_labels = np.array([label_ids[r[2]] for r in records["train"]])
    kept, held = stratified_holdout(train_labels, val_size, seed)
    splits = {"train": [records["train"][i] for i in kept], "test": records["test"]}
    if val_size:
        splits["validation"] = [records["train"][i] for i in held]

    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "label": datasets.ClassLabel(names=class_names)}
    )
    out.mkdir(parents=True, exist_ok=True)
    counts = {
        name: write_split(out / f"{name}.parquet", features, _rows(recs, label_ids)) for name, recs in splits.items()
    }
    write_meta(
        out,
        {
            "dataset": "food101",
            "multi_label": False,
            "label_column": "label",
            "label_names": class_names,
            "splits": counts,
            "image_storage": "embedded",
            # Same shape as the other converters: split -> reason -> rows dropped.
            "dropped": {split: {"missing_image": n} if n else {} for split, n in missing.items()},
            "val_size": val_size,
            "seed": seed,
        },
    )
    return counts


def food101_label_names(prepared_dir: str | Path) -> list[str]:
    """The class names of a converted Food-101 folder (they come from the data, in sorted order)."""
    return list(read_meta(prepared_dir)["label_names"])
