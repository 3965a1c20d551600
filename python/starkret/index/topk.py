"""Exact batched inner-product top-k over float16 / float32 embeddings, in Rust.

The database may be an array in memory, a memory-mapped ``.npy`` file or the path of
one; it is read in place (never copied or loaded whole), so a 25M x 768 float16
collection on disk can be searched with a few hundred MB of RAM.
"""

from __future__ import annotations

import os
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
    """Row ids never to return: ``shared`` for every query, or one array per query.

    The one form exclusions take between modules: what a caller gives (a set, list or
    array of rows; one such collection per query; image keys) is read once, at the API
    boundary, by :meth:`parse` or :meth:`of_keys`, and every search (exact, ivf, faiss,
    torch device) takes the result.

    >>> Exclusions.parse({3, 1}, n_queries=2).of_query(1).tolist()
    [1, 3]
    >>> Exclusions.parse([[0], [2, 5]], n_queries=2).pairs(2)
    (array([0, 1, 1]), array([0, 2, 5]))
    """

    shared: np.ndarray | None = None
    per_query: tuple[np.ndarray, ...] | None = None

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
            rows = _id_array(items, "exclude")
            return cls(shared=np.unique(rows) if isinstance(items, (set, frozenset)) else rows)
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

    def of_query(self, q: int) -> np.ndarray:
        """The rows excluded for query ``q``."""
        return self.shared if self.per_query is None else self.per_query[q]

    def largest(self) -> int:
        """Most rows excluded for one query (how many extra hits a post-filter needs)."""
        if self.per_query is None:
            return len(self.shared)
        return max((len(e) for e in self.per_query), default=0)

    def check(self, n_queries: int) -> None:
        if self.per_query is not None and len(self.per_query) != n_queries:
            raise InvalidInputError(
                f"exclude has {len(self.per_query)} per-query collections for {n_queries} queries"
            )

    def union(self, other: Exclusions | None, n_queries: int) -> Exclusions:
        """Rows excluded by either."""
        if other is None:
            return self
        if self.per_query is None and other.per_query is None:
            return Exclusions(shared=np.union1d(self.shared, other.shared))
        return Exclusions(
            per_query=tuple(
                np.union1d(self.of_query(q), other.of_query(q)) for q in range(n_queries)
            )
        )

    def pairs(self, n_queries: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Every exclusion as ``(query, row)`` int64 arrays sorted by row (rows < 0
        dropped), or None if there is none: what a tiled scan masks tile by tile."""
        if self.per_query is None:
            shared = np.unique(self.shared)
            queries = np.repeat(np.arange(n_queries, dtype=np.int64), len(shared))
            rows = np.tile(shared, n_queries)
        else:
            self.check(n_queries)
            sizes = [len(e) for e in self.per_query]
            queries = np.repeat(np.arange(n_queries, dtype=np.int64), sizes)
            rows = np.concatenate([_NO_ROWS, *self.per_query])
        keep = rows >= 0
        queries, rows = queries[keep], rows[keep]
        if rows.size == 0:
            return None
        order = np.argsort(rows, kind="stable")
        return queries[order], rows[order]

    def mask(self, rows: np.ndarray) -> np.ndarray:
        """For a ``(q, m)`` array of rows (one line per query), where they are excluded."""
        rows = np.asarray(rows, np.int64)
        if self.per_query is None:
            return np.isin(rows, self.shared)
        self.check(rows.shape[0])
        pairs = self.pairs(rows.shape[0])
        if pairs is None:
            return np.zeros(rows.shape, bool)
        # one int64 per (query, row): query * stride + row, rows in [0, stride)
        stride = int(max(int(rows.max(initial=0)), int(pairs[1][-1]))) + 1
        banned = pairs[0] * stride + pairs[1]
        queries = np.arange(rows.shape[0], dtype=np.int64)[:, None]
        return (rows >= 0) & np.isin(queries * stride + rows, banned)

    def core_options(self) -> dict[str, object]:
        """Keyword arguments of the Rust search."""
        if self.per_query is None:
            return {"exclude": self.shared}
        return {"exclude_per_query": list(self.per_query)}
