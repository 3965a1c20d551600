"""Indices over one embedded source: exact (Rust scan of the float16 parts) or AutoFaiss.

``build_index(dir)`` writes ``dir/index/infos.json`` (and ``dir/index/knn.index`` for
AutoFaiss). ``SourceIndex.open(dir)`` searches either kind and returns global row
numbers: rows of the source's parts concatenated in part order (part 0 first), the
same order as its metadata.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "AUTO_EXACT_MAX_ROWS",
    "SourceIndex",
    "auto_kind",
    "build_index",
    "embedding_parts",
    "source_dirs",
]

#: ``kind="auto"`` builds an ivf index (:mod:`starkret.ivf`) above this many rows and
#: searches exactly up to it.
#: Exact float16 search streams the whole source once per query batch; at ~10 GB/s per
#: machine that is ~0.3 s per batch at 2M x 768 rows, about what 30 single AutoFaiss
#: queries at Stark's 10 ms budget cost, and it has recall 1.0.
AUTO_EXACT_MAX_ROWS = 2_000_000
#: Stark's AutoFaiss settings.
DEFAULT_MAX_INDEX_MEMORY = "16GB"
DEFAULT_MAX_QUERY_TIME_MS = 10.0
RECALL_WARNING = 0.9

_logger = logging.getLogger("starkret")


def _part_number(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def embedding_parts(source_dir: str | os.PathLike) -> list[Path]:
    """The ``img_emb_{i}.npy`` files of an embedded source, in part order."""
    folder = Path(source_dir) / "img_emb"
    parts = sorted(folder.glob("img_emb_*.npy"), key=_part_number)
    if not parts:
        raise FileNotFoundError(f"no embeddings in {folder}: run embed-shards first")
    return parts


def source_dirs(path: str | os.PathLike) -> list[Path]:
    """The embedded sources at ``path``: itself if it is one, else its sub-folders that are."""
    root = Path(path)
    if (root / "starkret.json").exists():
        return [root]
    dirs = sorted(p.parent for p in root.glob("*/starkret.json"))
    if not dirs:
        raise FileNotFoundError(f"no embedded sources (*/starkret.json) under {root}")
    return dirs


def _manifest(source_dir: Path) -> dict:
    path = source_dir / "starkret.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: {source_dir} is not an embed-shards output"
        ) from None
    if not manifest.get("complete"):
        raise ValueError(f"{source_dir} is not completely embedded: re-run embed-shards first")
    return manifest


@dataclass
class _Parts:
    arrays: list[np.ndarray]  # memory-mapped, float16
    offsets: np.ndarray  # offsets[i] = global row of part i's first row

    @classmethod
    def load(cls, source_dir: Path) -> _Parts:
        arrays = [np.load(p, mmap_mode="r") for p in embedding_parts(source_dir)]
        sizes = [a.shape[0] for a in arrays]
        return cls(arrays, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of global rows ``ids`` (any order), as float32."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.arrays[0].shape[1]), np.float32)
        part = np.searchsorted(self.offsets, ids, side="right") - 1
        for p in np.unique(part):
            mask = part == p
            out[mask] = self.arrays[p][ids[mask] - self.offsets[p]]
        return out


class SourceIndex:
    """Search one source: exact over its memory-mapped parts, or its AutoFaiss index."""

    def __init__(self, source_dir: Path, manifest: dict, parts: _Parts, infos: dict, faiss_index):
        self.source_dir, self.manifest, self.parts = source_dir, manifest, parts
        self.infos, self._faiss = infos, faiss_index
        self._ivf = None
        if infos.get("kind") == "ivf":
            from .ivf import IvfIndex

            self._ivf = IvfIndex.open(source_dir / "index", parts, infos)

    @classmethod
    def open(cls, source_dir: str | os.PathLike) -> SourceIndex:
        source_dir = Path(source_dir)
        manifest = _manifest(source_dir)
        parts = _Parts.load(source_dir)
        infos_path = source_dir / "index" / "infos.json"
        infos = json.loads(infos_path.read_text()) if infos_path.exists() else {"kind": "exact"}
        return cls.open_with(source_dir, manifest, parts, infos)

    @classmethod
    def open_with(cls, source_dir: Path, manifest: dict, parts: _Parts, infos: dict):
        faiss_index = None
        if infos.get("kind") == "autofaiss":
            import faiss

            faiss_index = faiss.read_index(
                str(source_dir / "index" / "knn.index"),
                faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY,
            )
        return cls(source_dir, manifest, parts, infos, faiss_index)

    @property
    def kind(self) -> str:
        return self.infos.get("kind", "exact")

    @property
    def count(self) -> int:
        return self.parts.count

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude=None,
        exact: bool | None = None,
        threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, global rows) per query; rows are -1 where fewer exist."""
        use_exact = (self._faiss is None and self._ivf is None) if exact is None else exact
        if not use_exact and self._ivf is not None:
            return self._ivf.search(queries, k, exclude=exclude)
        if use_exact:
            return exact_search(queries, self.parts, k, exclude=exclude, threads=threads)
        return self._faiss_search(queries, k, exclude)

    def _faiss_search(self, queries, k, exclude):
        banned = per_query_exclusions(exclude, len(queries))
        # Excluded rows are filtered after the search: ask for enough extra ones.
        extra = max((len(b) for b in banned), default=0) if banned else 0
        scores, ids = self._faiss.search(np.ascontiguousarray(queries, np.float32), k + extra)
        order = np.asarray(self.infos["faiss_order"], dtype=np.int64)
        rows = _faiss_ids_to_rows(ids, order, self.parts.offsets)
        if not banned:
            return scores[:, :k], rows[:, :k]
        out_s = np.full((len(rows), k), -np.inf, np.float32)
        out_r = np.full((len(rows), k), -1, np.int64)
        for q, (row, ban) in enumerate(zip(rows, banned, strict=True)):
            keep = [i for i, r in enumerate(row) if r >= 0 and int(r) not in ban][:k]
            out_s[q, : len(keep)] = scores[q, keep]
            out_r[q, : len(keep)] = row[keep]
        return out_s, out_r


