"""The on-disk format shared by the converters, and its loader.

A prepared folder holds one ``<split>.parquet`` per split and a ``mitp_dataset.json`` sidecar::

    out_dir/
        train.parquet  validation.parquet  test.parquet
        mitp_dataset.json        # name, multi_label, label_names, rows per split, dropped rows
        images/...               # only when image_storage == "files" (SNLI-VE)

Columns: ``image`` (``datasets.Image()``), ``text`` (str) and either ``label`` (``ClassLabel``
with the class names) or ``labels`` (fixed-length list of 0/1 float32, one per class).
Images are embedded as bytes, so the folder is self-contained, except for data sets where one
image serves many rows (SNLI-VE): there the images are stored once under ``out_dir/images`` and
the parquet keeps paths relative to ``out_dir``, which :func:`load_prepared` resolves.

Label names travel in the features for single-label data (``ClassLabel.names``). A fixed-length
list of floats has no place for names, so for every prepared data set ``dataset.info.description``
holds the sidecar as JSON; :func:`get_label_names` reads either.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "META_FILE",
    "SourceLayoutError",
    "get_label_names",
    "load_prepared",
    "read_meta",
    "require_path",
    "stratified_holdout",
    "write_meta",
    "write_split",
]

#: Name of the sidecar JSON written next to the parquet files.
META_FILE = "mitp_dataset.json"

#: Rows per parquet row group: large enough for fast scans, small enough to bound memory
#: (a Food-101 batch of 256 images is roughly 15 MB).
_BATCH_ROWS = 256


class SourceLayoutError(FileNotFoundError):
    """A source tree (or prepared folder) does not have the expected layout."""


def require_path(path: Path, layout: str, root: Path) -> Path:
    """Return ``path`` if it exists, else raise :class:`SourceLayoutError` naming it and ``layout``."""
    if not path.exists():
        raise SourceLayoutError(f"Missing {path} (looked under {root}).\nExpected layout:\n{layout}")
    return path


def write_split(path: Path, features: datasets.Features, rows: Iterable[dict[str, Any]]) -> int:
    """Stream ``rows`` (already in Arrow form) to a parquet file that ``datasets`` reads back typed.

    Rows must be Arrow-ready: images as ``{"bytes": ..., "path": ...}``, class labels as ints.
    We deliberately skip ``Features.encode_example``: for an image dict whose ``path`` happens to
    name a file in the working directory it silently drops the embedded bytes.

    The schema carries ``features`` in its ``huggingface`` metadata, so ``load_dataset("parquet")``
    restores ``Image()`` and ``ClassLabel``. The file appears atomically (written to a temporary
    name, then renamed), so an interrupted conversion never leaves a truncated split behind.

    Returns:
        The number of rows written.
    """
    schema = features.arrow_schema
    tmp = path.with_suffix(path.suffix + ".tmp")
    count = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            batch: list[dict[str, Any]] = []
            for row in rows:
                batch.append(row)
                if len(batch) == _BATCH_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    count += len(batch)
                    batch = []
            # Also reached for an empty split: an empty table still records the schema.
            if batch or count == 0:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the row source failed (e.g. a missing file): leave no debris
        raise
    os.replace(tmp, path)
    return count


def write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    """Write the sidecar JSON (see module docstring) into ``out_dir``."""
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """Read the sidecar JSON of a prepared folder."""
    root = Path(out_dir)
    path = require_path(root / META_FILE, "a folder written by a peft_mitp.data.convert_* function", root)
    return json.loads(path.read_text(encoding="utf-8"))


def stratified_holdout(labels: np.ndarray, n_holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(labels)-1`` into (kept, held out), stratified by ``labels``.

    Both index arrays are sorted, so the output keeps the source order. ``n_holdout`` must be at
    least the number of classes, and every class needs two members (scikit-learn's rule).
    """
    from sklearn.model_selection import train_test_split  # sklearn import is slow; only here

    index = np.arange(len(labels))
    if n_holdout == 0:
        return index, index[:0]
    try:
        kept, held = train_test_split(index, test_size=n_holdout, stratify=labels, random_state=seed)
    except ValueError as err:
        raise ValueError(f"Cannot hold out {n_holdout} stratified rows from {len(labels)}: {err}") from err
    return np.sort(kept), np.sort(held)


def _absolute_image_paths(batch: dict[str, list[Any]], root: str) -> dict[str, list[Any]]:
    # Module-level (not a closure) so datasets can fingerprint it and cache the map result.
    return {"image": [{"bytes": im["bytes"], "path": os.path.join(root, im["path"])} for im in batch["image"]]}


def load_prepared(out_dir: str | Path, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Load a folder written by a ``convert_*`` function as a ``DatasetDict``.

    Args:
        out_dir: the prepared folder.
        cache_dir: where ``datasets`` keeps its Arrow copy (default: the HF datasets cache).

    Returns:
        One ``Dataset`` per split, with ``info.description`` set to the sidecar JSON.
    """
    root = Path(out_dir).resolve()
    meta = read_meta(root)
    files = {
        split: str(require_path(root / f"{split}.parquet", "<split>.parquet per split", root))
        for split in meta["splits"]
    }
    dsd = datasets.load_dataset("parquet", data_files=files, cache_dir=cache_dir)
    description = json.dumps(meta, sort_keys=True)
    for split, ds in dsd.items():
        if meta.get("image_storage") == "files":
            # Paths are stored relative to out_dir so the folder can move; make them absolute.
            ds = ds.cast_column("image", datasets.Image(decode=False))
            ds = ds.map(_absolute_image_paths, batched=True, fn_kwargs={"root": str(root)}, desc="image paths")
            ds = ds.cast_column("image", datasets.Image())
        ds.info.description = description
        dsd[split] = ds
    return dsd


def get_label_names(dataset: datasets.Dataset | datasets.DatasetDict) -> list[str]:
    """Class names of a data set from this package, single- or multi-label.

    Reads ``features["label"].names`` when the label is a ``ClassLabel``, else the
    ``label_names`` recorded as JSON in ``info.description``.
    """
    if isinstance(dataset, datasets.DatasetDict):
        dataset = next(iter(dataset.values()))
    label = dataset.features.get("label")
    if isinstance(label, datasets.ClassLabel):
        return list(label.names)
    try:
        return list(json.loads(dataset.info.description)["label_names"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError("No label names: neither a ClassLabel 'label' column nor JSON in info.description") from err
