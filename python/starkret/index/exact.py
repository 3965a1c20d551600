"""Searching one embedded source: its parts, the exact scan, and the search chosen per index.

- :class:`Parts`: the memory-mapped float16 ``img_emb_{i}.npy`` parts of a source and
  the global row numbering (part 0's rows first).
- :func:`exact_search`: the one exact search. Every part of the source goes to a single
  Rust call (``topk_search_parts``) that scans them on all cores and keeps one running
  top-``k`` per query and worker, so memory is O(queries x k) whatever the part count.
  Where ``build-index`` wrote an int8 copy (:mod:`starkret.index.q8`), the scan runs on
  it first and re-ranks the few rows its bound keeps: the same results, bit for bit.
- :func:`register_searcher` / :func:`searcher`: the search function of a source is
  chosen by its index kind (``exact``, ``autofaiss``, ...) and the device; other
  modules add theirs (a GPU scan, an IVF index) without touching the callers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starkret.errors import InvalidInputError, MissingIndexError
from starkret.index.q8 import Q8Copy, topk_q8_parts
from starkret.index.topk import Exclusions, topk_parts
from starkret.store.layout import part_files

__all__ = [
    "Exclusions",
    "Parts",
    "SearchFn",
    "embedding_parts",
    "exact_search",
    "register_searcher",
    "searcher",
]


def embedding_parts(source_dir: str | os.PathLike) -> list[Path]:
    """The ``img_emb_{i}.npy`` files of an embedded source, in part order."""
    parts = part_files(source_dir, "img_emb")
    if not parts:
        raise MissingIndexError(
            f"no embeddings in {Path(source_dir) / 'img_emb'}: run embed-shards first"
        )
    return parts


@dataclass
class Parts:
    """The memory-mapped float16 parts of a source, and where each starts."""

    arrays: list[np.ndarray]  # memory-mapped, float16
    offsets: np.ndarray  # offsets[i] = global row of part i's first row

    @classmethod
    def load(cls, source_dir: str | os.PathLike) -> Parts:
        arrays = [np.load(p, mmap_mode="r") for p in embedding_parts(source_dir)]
        sizes = [a.shape[0] for a in arrays]
        return cls(arrays, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.arrays[0].shape[1])

    def part_of(self, rows: np.ndarray) -> np.ndarray:
        """The part holding each global row."""
        return np.searchsorted(self.offsets, rows, side="right") - 1

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of global rows ``ids`` (any order, repeats allowed), as float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), np.float32)
        if len(ids) == 0:
            return out
        part = self.part_of(ids)
        order = np.argsort(part, kind="stable")
        bounds = np.flatnonzero(np.diff(part[order])) + 1
        for positions in np.split(order, bounds):
            p = int(part[positions[0]])
            out[positions] = self.arrays[p][ids[positions] - self.offsets[p]]
        return out


def exact_search(
    queries: np.ndarray,
    parts: Parts,
    k: int,
    *,
    exclude: Exclusions | None = None,
    threads: int | None = None,
    q8: Q8Copy | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, global rows) over every part, in one Rust call.

    Rows are -1 (score -inf) where fewer than ``k`` are eligible; ``exclude`` holds
    global rows, applied inside the scan. With ``q8`` (the source's int8 copy) the scan
    runs its first pass on it; the result is the same, bit for bit.
    """
    if q8 is None:
        return topk_parts(queries, parts.arrays, k, exclude=exclude, threads=threads)
    result = topk_q8_parts(queries, parts.arrays, q8.codes, k, exclude=exclude, threads=threads)
    q8.last_reranked = result.reranked
    return result.scores, result.ids


# ==== Choosing the search of a source ====

#: ``fn(index, queries, k, exclude, *, threads, device) -> (scores, rows)``: ``index`` is the
#: source's :class:`~starkret.index.source.SourceIndex`, ``queries`` unit float32 (q, d),
#: ``exclude`` global rows (or None); returns (q, k) float32 scores, best first, and
#: int64 global rows (-1 / -inf padding), ties ranked by lower row.
SearchFn = Callable[..., tuple[np.ndarray, np.ndarray]]

_SEARCHERS: dict[tuple[str, str], SearchFn] = {}


def register_searcher(kind: str, device: str, fn: SearchFn) -> None:
    """Use ``fn`` to search sources whose index is ``kind`` on ``device`` (``cpu``,
    ``cuda``; ``kind="*"``: any index kind on that device)."""
    _SEARCHERS[(kind, device)] = fn


def searcher(kind: str, device: str) -> SearchFn:
    """The search function for an index ``kind`` on ``device`` (``cuda:1`` counts as cuda)."""
    base = str(device).split(":", 1)[0]
    for key in ((kind, base), ("*", base)):
        if key in _SEARCHERS:
            return _SEARCHERS[key]
    known = sorted({d for _, d in _SEARCHERS})
    raise InvalidInputError(
        f"no search for a {kind!r} index on device {device!r} (devices: {known})"
    )


def _exact(index, queries, k, exclude, *, threads=None, **_):
    q8 = getattr(index, "q8", None)
    return exact_search(queries, index.parts, k, exclude=exclude, threads=threads, q8=q8)


register_searcher("*", "cpu", _exact)
