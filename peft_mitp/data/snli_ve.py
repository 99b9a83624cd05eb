"""SNLI-VE (Flickr30k image as premise + hypothesis text, 3 classes) to local parquet.

Public layout (``src_dir``)::

    snli_ve_train.jsonl  snli_ve_dev.jsonl  snli_ve_test.jsonl
    flickr30k_images/<Flickr30K_ID>.jpg

Each JSONL line has ``Flickr30K_ID``, ``sentence2`` (the hypothesis, used as text) and
``gold_label`` (entailment / neutral / contradiction).

Unlike the other converters, images are *not* embedded: each Flickr30k image is the premise of
about 17 hypotheses, so embedding would make the output ~17 times the 4.4 GB image set. The
referenced images are hard-linked (copied across file systems) once into ``out_dir/images/``
and the parquet stores paths relative to ``out_dir``; the folder stays self-contained, and
``load_prepared`` turns the paths into absolute ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import datasets

from .prepared import SourceLayoutError, require_path, write_meta, write_split

__all__ = ["SNLI_VE_LABELS", "SNLI_VE_LAYOUT", "convert_snli_ve", "snli_ve_label_names"]

logger = logging.getLogger(__name__)

#: Shown in errors when the source tree is wrong.
SNLI_VE_LAYOUT = """\
  <src_dir>/snli_ve_{train,dev,test}.jsonl   (fields Flickr30K_ID, sentence2, gold_label)
  <src_dir>/flickr30k_images/<Flickr30K_ID>.jpg"""

#: Class ids 0, 1, 2, in the order of the SNLI convention.
SNLI_VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")

#: Source file stem -> output split name.
_SPLITS = {"train": "train", "dev": "validation", "test": "test"}

_IMAGE_DIR = "images"


def _place_image(source: Path, target: Path) -> None:
    # A hard link costs no space; fall back to a copy when the two paths are on different devices
    # (or the file system has no hard links).
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _rows(src: Path, out: Path, jsonl: Path, dropped: Counter, placed: set[str]) -> Iterator[dict]:
    label_ids = {name: i for i, name in enumerate(SNLI_VE_LABELS)}
    with jsonl.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            try:
                image_id = str(record["Flickr30K_ID"]).removesuffix(".jpg")
                text, gold = record["sentence2"], record["gold_label"]
            except KeyError as err:
                raise SourceLayoutError(
                    f"{jsonl}:{line_no} lacks field {err}.\nExpected layout:\n{SNLI_VE_LAYOUT}"
                ) from None
            if gold not in label_ids:  # e.g. "-" (no annotator consensus) in some copies
                dropped[f"gold_label:{gold}"] += 1
                continue
            relative = f"{_IMAGE_DIR}/{image_id}.jpg"
            if image_id not in placed:
                source = require_path(src / "flickr30k_images" / f"{image_id}.jpg", SNLI_VE_LAYOUT, src)
                target = out / relative
                if not target.exists():  # re-running into the same folder
                    _place_image(source, target)
                placed.add(image_id)
            yield {"image": {"bytes": None, "path": relative}, "text": text, "label": label_ids[gold]}


def convert_snli_ve(src_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Convert SNLI-VE to ``train``/``validation``/``test`` parquet files in ``out_dir``.

    Args:
        src_dir: folder with the three JSONL files and ``flickr30k_images/`` (see ``SNLI_VE_LAYOUT``).
        out_dir: folder to write (created if needed); images go to ``out_dir/images/``.

    Returns:
        Rows written per split; rows with a gold label outside the three classes are dropped
        and counted in the sidecar under ``dropped``.

    Raises:
        SourceLayoutError: a JSONL file, a field, or a referenced image is missing.
    """
    src, out = Path(src_dir), Path(out_dir)
    require_path(src / "flickr30k_images", SNLI_VE_LAYOUT, src)
    files = {name: require_path(src / f"snli_ve_{stem}.jsonl", SNLI_VE_LAYOUT, src) for stem, name in _SPLITS.items()}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(SNLI_VE_LABELS)),
        }
    )
    (out / _IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    dropped: dict[str, dict[str, int]] = {}
    placed: set[str] = set()  # images shared across splits are placed once
    for name, jsonl in files.items():
        dropped_here: Counter = Counter()
        counts[name] = write_split(out / f"{name}.parquet", features, _rows(src, out, jsonl, dropped_here, placed))
        dropped[name] = dict(dropped_here)
        if dropped_here:
            logger.warning("SNLI-VE %s: dropped %s", name, dict(dropped_here))
    write_meta(
        out,
        {
            "dataset": "snli_ve",
            "multi_label": False,
            "label_column": "label",
            "label_names": list(SNLI_VE_LABELS),
            "splits": counts,
            "image_storage": "files",
            "dropped": dropped,
            "images": len(placed),
        },
    )
    return counts


def snli_ve_label_names(prepared_dir: str | Path | None = None) -> list[str]:
    """The three SNLI-VE classes in id order (fixed; ``prepared_dir`` is accepted for symmetry)."""
    return list(SNLI_VE_LABELS)
