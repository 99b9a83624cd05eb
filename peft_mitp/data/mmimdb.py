"""MM-IMDB (movie poster + plot, multi-label over 23 genres) to local parquet.

Public layout (``src_dir``)::

    split.json              {"train": [ids], "dev": [ids], "test": [ids]}
    dataset/<id>.json       {"genres": [...], "plot": [str, ...], ...}
    dataset/<id>.jpeg       the poster

Conventions (the prompt-fusion literature's): text is the longest plot; the genres "News",
"Reality-TV" and "Talk-Show" are dropped from the label set, leaving 23; a movie left with no
genre is dropped (the count is logged and stored in the sidecar). Note that MMBT's script
instead drops every movie tagged "News"; the difference is a handful of movies.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import datasets

from .prepared import SourceLayoutError, require_path, write_meta, write_split

__all__ = ["MMIMDB_DROPPED_GENRES", "MMIMDB_GENRES", "MMIMDB_LAYOUT", "convert_mmimdb", "mmimdb_label_names"]

logger = logging.getLogger(__name__)

#: Shown in errors when the source tree is wrong.
MMIMDB_LAYOUT = """\
  <src_dir>/split.json          {"train": [ids], "dev": [ids], "test": [ids]}
  <src_dir>/dataset/<id>.json   with "genres" (list) and "plot" (list of str)
  <src_dir>/dataset/<id>.jpeg"""

#: Genres removed from the label set (too rare to learn).
MMIMDB_DROPPED_GENRES: frozenset[str] = frozenset({"News", "Reality-TV", "Talk-Show"})

#: The 23 genres, sorted: position k is column k of ``labels``. Fixed rather than read from the
#: data so that every conversion (and every subset) shares one label order.
MMIMDB_GENRES: tuple[str, ...] = tuple(
    sorted(
        [
            "Action", "Adventure", "Animation", "Biography", "Comedy", "Crime", "Documentary", "Drama",
            "Family", "Fantasy", "Film-Noir", "History", "Horror", "Music", "Musical", "Mystery",
            "Romance", "Sci-Fi", "Short", "Sport", "Thriller", "War", "Western",
        ]
    )
)  # fmt: skip

#: split.json key -> output split name.
_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def _rows(src: Path, ids: list[str], dropped: Counter, notes: Counter) -> Iterator[dict]:
    index = {g: k for k, g in enumerate(MMIMDB_GENRES)}
    for movie_id in ids:
        meta_path = require_path(src / "dataset" / f"{movie_id}.json", MMIMDB_LAYOUT, src)
        image_path = require_path(src / "dataset" / f"{movie_id}.jpeg", MMIMDB_LAYOUT, src)
        record = json.loads(meta_path.read_text(encoding="utf-8"))
        if "genres" not in record:
            raise SourceLayoutError(f"{meta_path} has no 'genres' field.\nExpected layout:\n{MMIMDB_LAYOUT}")
        labels = [0.0] * len(MMIMDB_GENRES)
        for genre in record["genres"]:
            if genre in index:
                labels[index[genre]] = 1.0
            elif genre not in MMIMDB_DROPPED_GENRES:
                notes[f"unknown_genre:{genre}"] += 1  # kept out of the label set, but reported
        if not any(labels):
            dropped["no_genre_left"] += 1
            continue
        plots = record.get("plot") or [""]
        if not record.get("plot"):
            notes["no_plot"] += 1
        # max() returns the first of equally long plots, like the reference scripts' argmax.
        text = max(plots, key=len)
        yield {"image": {"bytes": image_path.read_bytes(), "path": image_path.name}, "text": text, "labels": labels}


def convert_mmimdb(src_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Convert MM-IMDB to ``train``/``validation``/``test`` parquet files in ``out_dir``.

    ``labels`` is a list of 23 floats (0/1) in :data:`MMIMDB_GENRES` order; the names are in the
    sidecar and, after ``load_prepared``, in ``info.description`` (see ``get_label_names``).

    Args:
        src_dir: root of the public release (see ``MMIMDB_LAYOUT``); ``dev`` becomes ``validation``.
        out_dir: folder to write (created if needed).

    Returns:
        Rows written per split. Movies dropped for having no genre left are counted in the
        sidecar as ``dropped[split]["no_genre_left"]``; genres outside the 26 known ones and
        movies without a plot are counted under ``notes``; both are logged.

    Raises:
        SourceLayoutError: ``split.json``, a split key, or a movie's ``.json``/``.jpeg`` is missing.
    """
    src, out = Path(src_dir), Path(out_dir)
    split_ids = json.loads(require_path(src / "split.json", MMIMDB_LAYOUT, src).read_text(encoding="utf-8"))
    require_path(src / "dataset", MMIMDB_LAYOUT, src)
    absent = [key for key in _SPLITS if key not in split_ids]
    if absent:
        raise SourceLayoutError(f"{src / 'split.json'} lacks the key(s) {absent}.\nExpected layout:\n{MMIMDB_LAYOUT}")

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "labels": datasets.List(datasets.Value("float32"), length=len(MMIMDB_GENRES)),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    dropped: dict[str, dict[str, int]] = {}
    notes: dict[str, dict[str, int]] = {}
    for key, name in _SPLITS.items():
        ids = [str(i) for i in split_ids[key]]
        dropped_here, notes_here = Counter(), Counter()
        counts[name] = write_split(out / f"{name}.parquet", features, _rows(src, ids, dropped_here, notes_here))
        dropped[name], notes[name] = dict(dropped_here), dict(notes_here)
        if dropped_here or notes_here:
            logger.warning("MM-IMDB %s: dropped %s; notes %s", name, dict(dropped_here), dict(notes_here))
    write_meta(
        out,
        {
            "dataset": "mmimdb",
            "multi_label": True,
            "label_column": "labels",
            "label_names": list(MMIMDB_GENRES),
            "splits": counts,
            "image_storage": "embedded",
            "dropped": dropped,
            "notes": notes,
        },
    )
    return counts


def mmimdb_label_names(prepared_dir: str | Path | None = None) -> list[str]:
    """The 23 MM-IMDB genres in column order (fixed; ``prepared_dir`` is accepted for symmetry)."""
    return list(MMIMDB_GENRES)