def per_query_exclusions(exclude, n_queries: int) -> list[set[int]] | None:
    """``exclude`` (None, one collection of rows for all queries, or one per query) as
    one set per query."""
    if exclude is None:
        return None
    items = list(exclude)
    if items and not np.isscalar(items[0]):
        if len(items) != n_queries:
            raise ValueError(f"exclude has {len(items)} sets for {n_queries} queries")
        return [{int(r) for r in e} for e in items]
    shared = {int(r) for r in items}
    return [shared] * n_queries


def _faiss_ids_to_rows(ids, order, offsets):
    """faiss numbers rows in the order autofaiss read the files (sorted by name)."""
    sizes = np.diff(offsets)[order]
    faiss_offsets = np.concatenate([[0], np.cumsum(sizes)])
    flat = ids.reshape(-1)
    valid = flat >= 0
    slot = np.searchsorted(faiss_offsets, flat[valid], side="right") - 1
    rows = np.full(flat.shape, -1, np.int64)
    rows[valid] = offsets[order[slot]] + (flat[valid] - faiss_offsets[slot])
    return rows.reshape(ids.shape)


def exact_search(queries, parts: _Parts, k: int, *, exclude=None, threads=None):
    """Exact top-k over all parts (Rust scan of each part, then an exact merge)."""
    from .topk import merge_topk, topk

    banned = per_query_exclusions(exclude, len(queries))
    results = []
    for i, array in enumerate(parts.arrays):
        if array.shape[0] == 0:
            continue
        offset = int(parts.offsets[i])
        local = _localise(banned, offset, array.shape[0])
        scores, ids = topk(queries, array, k, exclude=local, threads=threads)
        results.append((scores, np.where(ids >= 0, ids + offset, -1)))
    if not results:
        q = len(queries)
        return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)
    return merge_topk(results, k)


def _localise(banned, offset, size):
    """Global excluded rows (one set per query) -> row numbers inside one part."""
    if banned is None:
        return None
    return [{r - offset for r in rows if offset <= r < offset + size} for rows in banned]


# ==== Building ====


def build_index(
    source_dir: str | os.PathLike,
    *,
    kind: str = "auto",
    max_index_memory_usage: str = DEFAULT_MAX_INDEX_MEMORY,
    max_index_query_time_ms: float = DEFAULT_MAX_QUERY_TIME_MS,
    auto_exact_max_rows: int = AUTO_EXACT_MAX_ROWS,
    recall_queries: int = 1000,
    seed: int = 0,
    ivf_nlist: int | None = None,
) -> dict:
    """Build the index of one embedded source; returns (and writes) its ``infos.json``.

    ``kind="exact"`` needs no build (search scans the memory-mapped float16 parts in
    Rust); ``"autofaiss"`` runs ``autofaiss.build_index`` with Stark's settings (inner
    product, 16GB, 10 ms; all overridable) and then measures recall@10 against exact
    search on held-out queries (perturbed rows, not rows of the index), stored in the
    infos and warned about below 0.9, and recall@5 on text-like queries
    (:mod:`starkret.text_like`); ``"ivf"`` builds :mod:`starkret.ivf`'s index (IVF with
    an HNSW coarse quantizer and SQ8/PQ codes, candidates re-ranked exactly, nprobe and
    candidates calibrated to recall@5 >= 0.95 on text-like queries within
    ``max_index_memory_usage``); ``"auto"`` picks exact up to ``auto_exact_max_rows``
    rows and ivf above.

    >>> build_index("db/cc12m", kind="auto")  # doctest: +SKIP
    """
    if kind not in ("auto", "exact", "autofaiss", "ivf"):
        raise ValueError(f"kind must be 'auto', 'exact', 'ivf' or 'autofaiss', got {kind!r}")
    source_dir = Path(source_dir)
    manifest = _manifest(source_dir)
    parts = _Parts.load(source_dir)
    if kind == "auto":
        kind = auto_kind(parts.count, auto_exact_max_rows)
    index_dir = source_dir / "index"
    index_dir.mkdir(exist_ok=True)
    infos = {
        "kind": kind,
        "count": parts.count,
        "dim": manifest["dim"],
        "model": manifest["model"],
        "pretrained": manifest["pretrained"],
    }
    if kind == "autofaiss":
        infos.update(
            _build_autofaiss(
                source_dir, parts, index_dir, max_index_memory_usage, max_index_query_time_ms
            )
        )
        index = SourceIndex.open_with(source_dir, manifest, parts, infos)
        recall = _recall_at_10(index, parts, recall_queries, seed)
        infos["recall_at_10"] = recall
        infos["recall_at_5_text_like"] = _recall_text_like(index, parts, recall_queries, seed)
        if recall < RECALL_WARNING:
            _logger.warning(
                "%s: AutoFaiss recall@10 is %.3f (< %.2f); consider a larger "
                "max_index_memory_usage or kind='exact'",
                source_dir,
                recall,
                RECALL_WARNING,
            )
    if kind == "ivf":
        from .ivf import build_ivf

        infos.update(
            build_ivf(
                source_dir,
                parts,
                index_dir,
                max_index_memory_usage=max_index_memory_usage,
                nlist=ivf_nlist,
                seed=seed,
            )
        )
    tmp = index_dir / ".infos.json.tmp"
    tmp.write_text(json.dumps(infos, indent=2))
    os.replace(tmp, index_dir / "infos.json")
    return infos


