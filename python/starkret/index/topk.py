"""Exact batched inner-product top-k over float16 / float32 embeddings, in Rust.

The database may be an array in memory, a memory-mapped ``.npy`` file or the path of
one; it is read in place (never copied or loaded whole), so a 25M x 768 float16
collection on disk can be searched with a few hundred MB of RAM.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

import starkret._core as _core
from starkret.errors import InvalidInputError, InvalidTypeError

__all__ = [
    "Exclude",
    "Exclusions",
    "count_above",
    "merge_topk",
    "topk",
    "topk_parts",
]

#: Row ids to leave out: one collection for every query, or one per query.
Exclude = Iterable[int] | Sequence[Iterable[int]] | None

_DB_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def topk(
    queries: np.ndarray,
    database: np.ndarray | str | os.PathLike[str],
    k: int,
    *,
    exclude: Exclude = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` database rows with the largest inner product with each query, exactly.

    Scores are accumulated in float32 (float16 rows are widened exactly first). Ties
    rank the lower row id first, so results are the same whatever ``threads`` is.
    The whole batch is served by one pass over the database, on all cores by default,
    with the GIL released.

    Args:
        queries: ``(q, d)`` float32 (float16 and float64 are converted).
        database: ``(n, d)`` float16 or float32, C-contiguous: an array, a memory map
            (``np.load(path, mmap_mode="r")``) or the path of a ``.npy`` file, which is
            memory-mapped, not loaded.
        k: results per query (at least 1; may exceed ``n``).
        exclude: row ids never returned: one collection (a set, list or 1-D array)
            for every query, or a sequence of ``q`` collections, one per query.
            Exclusion happens inside the scan, so ``k`` results still come back when
            enough rows remain. Ids outside ``[0, n)`` exclude nothing.
        threads: worker threads (default: all cores).

    Returns:
        ``(scores, ids)``, both ``(q, k)``: float32 scores in descending order and
        int64 row ids. Where fewer than ``k`` rows are eligible the rest is padding
        with score ``-inf`` and id ``-1``.

    >>> import numpy as np, starkret
    >>> db = np.array([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=np.float16)
    >>> scores, ids = starkret.topk(np.array([[1.0, 0.0]], dtype=np.float32), db, k=3)
    >>> ids.tolist(), scores.tolist()
    ([[0, 2, 3]], [[1.0, 1.0, 1.0]])
    >>> starkret.topk(np.array([[1.0, 0.0]]), db, k=3, exclude={0})[1].tolist()
    [[2, 3, 1]]
    """
    db = _open_database(database)
    q = _as_queries(queries)
    if q.shape[1] != db.shape[1]:
        raise InvalidInputError(
            f"queries have dimension {q.shape[1]} but the database rows have {db.shape[1]}"
        )
    return topk_parts(q, [db], k, exclude=exclude, threads=threads)


