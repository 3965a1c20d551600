"""``build_index(kind="ivf")``: a faiss IVF index whose candidates are re-ranked exactly.

The index file ``<source>/index/image.index`` is a standard faiss index
(``IVF{nlist}_HNSW32,SQ8``, or ``...,PQ{m}`` when SQ8 codes exceed the memory budget),
inner product, and its ids are the source's global rows: faiss id ``i`` is row ``i`` of
the source's parts concatenated in part order (``img_emb_0.npy`` first), the row order
of its metadata. ``faiss.read_index`` opens it anywhere (clip-retrieval included).

Searching asks faiss for ``candidates`` rows per query with ``nprobe`` cells, then
scores those rows exactly in float32 against the float16 memory maps and keeps the top
``k`` (ties to the lower row), so the scores returned are true inner products and only
the candidate set is approximate. ``nprobe`` and ``candidates`` are chosen at build time
as the cheapest pair reaching :data:`TARGET_RECALL` recall@5 against exact search on
text-like queries (:mod:`starkret.index.text_like`): queries as far from every image as CLIP
text queries are, which is where product-quantised indices lose most recall. The
measured recall, the pair and the grid tried are written to ``infos.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from starkret._io import atomic_path
from starkret.errors import InvalidInputError, MissingIndexError
from starkret.index.grow import DRIFT_SAMPLE_ROWS, centroid_similarity, similarity_summary
from starkret.index.text_like import recall_at, text_like_queries
from starkret.index.topk import Exclusions

__all__ = [
    "INDEX_FILE",
    "TARGET_RECALL",
    "IvfIndex",
    "SharedSelector",
    "best_of",
    "build_ivf",
    "candidate_scores",
    "parse_bytes",
    "rerank",
]

INDEX_FILE = "image.index"
#: recall@5 on text-like queries that build-time calibration must reach.
TARGET_RECALL = 0.95
#: Candidate counts and nprobe values the calibration tries (cheapest passing pair wins).
CANDIDATE_GRID = (20, 50, 100, 200, 400, 800, 1600)
RECALL_K = 5
#: recall@k measured on the user's own calibration queries (``calibrate_with``).
USER_K = 10
_ID_BYTES = 8  # faiss stores an int64 id per vector in the inverted lists

_logger = logging.getLogger("starkret")


def parse_bytes(text: str | int) -> int:
    """``"16GB"``, ``"500MB"``, ``"2G"`` or a number of bytes -> bytes."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m:
        raise InvalidInputError(f"memory size {text!r}: expected e.g. '16GB' or '500MB'")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def choose_nlist(count: int) -> int:
    """Cells: a power of two near 4 sqrt(n), with >= 39 training rows per cell."""
    if count < 39 * 2:
        return 1
    target = 1 << round(np.log2(max(1.0, 4 * np.sqrt(count))))
    return int(max(1, min(target, 65536, 1 << int(np.log2(count // 39)))))


def choose_codes(count: int, dim: int, budget: int) -> str:
    """SQ8 (one byte per dimension) when it fits ``budget``, else the largest PQ that does."""
    if count * (dim + _ID_BYTES) <= budget:
        return "SQ8"
    for m in (128, 96, 64, 48, 32, 24, 16, 8):
        if dim % m == 0 and count * (m + _ID_BYTES) <= budget:
            return f"PQ{m}"
    raise InvalidInputError(
        f"too large: {count:,} vectors do not fit an ivf index in {budget:,} bytes "
        "(the smallest codes take 16 bytes each); raise max_index_memory_usage"
    )


def rerank(
    parts, queries: np.ndarray, candidates: np.ndarray, k: int, exclude: Exclusions | None = None
):
    """Exact top-``k`` among each query's candidate rows (``-1`` = none).

    Scores are float32 dot products with the float16 rows widened exactly; ties rank
    the lower row first. ``exclude``: rows never returned.
    """
    cand = np.asarray(candidates, np.int64)
    if exclude is not None:
        cand = np.where(exclude.mask(cand), -1, cand)
    return best_of(candidate_scores(parts, queries, cand), cand, k)


def candidate_scores(parts, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """float32 inner products of each query with its candidate rows (``-inf`` for ``-1``)."""
    n, width = candidates.shape
    dim = queries.shape[1]
    scores = np.full((n, width), -np.inf, np.float32)
    step = max(1, (64 << 20) // (max(1, width) * dim * 4))
    for start in range(0, n, step):
        cand = candidates[start : start + step]
        valid = cand >= 0
        flat = cand[valid]
        order = np.argsort(flat, kind="stable")  # read the memory maps in row order
        vectors = np.empty((len(flat), dim), np.float32)
        vectors[order] = parts.rows(flat[order])
        owner = np.nonzero(valid)[0]
        part = scores[start : start + step]
        part[valid] = np.einsum("cd,cd->c", vectors, queries[start : start + step][owner])
    return scores


def best_of(scores: np.ndarray, candidates: np.ndarray, k: int):
    """Top-``k`` ``(scores, rows)`` per query of scored candidates; ties to the lower row."""
    n = len(scores)
    out_s = np.full((n, k), -np.inf, np.float32)
    out_r = np.full((n, k), -1, np.int64)
    if n == 0 or scores.shape[1] == 0:
        return out_s, out_r
    rows = np.where(candidates >= 0, candidates, np.iinfo(np.int64).max)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    s = np.take_along_axis(scores, order, 1)
    r = np.take_along_axis(candidates, order, 1)
    m = s.shape[1]
    out_s[:, :m] = s
    out_r[:, :m] = np.where(np.isfinite(s), r, -1)
    return out_s, out_r


def _set_probe(index, nprobe: int) -> None:
    import faiss

    space = faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", int(nprobe))
    with contextlib.suppress(RuntimeError):  # a flat coarse quantizer (nlist = 1) has none
        space.set_index_parameter(index, "quantizer_efSearch", max(64, 2 * int(nprobe)))


class SharedSelector:
    """Leaves a shared exclusion set out inside a faiss search (not after it).

    A post-filter needs ``k`` + (rows excluded) candidates per query, millions when a DB's
    recorded near duplicates are left out; faiss instead skips the rows while it scans,
    through search parameters with an ``IDSelectorNot(IDSelectorBitmap)`` (one bit per
    faiss id: 3 MB for 25M rows). The parameters are built once per shared set (kept while
    the same array comes back, as :meth:`Duplicates.exclusions
    <starkret.index.duplicates.Duplicates.exclusions>` returns it) and reuse the index's
    own nprobe. An index type that takes no selector (e.g. a refine stage) is noticed
    once and searched as before, filtering afterwards.

    ``to_faiss_ids``: global rows -> the index's ids (None: the ids are the rows).
    """

    def __init__(self, index, to_faiss_ids=None) -> None:
        self.index = index
        self.to_faiss_ids = to_faiss_ids
        self.supported = True
        self._last: tuple[np.ndarray, object, tuple] | None = None

    def params(self, shared: np.ndarray | None):
        """Search parameters leaving ``shared`` (sorted global rows) out, or None when
        there is nothing to leave out or the index cannot (then post-filter them)."""
        if shared is None or not len(shared) or not self.supported:
            return None
        if self._last is not None and self._last[0] is shared:
            params, ivf = self._last[1], self._last[2][-1]
            if ivf is not None:  # the index's nprobe may have been set since
                params.nprobe = ivf.nprobe
            return params
        import faiss

        ids = shared if self.to_faiss_ids is None else self.to_faiss_ids(shared)
        ids = ids[ids >= 0]
        if not len(ids):
            return None
        bits = np.zeros(int(ids.max()) + 1, bool)
        bits[ids] = True
        bitmap = np.packbits(bits, bitorder="little")
        dropped = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        keep = faiss.IDSelectorNot(dropped)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            params = faiss.SearchParametersIVF(sel=keep, nprobe=ivf.nprobe, max_codes=ivf.max_codes)
        else:
            params = faiss.SearchParameters(sel=keep)
        # faiss holds raw pointers: keep the bitmap and selectors alive with the params
        self._last = (shared, params, (bitmap, dropped, keep, ivf))
        return params

    def search(
        self, index, queries: np.ndarray, k: int, exclude: Exclusions | None, limit: int = 0
    ):
        """``index.search`` for ``k`` + the extra candidates a post-filter of ``exclude``
        still needs: the largest per-query count when the shared rows are left out inside
        the search, every excluded row otherwise (at most ``limit`` if given). ``index``:
        the index itself (or a stand-in with its ``search``). Returns faiss's
        ``(scores, ids)``."""

        def capped(want: int) -> int:
            return min(want, max(1, limit)) if limit else want

        params = self.params(exclude.shared if exclude is not None else None)
        if params is not None:
            want = capped(k + exclude.largest_per_query())
            try:
                return index.search(queries, want, params=params)
            except RuntimeError as exc:  # this index type takes no selector
                _logger.info("faiss index takes no id selector (%s): filtering after", exc)
                self.supported = False
        want = capped(k + (exclude.largest() if exclude is not None else 0))
        return index.search(queries, want)


class IvfIndex:
    """A built ivf index with its calibrated nprobe / candidates, searched with re-ranking."""

    def __init__(self, index, parts, infos: dict) -> None:
        self.index, self.parts, self.infos = index, parts, infos
        self.nprobe = int(infos["nprobe"])
        self.candidates = int(infos["candidates"])
        _set_probe(index, self.nprobe)
        self.selector = SharedSelector(index)  # ids are the global rows

    @classmethod
    def open(cls, index_dir: Path, parts, infos: dict) -> IvfIndex:
        import faiss

        path = Path(index_dir) / infos.get("index_file", INDEX_FILE)
        if not path.exists():
            raise MissingIndexError(f"{path} not found: re-run build-index --kind ivf")
        return cls(faiss.read_index(str(path)), parts, infos)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Exclusions | None = None,
        candidates: int | None = None,
    ):
        """Top-``k`` ``(scores, global rows)``; exact scores, approximate candidate set."""
        q = np.ascontiguousarray(queries, np.float32)
        exclude = Exclusions.parse(exclude, len(q))  # an Exclusions: only checked
        want = max(candidates or self.candidates, k)
        # shared rows (recorded near duplicates) are skipped inside faiss's scan; only
        # per-query ones need extra candidates (at most every row)
        _, ids = self.selector.search(self.index, q, want, exclude, limit=self.parts.count)
        return rerank(self.parts, q, ids, k, exclude)


def build_ivf(
    source_dir: Path,
    parts,
    index_dir: Path,
    *,
    max_index_memory_usage: str | int = "16GB",
    target_recall: float = TARGET_RECALL,
    calibration_queries: int = 300,
    nlist: int | None = None,
    codes: str | None = None,
    train_rows: int = 200_000,
    seed: int = 0,
    calibrate_with: np.ndarray | None = None,
) -> dict:
    """Train, fill and calibrate the ivf index of one source; returns its infos.

    ``calibrate_with``: unit float32 ``(n, dim)`` queries (see
    :func:`starkret.index.calibrate.calibration_queries`) on which nprobe and candidates
    are chosen for recall@10 >= ``target_recall``, instead of generated text-like queries.
    """
    import faiss

    from starkret.index.exact import exact_search

    started = time.perf_counter()
    count, dim = parts.count, int(parts.arrays[0].shape[1])
    if count == 0:
        raise MissingIndexError(f"empty: {source_dir} has no embeddings to index")
    budget = parse_bytes(max_index_memory_usage)
    nlist = nlist or choose_nlist(count)
    codes = codes or choose_codes(count, dim, budget)
    factory = f"IVF{nlist}_HNSW32,{codes}" if nlist > 1 else f"IVF1,{codes}"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample_n = min(count, max(39 * nlist, min(train_rows, 64 * nlist)))
    sample = np.sort(rng.choice(count, sample_n, replace=False))
    index.train(parts.rows(sample))
    trained = centroid_similarity(index, parts.rows(_drift_rows(rng, count, sample)))
    for array in parts.arrays:  # faiss ids are assigned in add order = global rows
        for start in range(0, array.shape[0], 65536):
            index.add(np.ascontiguousarray(array[start : start + 65536], np.float32))
    built = time.perf_counter() - started

    # Calibration: the cheapest (nprobe, candidates) with recall@k >= target, on the
    # user's queries (recall@10) when given, else on text-like ones (recall@5).
    text_like = text_like_queries(parts.rows, count, calibration_queries, dim, seed=seed + 1)
    queries, k = (text_like, RECALL_K) if calibrate_with is None else (calibrate_with, USER_K)
    truth_s, truth = exact_search(queries, parts, k)
    met, best, tried = _calibrate(
        index, parts, queries, (truth_s, truth), k, target_recall, nlist, codes
    )
    if not met:
        _logger.warning(
            "%s: ivf recall@%d on %s reaches only %.3f (< %.2f); "
            "consider a larger max_index_memory_usage or kind='exact'",
            source_dir,
            k,
            "text-like queries" if calibrate_with is None else "the calibration queries",
            best[3],
            target_recall,
        )
    _, nprobe, cand, recall = best
    user = {}
    if calibrate_with is not None:
        user = {
            "calibrated_on": "user queries",
            f"recall_at_{USER_K}_calibration": round(float(recall), 4),
        }
        # the text-like recall at the chosen pair, for comparison with other builds
        _, truth = exact_search(text_like, parts, RECALL_K)
        _, got = IvfIndex(index, parts, {"nprobe": nprobe, "candidates": cand}).search(
            text_like, RECALL_K
        )
        recall = recall_at(truth, got, RECALL_K)
    with atomic_path(index_dir / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    return {
        "index_file": INDEX_FILE,
        "factory": factory,
        "metric": "inner_product",
        "ids": "global rows (parts concatenated in part order)",
        "nlist": nlist,
        "codes": codes,
        "index_bytes": os.path.getsize(index_dir / INDEX_FILE),
        "max_index_memory_usage": max_index_memory_usage,
        "nprobe": int(nprobe),
        "candidates": int(cand),
        "recall_at_5_text_like": round(float(recall), 4),
        "recall_target": target_recall,
        "recall_target_met": met,
        "calibration_queries": len(queries),
        **user,
        "query_best_cosine_median": round(float(np.median(truth_s[:, 0])), 4),
        "calibration": tried,
        "centroid_similarity": similarity_summary(trained),
        "build_seconds": round(built, 2),
        "calibration_seconds": round(time.perf_counter() - started - built, 2),
    }


def _drift_rows(rng, count: int, sample: np.ndarray) -> np.ndarray:
    """Rows to measure how close rows sit to their centroids, for an add to compare new
    rows with: rows the training did not see where there are enough (training rows sit
    closer to the centroids fitted to them, which would flag same-distribution new rows
    as drift), else training rows."""
    drawn = np.unique(rng.integers(0, count, DRIFT_SAMPLE_ROWS))
    held_out = drawn[~np.isin(drawn, sample, assume_unique=True)]
    if len(held_out) >= DRIFT_SAMPLE_ROWS // 10:
        return held_out
    return sample[np.sort(rng.choice(len(sample), min(len(sample), DRIFT_SAMPLE_ROWS), False))]


def _calibrate(index, parts, queries, truth, k, target_recall, nlist, codes):
    """(met, (cost, nprobe, candidates, recall), tried): the cheapest pair reaching the
    target recall@``k`` against ``truth`` (exact scores, rows; ties count), else the best
    recall found."""
    truth_s, truth = truth
    count, dim = parts.count, queries.shape[1]
    grid = [c for c in CANDIDATE_GRID if c < count] + [min(count, CANDIDATE_GRID[-1])]
    grid = sorted(set(max(k, c) for c in grid))
    per_cell = count / nlist
    key = f"recall_at_{k}"
    tried, best = [], None
    nprobe = 1
    while True:
        _set_probe(index, nprobe)
        _, ids = index.search(queries, grid[-1])
        scored = candidate_scores(parts, queries, ids)  # once; each c is a prefix
        for c in grid:
            got_s, got = best_of(scored[:, :c], ids[:, :c], k)
            recall = recall_at(truth, got, k, truth_scores=truth_s, approx_scores=got_s)
            # cost in row-equivalents: codes scanned (SQ8 = half a float16 row) + re-ranked
            cost = nprobe * per_cell * _code_fraction(codes, dim) + c * 4
            tried.append({"nprobe": nprobe, "candidates": c, key: round(recall, 4)})
            if recall >= target_recall and (best is None or cost < best[0]):
                best = (cost, nprobe, c, recall)
        if nprobe >= nlist or (best is not None and nprobe >= 4 * best[1]):
            break
        nprobe = min(nlist, _next_probe(nprobe))
    if best is not None:
        return True, best, tried
    top = max(tried, key=lambda t: (t[key], -t["nprobe"], -t["candidates"]))
    return False, (0.0, top["nprobe"], top["candidates"], top[key]), tried


def _code_fraction(codes: str, dim: int) -> float:
    code_bytes = dim if codes == "SQ8" else int(codes[2:])
    return code_bytes / (2 * dim)


def _next_probe(nprobe: int) -> int:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ...: steps of 1.5x / 1.33x, finer than doubling."""
    if nprobe < 2:
        return nprobe + 1
    if nprobe & (nprobe - 1) == 0:  # a power of two
        return nprobe * 3 // 2
    return 1 << int(nprobe).bit_length()