def auto_kind(count: int, auto_exact_max_rows: int = AUTO_EXACT_MAX_ROWS) -> str:
    """``kind="auto"``'s rule: ``"exact"`` up to ``auto_exact_max_rows`` rows, else ``"ivf"``."""
    return "exact" if count <= auto_exact_max_rows else "ivf"


def _build_autofaiss(source_dir, parts, index_dir, memory, query_ms) -> dict:
    from autofaiss import build_index as autofaiss_build

    files = embedding_parts(source_dir)
    order = sorted(range(len(files)), key=lambda i: str(files[i]))
    started = time.perf_counter()
    tmp_index = index_dir / ".knn.index.tmp"
    tmp_index.unlink(missing_ok=True)
    _, af_infos = autofaiss_build(
        embeddings=str(source_dir / "img_emb"),
        index_path=str(tmp_index),
        index_infos_path=str(index_dir / "autofaiss_infos.json"),
        metric_type="ip",
        max_index_memory_usage=memory,
        max_index_query_time_ms=query_ms,
        current_memory_available=_available_memory(),
        verbose=logging.WARNING,
    )
    if not tmp_index.exists():
        raise RuntimeError(
            f"autofaiss built no index for {source_dir} (memory budget {memory}, "
            f"{_available_memory()} available; its log above says why): lower "
            "max_index_memory_usage, or use kind='exact'"
        )
    os.replace(tmp_index, index_dir / "knn.index")
    return {
        "faiss_order": order,
        "max_index_memory_usage": memory,
        "max_index_query_time_ms": query_ms,
        "build_seconds": round(time.perf_counter() - started, 2),
        "autofaiss": af_infos,
    }


def _available_memory(meminfo: str = "/proc/meminfo") -> str:
    """Memory autofaiss may plan with: what the kernel says is available now, else 16G.

    ``MemAvailable`` counts the page cache the kernel would drop for a new allocation;
    ``MemFree`` (what ``SC_AVPHYS_PAGES`` reports) leaves it out, and on a machine that
    has read a few GB of embeddings it is far below what an index build can really use.
    """
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return f"{max(1, int(line.split()[1]) >> 20)}G"
    except (OSError, ValueError, IndexError):
        pass
    return "16G"


def _recall_at_10(index: SourceIndex, parts: _Parts, n: int, seed: int) -> float:
    """recall@10 of the approximate index against exact search, on held-out queries."""
    rng = np.random.default_rng(seed)
    rows = parts.rows(rng.integers(0, parts.count, min(n, parts.count)))
    queries = rows + rng.normal(0, 0.5 / np.sqrt(rows.shape[1]), rows.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, truth = index.search(queries, 10, exact=True)
    _, approx = index.search(queries, 10, exact=False)
    hits = sum(len(set(t[t >= 0]) & set(a[a >= 0])) for t, a in zip(truth, approx, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def _recall_text_like(index: SourceIndex, parts: _Parts, n: int, seed: int) -> float:
    """recall@5 of the approximate index against exact search on text-like queries."""
    from .text_like import recall_at, text_like_queries

    dim = parts.arrays[0].shape[1]
    queries = text_like_queries(parts.rows, parts.count, min(n, 500), dim, seed=seed + 1)
    _, truth = index.search(queries, 5, exact=True)
    _, approx = index.search(queries, 5, exact=False)
    return round(recall_at(truth, approx, 5), 4)