def topk_parts(
    queries: np.ndarray,
    parts: Sequence[np.ndarray | str | os.PathLike[str]],
    k: int,
    *,
    exclude: Exclude | Exclusions = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk` over several parts searched as one database, in one pass.

    Row ids run on across the parts in order (``parts[1]``'s first row follows
    ``parts[0]``'s last), as if the parts were concatenated, and ``exclude`` uses the
    same global ids. Nothing is concatenated or loaded: each part (array, memory map or
    ``.npy`` path) is read in place, and memory is O(queries x k) for any part count.

    >>> import numpy as np, starkret
    >>> a = np.array([[1, 0], [0, 1]], dtype=np.float16)
    >>> b = np.array([[1, 1]], dtype=np.float16)
    >>> starkret.topk_parts(np.array([[1.0, 1.0]]), [a, b], k=2)[1].tolist()
    [[2, 0]]
    """
    arrays = [_open_database(p) for p in parts]
    if not arrays:
        raise InvalidInputError("the database has no parts")
    q = _as_queries(queries)
    for i, a in enumerate(arrays):
        if a.shape[1] != q.shape[1]:
            raise InvalidInputError(
                f"queries have dimension {q.shape[1]} but the rows of part {i} have {a.shape[1]}"
            )
    k = _check_k(k)
    _check_threads(threads)
    options: dict[str, object] = {"threads": threads}
    exclusions = Exclusions.parse(exclude, q.shape[0])
    if exclusions is not None:
        options.update(exclusions.core_options())
    views = [a.view(np.uint16) if a.dtype == np.float16 else a for a in arrays]
    return _core.topk_search_parts(q, views, k, **options)


def count_above(
    queries: np.ndarray,
    parts: Sequence[np.ndarray | str | os.PathLike[str]],
    thresholds: np.ndarray,
    *,
    exclude: Exclude | Exclusions = None,
    threads: int | None = None,
) -> np.ndarray:
    """Per query, how many rows of ``parts`` score strictly above its threshold
    (``exclude``: rows never counted, as in :func:`topk_parts`).

    The same Rust scan as :func:`topk_parts` (same kernel, same float32 arithmetic),
    counting instead of ranking: the rank of a known image among all others, which
    retrieval metrics (MRR) need, in one pass whatever the rank.

    >>> import numpy as np
    >>> from starkret.index.topk import count_above
    >>> db = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float16)
    >>> count_above(np.array([[1.0, 0.0]]), [db], np.array([0.5])).tolist()
    [2]
    """
    arrays = [_open_database(p) for p in parts]
    if not arrays:
        raise InvalidInputError("the database has no parts")
    q = _as_queries(queries)
    thresholds = np.ascontiguousarray(thresholds, np.float32).reshape(-1)
    if len(thresholds) != len(q):
        raise InvalidInputError(f"{len(thresholds)} thresholds for {len(q)} queries")
    _check_threads(threads)
    options: dict[str, object] = {"threads": threads}
    exclusions = Exclusions.parse(exclude, q.shape[0])
    if exclusions is not None:
        options.update(exclusions.core_options())
    views = [a.view(np.uint16) if a.dtype == np.float16 else a for a in arrays]
    return _core.count_above_parts(q, views, thresholds, **options).astype(np.int64)


def merge_topk(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of several ``(scores, ids)`` results for the same queries.

    Each part is what :func:`topk` returned for one slice of a collection, with its
    ids already made global (e.g. the slice's first row added). The rank order is
    :func:`topk`'s (score descending, lower id first) and padding (id ``-1``) is
    dropped, so merging the parts of a split collection equals searching it whole.

    >>> import numpy as np, starkret
    >>> a = (np.array([[0.9, 0.1]], np.float32), np.array([[4, 7]]))
    >>> b = (np.array([[0.5, -np.inf]], np.float32), np.array([[12, -1]]))
    >>> starkret.merge_topk([a, b], k=3)[1].tolist()
    [[4, 12, 7]]
    """
    k = _check_k(k)
    if not parts:
        raise InvalidInputError("merge_topk needs at least one (scores, ids) part")
    scores, ids = [], []
    for i, (s, d) in enumerate(parts):
        s, d = np.asarray(s), np.asarray(d)
        if s.ndim != 2 or s.shape != d.shape:
            raise InvalidInputError(
                f"part {i}: scores {s.shape} and ids {d.shape} must be 2-D of equal shape"
            )
        scores.append(s.astype(np.float32, copy=False))
        ids.append(d.astype(np.int64, copy=False))
    rows = {s.shape[0] for s in scores}
    if len(rows) != 1:
        raise InvalidInputError(f"parts have different numbers of queries: {sorted(rows)}")
    return _core.merge_topk(
        np.ascontiguousarray(np.concatenate(scores, axis=1)),
        np.ascontiguousarray(np.concatenate(ids, axis=1)),
        k,
    )


def _open_database(database: np.ndarray | str | os.PathLike[str]) -> np.ndarray:
    if isinstance(database, (str, os.PathLike)):
        database = np.load(os.fspath(database), mmap_mode="r", allow_pickle=False)
    if not isinstance(database, np.ndarray):
        raise InvalidTypeError(
            f"database must be a numpy array or the path of a .npy file, "
            f"got {type(database).__name__}"
        )
    if database.dtype not in _DB_DTYPES:
        raise InvalidTypeError(f"database must be float16 or float32, got {database.dtype}")
    if database.ndim != 2:
        raise InvalidInputError(f"database must be 2-D (n, d), got shape {database.shape}")
    if database.shape[1] == 0:
        raise InvalidInputError("database rows must have at least one dimension")
    if not database.flags.c_contiguous:
        # A copy of a large collection could exhaust memory; the caller decides.
        raise InvalidInputError(
            "database must be C-contiguous (row-major); pass np.ascontiguousarray(database) "
            "if a copy of it fits in memory"
        )
    return database


def _as_queries(queries: np.ndarray) -> np.ndarray:
    queries = np.asarray(queries)
    if not np.issubdtype(queries.dtype, np.floating):
        raise InvalidTypeError(f"queries must be floating point, got {queries.dtype}")
    if queries.ndim != 2:
        raise InvalidInputError(f"queries must be 2-D (q, d), got shape {queries.shape}")
    return np.ascontiguousarray(queries, dtype=np.float32)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidTypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise InvalidInputError(f"k must be at least 1, got {k}")
    return int(k)


def _check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise InvalidInputError(f"threads must be a positive int or None, got {threads!r}")


def _id_array(ids: Iterable[int], what: str) -> np.ndarray:
    array = np.asarray(list(ids) if isinstance(ids, (set, frozenset)) else ids)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise InvalidTypeError(f"{what} must hold integer row ids, got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array, dtype=np.int64)


# ==== Exclusions: the one form, and its one parser ====

_NO_ROWS = np.zeros(0, np.int64)


def _is_row(item: object) -> bool:
    return isinstance(item, (int, np.integer)) and not isinstance(item, bool)


def _is_key(item: object) -> bool:
    return isinstance(item, str)


#: Per source name, every row of each key found: ``rows_of(keys) -> {key: rows}``.
RowsOfKeys = Callable[[list[str]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Exclusions:
    """Row ids never to return: ``shared`` for every query, one array per query
    (``per_query``), or both: a row is excluded for query ``q`` when it is in ``shared``
    or in ``per_query[q]``.

    The one form exclusions take between modules: what a caller gives (a set, list or
    array of rows; one such collection per query; image keys) is read once, at the API
    boundary, by :meth:`parse` or :meth:`of_keys`, and every search (exact, ivf, faiss,
    torch device) takes the result.

    ``shared`` is kept sorted without repeats and read-only, from construction on, so a
    large shared set (a DB's recorded near duplicates) is sorted once, never copied into
    each query's array, and searched by bisection: combining it with per-query
    exclusions (:meth:`union`) costs nothing per row of it.

    >>> Exclusions.parse({3, 1}, n_queries=2).of_query(1).tolist()
    [1, 3]
    >>> Exclusions.parse([[0], [2, 5]], n_queries=2).pairs(2)
    (array([0, 1, 1]), array([0, 2, 5]))
    >>> both = Exclusions(shared=np.array([4, 1])).union(Exclusions.parse([[0], [2]], 2), 2)
    >>> both.shared.tolist(), both.of_query(1).tolist()
    ([1, 4], [1, 2, 4])
    """

    shared: np.ndarray | None = None
    per_query: tuple[np.ndarray, ...] | None = None

    def __post_init__(self) -> None:
        if self.shared is not None:
            object.__setattr__(self, "shared", _sorted_unique(self.shared))
        if self.per_query is not None and not isinstance(self.per_query, tuple):
            object.__setattr__(self, "per_query", tuple(self.per_query))

    # ==== reading what callers give ====

    @classmethod
    def parse(cls, exclude, n_queries: int) -> Exclusions | None:
        """Row ids given as one collection (set, list, tuple, 1-D array) for every query,
        a sequence of ``n_queries`` collections (or a 2-D array), or an ``Exclusions``."""
        if exclude is None:
            return None
        if isinstance(exclude, Exclusions):
            exclude.check(n_queries)
            return exclude
        shape, items = cls._split(exclude, n_queries, keys=False)
        if shape == "shared":
            return cls(shared=_id_array(items, "exclude"))
        return cls(per_query=tuple(_id_array(e, f"exclude[{i}]") for i, e in enumerate(items)))

    @classmethod
    def of_keys(
        cls, exclude, n_queries: int, sources: Mapping[str, RowsOfKeys]
    ) -> dict[str, Exclusions] | None:
        """Image keys (one collection for every query, or one per query) as the rows of
        every source that hold them: ``{source name: Exclusions}``.

        ``sources`` maps each source name to its key lookup (every row of each key).
        """
        if exclude is None:
            return None
        shape, items = cls._split(exclude, n_queries, keys=True)
        collections = [items] if shape == "shared" else items
        wanted = sorted({str(key) for keys in collections for key in keys})
        out = {}
        for name, rows_of in sources.items():
            found = rows_of(wanted) if wanted else {}

            def rows(keys, found=found) -> np.ndarray:
                hits = [found[str(key)] for key in keys if str(key) in found]
                return np.unique(np.concatenate(hits)) if hits else _NO_ROWS

            if shape == "shared":
                out[name] = cls(shared=rows(items))
            else:
                out[name] = cls(per_query=tuple(rows(keys) for keys in items))
        return out

    @staticmethod
    def _split(exclude, n_queries: int, *, keys: bool):
        """``("shared", items)`` (one collection for every query) or ``("per_query",
        [items, ...])``; items are row ids, or image keys with ``keys=True``."""
        is_item = _is_key if keys else _is_row
        what = "keys" if keys else "row ids"
        if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable):
            raise InvalidTypeError(
                f"exclude must be a collection of {what}, not a single {type(exclude).__name__}"
            )
        if isinstance(exclude, np.ndarray):
            if exclude.ndim == 2:
                items = list(exclude)
            elif exclude.ndim <= 1:
                return ("shared", exclude.reshape(-1))
            else:
                raise InvalidInputError(f"exclude must be 1-D or 2-D, got shape {exclude.shape}")
        elif isinstance(exclude, (set, frozenset)):
            return ("shared", exclude)
        else:
            items = list(exclude)
        if not items or all(is_item(i) for i in items):
            return ("shared", items)
        if any(is_item(i) or isinstance(i, (str, bytes)) for i in items):
            raise InvalidTypeError(
                f"exclude mixes single {what} and collections; give one collection for all "
                "queries or one per query"
            )
        if len(items) != n_queries:
            raise InvalidInputError(
                f"exclude has {len(items)} per-query collections for {n_queries} queries"
            )
        return ("per_query", items)

    # ==== reading it ====

    def _shared(self) -> np.ndarray:
        return _NO_ROWS if self.shared is None else self.shared

    def of_query(self, q: int) -> np.ndarray:
        """The rows excluded for query ``q`` (sorted; one query's copy of ``shared``)."""
        if self.per_query is None:
            return self._shared()
        if self.shared is None or not len(self.shared):
            return self.per_query[q]
        return np.union1d(self.shared, self.per_query[q])

    def largest(self) -> int:
        """Most rows excluded for one query (how many extra hits a post-filter needs)."""
        return len(self._shared()) + self.largest_per_query()

    def largest_per_query(self) -> int:
        """Most rows ``per_query`` excludes for one query (``shared`` left out): the extra
        hits a post-filter needs when ``shared`` is applied inside the search."""
        if self.per_query is None:
            return 0
        return max((len(e) for e in self.per_query), default=0)

    def without_shared(self) -> Exclusions | None:
        """The per-query part alone (None when there is none)."""
        return None if self.per_query is None else Exclusions(per_query=self.per_query)

    def check(self, n_queries: int) -> None:
        if self.per_query is not None and len(self.per_query) != n_queries:
            raise InvalidInputError(
                f"exclude has {len(self.per_query)} per-query collections for {n_queries} queries"
            )

    def union(self, other: Exclusions | None, n_queries: int) -> Exclusions:
        """Rows excluded by either; shared rows stay shared (merged, never tiled per
        query), so the cost does not grow with queries x shared rows."""
        if other is None:
            return self
        self.check(n_queries)
        other.check(n_queries)
        shared = _merge_sorted(self.shared, other.shared)
        if self.per_query is None or other.per_query is None:
            per_query = self.per_query if other.per_query is None else other.per_query
        else:
            per_query = tuple(
                np.union1d(a, b) for a, b in zip(self.per_query, other.per_query, strict=True)
            )
        return Exclusions(shared=shared, per_query=per_query)

    def pairs(self, n_queries: int, *, shared: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """Every exclusion as ``(query, row)`` int64 arrays sorted by row (rows < 0
        dropped), or None if there is none: what a tiled scan masks tile by tile.

        ``shared=False`` leaves the shared rows out (they are then not tiled per query:
        a scan masks them for every query at once); with them, the pairs grow with
        queries x shared rows.
        """
        self.check(n_queries)
        sizes = [len(e) for e in self.per_query] if self.per_query is not None else []
        queries = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        rows = np.concatenate([_NO_ROWS, *(self.per_query or ())])
        common = self._shared() if shared else _NO_ROWS
        if len(common):
            queries = np.concatenate(
                [queries, np.repeat(np.arange(n_queries, dtype=np.int64), len(common))]
            )
            rows = np.concatenate([rows, np.tile(common, n_queries)])
        keep = rows >= 0
        queries, rows = queries[keep], rows[keep]
        if rows.size == 0:
            return None
        order = np.lexsort((queries, rows))  # by row, then query; no repeated pair
        queries, rows = queries[order], rows[order]
        first = np.ones(len(rows), bool)
        first[1:] = (rows[1:] != rows[:-1]) | (queries[1:] != queries[:-1])
        return queries[first], rows[first]

    def mask(self, rows: np.ndarray) -> np.ndarray:
        """For a ``(q, m)`` array of rows (one line per query), where they are excluded."""
        rows = np.asarray(rows, np.int64)
        out = _in_sorted(self._shared(), rows)
        if self.per_query is None:
            return out
        self.check(rows.shape[0])
        pairs = self.pairs(rows.shape[0], shared=False)
        if pairs is None:
            return out
        # one int64 per (query, row): query * stride + row, rows in [0, stride)
        stride = int(max(int(rows.max(initial=0)), int(pairs[1][-1]))) + 1
        banned = pairs[0] * stride + pairs[1]
        queries = np.arange(rows.shape[0], dtype=np.int64)[:, None]
        return out | ((rows >= 0) & np.isin(queries * stride + rows, banned))

    def core_options(self) -> dict[str, object]:
        """Keyword arguments of the Rust search (the shared rows are passed as they are:
        sorted, so the Rust side borrows them without a copy)."""
        options: dict[str, object] = {}
        if self.shared is not None and (len(self.shared) or self.per_query is None):
            options["exclude"] = self.shared
        if self.per_query is not None:
            options["exclude_per_query"] = list(self.per_query)
        return options


# ==== sorted shared rows: normalised once, then trusted ====

#: Arrays :func:`_sorted_unique` made or checked (read-only), by id: they are not
#: checked again when an ``Exclusions`` is built from them (e.g. each :meth:`union`).
_NORMALISED: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def _sorted_unique(rows) -> np.ndarray:
    """``rows`` as a read-only sorted int64 array without repeats (the same array when
    it already is one this module made)."""
    if isinstance(rows, np.ndarray) and _NORMALISED.get(id(rows)) is rows:
        return rows
    rows = _id_array(rows, "shared exclusions")
    if len(rows) > 1 and not bool(np.all(rows[1:] > rows[:-1])):
        rows = np.unique(rows)
    elif rows.flags.writeable:  # the caller's array: a copy it cannot change under us
        rows = rows.copy()
    return _trusted(rows)


def _trusted(rows: np.ndarray) -> np.ndarray:
    """Marks a sorted array without repeats, which this module made, as normalised."""
    rows.setflags(write=False)
    _NORMALISED[id(rows)] = rows
    return rows


def _in_sorted(sorted_rows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Where ``rows`` are in ``sorted_rows`` (bisection: no sort of either)."""
    if not len(sorted_rows):
        return np.zeros(rows.shape, bool)
    at = np.searchsorted(sorted_rows, rows)
    return sorted_rows[np.minimum(at, len(sorted_rows) - 1)] == rows


def _merge_sorted(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """The union of two normalised shared arrays, by insertion (no sort of the larger)."""
    if a is None or not len(a):
        return b if b is not None else a
    if b is None or not len(b):
        return a
    if len(a) < len(b):
        a, b = b, a
    new = b[~_in_sorted(a, b)]
    if not len(new):
        return a
    return _trusted(np.insert(a, np.searchsorted(a, new), new))
