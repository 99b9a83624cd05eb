"""Data sets for text-image classification, as ``datasets.DatasetDict`` objects.

Every data set has the columns ``image`` (``datasets.Image()``) and ``text`` (str), plus either
``label`` (int, a ``ClassLabel`` carrying the class names) for single-label data or ``labels``
(a fixed-length list of 0/1 floats, one per class) for multi-label data; ``get_label_names``
returns the class names of either kind (see :mod:`peft_mitp.data.prepared`).

- ``load_easy_vqa``: the small benchmark that installs from PyPI.
- ``convert_food101`` / ``convert_mmimdb`` / ``convert_snli_ve``: the paper's data sets, from
  their public layouts to a self-contained folder of parquet files; ``load_prepared`` loads it.
- ``DATASETS``: name -> :class:`DatasetSpec`, for command lines
  (``DATASETS[name].converter(src_dir, out_dir)``, then ``load_prepared(out_dir)``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from .easy_vqa import QUESTION_TYPES, load_easy_vqa, question_type
from .food101 import FOOD101_LAYOUT, convert_food101, food101_label_names
from .mmimdb import MMIMDB_DROPPED_GENRES, MMIMDB_GENRES, MMIMDB_LAYOUT, convert_mmimdb, mmimdb_label_names
from .prepared import META_FILE, SourceLayoutError, get_label_names, load_prepared, read_meta
from .snli_ve import SNLI_VE_LABELS, SNLI_VE_LAYOUT, convert_snli_ve, snli_ve_label_names

__all__ = [
    "DATASETS",
    "FOOD101_LAYOUT",
    "META_FILE",
    "MMIMDB_DROPPED_GENRES",
    "MMIMDB_GENRES",
    "MMIMDB_LAYOUT",
    "QUESTION_TYPES",
    "SNLI_VE_LABELS",
    "SNLI_VE_LAYOUT",
    "DatasetSpec",
    "SourceLayoutError",
    "convert_food101",
    "convert_mmimdb",
    "convert_snli_ve",
    "get_label_names",
    "load_easy_vqa",
    "load_prepared",
    "question_type",
    "read_meta",
]


class DatasetSpec(NamedTuple):
    """How to prepare one of the paper's data sets.

    Attributes:
        converter: ``converter(src_dir, out_dir, ...) -> rows per split``.
        multi_label: True when the data set has a ``labels`` (0/1 per class) column, scored
            with BCE and F1-macro/micro; False for a ``label`` column and accuracy.
        label_names: ``label_names(prepared_dir) -> class names`` in id order. Food-101 reads
            them from the converted folder; the others are fixed and ignore the argument.
    """

    converter: Callable[..., dict[str, int]]
    multi_label: bool
    label_names: Callable[[str | Path], list[str]]


#: The paper's data sets by command-line name.
DATASETS: dict[str, DatasetSpec] = {
    "food101": DatasetSpec(convert_food101, False, food101_label_names),
    "mmimdb": DatasetSpec(convert_mmimdb, True, mmimdb_label_names),
    "snli_ve": DatasetSpec(convert_snli_ve, False, snli_ve_label_names),
}
