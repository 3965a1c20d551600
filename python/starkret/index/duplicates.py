"""The near-duplicate record of a DB (``DB/duplicates.npz``), as ``starkret dedup`` writes it
and every search reads it.

One file, published whole by :func:`~starkret._io.atomic_write` (a reader sees the old
record or the new one, never a part), holding numpy arrays (no pickled objects):

- ``info``: a JSON string: ``format``, the settings (``threshold``, ``margin``,
  ``max_clusters``), where the centroids came from, and per source (sorted by name) the
  rows the run covered (``{"name", "covered"}``): a later run compares only the rows
  added since (see :mod:`starkret.index.dedup`);
- ``members_source`` (int16, an index into ``info["sources"]``), ``members_row`` (int64,
  the row in its source), ``members_group`` (int64) and ``members_kept`` (bool): every
  image of every group of two or more near duplicates; one per group is kept;
- ``centroids`` (float32) and ``assigned`` (int32, one line per covered row, sources in
  order): the clusters of the covered rows, so an incremental run places new rows in
  the same clusters.

:class:`Duplicates` reads a record for :class:`~starkret.index.db.ImageDB`: per source,
the rows to leave out of every search (as one :class:`~starkret.index.topk.Exclusions`)
and the kept image that stands in for a dropped one.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starkret._io import atomic_write
from starkret.errors import FormatError
from starkret.index.topk import Exclusions

__all__ = [
    "RECORD_FILE",
    "RECORD_FORMAT",
    "Duplicates",
    "read_record",
    "record_path",
    "write_record",
]

#: The record, at the DB folder's top (beside the sources' folders).
RECORD_FILE = "duplicates.npz"
#: Layout version of the record (``info["format"]``).
RECORD_FORMAT = 1

_ARRAYS = ("members_source", "members_row", "members_group", "members_kept")
_logger = logging.getLogger("starkret")


@dataclass
class Record:
    """A record as arrays (see the module doc)."""

    info: dict
    members_source: np.ndarray
    members_row: np.ndarray
    members_group: np.ndarray
    members_kept: np.ndarray
    centroids: np.ndarray
    assigned: np.ndarray

    @property
    def sources(self) -> list[str]:
        return [s["name"] for s in self.info["sources"]]

    @property
    def covered(self) -> dict[str, int]:
        return {s["name"]: int(s["covered"]) for s in self.info["sources"]}


def record_path(root: str | os.PathLike) -> Path:
    return Path(root) / RECORD_FILE


def read_record(root: str | os.PathLike, *, with_clusters: bool = True) -> Record | None:
    """The record of the DB at ``root``, or None if there is none.

    A file that is not a record of this format raises
    :class:`~starkret.errors.FormatError` (naming the file).
    """
    path = record_path(root)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            arrays = {name: z[name] for name in _ARRAYS}
            if with_clusters:
                arrays["centroids"] = z["centroids"]
                arrays["assigned"] = z["assigned"]
            else:
                arrays["centroids"] = arrays["assigned"] = np.zeros(0)
    except (OSError, ValueError, KeyError) as exc:
        raise FormatError(
            f"{path} is not a starkret duplicates record ({exc}): run `starkret dedup` again"
        ) from None
    if not isinstance(info, dict) or info.get("format") != RECORD_FORMAT:
        raise FormatError(
            f"{path}: a duplicates record of another format ({info.get('format')!r}); "
            "run `starkret dedup` again"
        )
    return Record(info=info, **arrays)


def write_record(root: str | os.PathLike, record: Record) -> Path:
    """Publish ``record`` as ``root/duplicates.npz`` in one atomic rename."""
    arrays = {
        "info": np.array(json.dumps(record.info)),
        "members_source": record.members_source.astype(np.int16),
        "members_row": record.members_row.astype(np.int64),
        "members_group": record.members_group.astype(np.int64),
        "members_kept": record.members_kept.astype(bool),
        "centroids": record.centroids.astype(np.float32),
        "assigned": record.assigned.astype(np.int32),
    }

    def write(f: io.BufferedWriter) -> None:
        np.savez(f, **arrays)

    return atomic_write(record_path(root), write)


class Duplicates:
    """Recorded near duplicates, per source: the rows left out of searches.

    >>> dups = Duplicates.load("db")  # doctest: +SKIP
    >>> dups.dropped("cc12m")[:3]  # doctest: +SKIP
    array([ 17, 204, 991])
    """

    def __init__(self, record: Record | None, counts: dict[str, int]) -> None:
        self.record = record
        self._dropped: dict[str, np.ndarray] = {}
        #: Per source with dropped rows, its one Exclusions (made once: every search
        #: shares it, and a source's index caches what it builds from it).
        self._exclusions: dict[str, Exclusions] = {}
        self._stand_in: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        if record is None:
            return
        names = record.sources
        for i, name in enumerate(names):
            if name in counts and counts[name] < record.covered[name]:
                _logger.warning(
                    "%s: source %s has %d rows but the record covers %d (it was rebuilt): "
                    "near duplicates are not left out; run `starkret dedup` again",
                    RECORD_FILE,
                    name,
                    counts[name],
                    record.covered[name],
                )
                self.record = None
                self._dropped.clear()
                self._exclusions.clear()
                return
            mine = record.members_source == i
            dropped = Exclusions(shared=record.members_row[mine & ~record.members_kept])
            self._dropped[name] = dropped.shared
            if len(dropped.shared):
                self._exclusions[name] = dropped
        # each group's kept image: (source number, row) by group id
        kept = record.members_kept
        order = np.argsort(record.members_group[kept], kind="stable")
        self._kept_group = record.members_group[kept][order]
        self._kept_source = record.members_source[kept][order]
        self._kept_row = record.members_row[kept][order]

    @classmethod
    def load(cls, root: str | os.PathLike, counts: dict[str, int] | None = None) -> Duplicates:
        """The record at ``root`` (none: nothing is left out); ``counts``: rows per source
        now, to notice a source rebuilt since the record was written."""
        return cls(read_record(root, with_clusters=False), counts or {})

    def __bool__(self) -> bool:
        return self.record is not None

    def dropped(self, source: str) -> np.ndarray:
        """Rows of ``source`` recorded as near duplicates of a kept image (sorted)."""
        return self._dropped.get(source, np.zeros(0, np.int64))

    def exclusions(self, source: str) -> Exclusions | None:
        """:meth:`dropped` as the one exclusion form (None when there is none): the same
        object on every call, so what a search builds from it (a faiss selector, a
        device mask) is built once."""
        return self._exclusions.get(source)

    def kept_of(self, source: str, row: int) -> tuple[str, int]:
        """The image kept in place of ``(source, row)``: itself unless it was dropped."""
        rec = self.record
        if rec is None or source not in rec.sources:
            return source, row
        rows = self.dropped(source)
        at = np.searchsorted(rows, row)
        if at >= len(rows) or rows[at] != row:
            return source, row
        s = rec.sources.index(source)
        mine = np.flatnonzero((rec.members_source == s) & (rec.members_row == row))
        group = rec.members_group[mine[0]]
        k = int(np.searchsorted(self._kept_group, group))
        return rec.sources[int(self._kept_source[k])], int(self._kept_row[k])
