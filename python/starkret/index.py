"""Indices over one embedded source: exact (Rust scan of the float16 parts) or AutoFaiss.

``build_index(dir)`` writes ``dir/index/infos.json`` (and ``dir/index/knn.index`` for
AutoFaiss), and for every kind the memory-mapped metadata (``index/metadata.arrow``,
see :mod:`starkret.metadata`) and key index (``index/key_*.npy``, see
:mod:`starkret.keyindex`). ``SourceIndex.open(dir)`` searches either kind and returns
global row numbers: rows of the source's parts concatenated in part order (part 0
first), the same order as its metadata. Which function searches a source is chosen by
its kind and the device (:func:`starkret.search.searcher`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from .keyindex import write_key_index
from .metadata import Metadata, write_metadata_arrow
from .search import Exclusions, Parts, embedding_parts, exact_search, register_searcher, searcher

__all__ = [
    "AUTO_EXACT_MAX_ROWS",
    "SourceIndex",
    "auto_kind",
    "build_index",
    "embedding_parts",
    "exact_search",
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


#: The name older code (and other modules) import.
_Parts = Parts


class SourceIndex:
    """Search one source: exact over its memory-mapped parts, or its AutoFaiss index."""

    def __init__(self, source_dir: Path, manifest: dict, parts: Parts, infos: dict, faiss_index):
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
        parts = Parts.load(source_dir)
        infos_path = source_dir / "index" / "infos.json"
        infos = json.loads(infos_path.read_text()) if infos_path.exists() else {"kind": "exact"}
        foreign = [p for p in ("index/knn.index", "image.index") if (source_dir / p).is_file()]
        if not infos_path.exists() and foreign:
            _logger.warning(
                "%s: %s was not built by starkret and is not used (exact search); "
                "`starkret clip-back --adopt %s` checks it and uses it",
                source_dir,
                foreign[0],
                source_dir,
            )
        return cls.open_with(source_dir, manifest, parts, infos)

    @classmethod
    def open_with(cls, source_dir: Path, manifest: dict, parts: Parts, infos: dict):
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
        device: str = "cpu",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, global rows) per query; rows are -1 where fewer exist.

        ``exclude``: global rows never returned (any form :func:`~starkret.topk.split_exclude`
        reads, or :class:`~starkret.topk.Exclusions`). ``exact=True`` scans exactly
        whatever the index kind; the function is :func:`~starkret.search.searcher`'s
        choice for the kind and ``device``.
        """
        queries = np.ascontiguousarray(queries, np.float32)
        exclusions = Exclusions.parse(exclude, len(queries))
        kind = "exact" if exact else self.kind
        search = searcher(kind, device)
        return search(self, queries, k, exclusions, threads=threads, device=device)

    def metadata(self) -> Metadata:
        """The source's metadata, memory-mapped if ``build-index`` wrote it."""
        return Metadata.open(self.source_dir, self.parts.offsets, self.infos)


def _faiss_search(index: SourceIndex, queries, k, exclude: Exclusions | None, **_):
    # Excluded rows are filtered after the search: ask for enough extra ones.
    extra = exclude.largest() if exclude is not None else 0
    scores, ids = index._faiss.search(queries, k + extra)
    order = np.asarray(index.infos["faiss_order"], dtype=np.int64)
    rows = _faiss_ids_to_rows(ids, order, index.parts.offsets)
    if exclude is None:
        return scores[:, :k], rows[:, :k]
    out_s = np.full((len(rows), k), -np.inf, np.float32)
    out_r = np.full((len(rows), k), -1, np.int64)
    for q, row in enumerate(rows):
        keep = np.flatnonzero((row >= 0) & ~np.isin(row, exclude.of_query(q)))[:k]
        out_s[q, : len(keep)] = scores[q, keep]
        out_r[q, : len(keep)] = row[keep]
    return out_s, out_r


register_searcher("autofaiss", "cpu", _faiss_search)


def per_query_exclusions(exclude, n_queries: int) -> list[set[int]] | None:
    """``exclude`` (None, one collection of rows for all queries, or one per query) as
    one set per query (read by :func:`~starkret.topk.split_exclude`)."""
    parsed = Exclusions.parse(exclude, n_queries)
    if parsed is None:
        return None
    parsed.check(n_queries)
    return [set(parsed.of_query(q).tolist()) for q in range(n_queries)]


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
    if kind != "exact":  # autofaiss reads files in name order: pad a pre-padding folder's names
        from .layout import pad_part_names

        pad_part_names(source_dir)
    parts = Parts.load(source_dir)
    auto = kind == "auto"
    if auto:
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
        if auto and not _ivf_pays_off(infos):
            # The calibration had to probe most cells (text-like queries far from every
            # cluster): the ivf would scan about everything, slower than the exact scan.
            _logger.warning(
                "%s: ivf needs nprobe %d of %d cells for recall@5 %.3f on text-like queries; "
                "kind='auto' keeps exact search (build kind='ivf' to use it anyway)",
                source_dir,
                infos["nprobe"],
                infos["nlist"],
                infos["recall_at_5_text_like"],
            )
            (index_dir / infos["index_file"]).unlink(missing_ok=True)
            ivf_infos = {k: infos.pop(k) for k in list(infos) if k not in _BASE_INFOS}
            infos.update(kind="exact", auto_ivf_rejected=ivf_infos)
    infos["metadata_rows"] = write_metadata_arrow(source_dir, parts.offsets)
    metadata = Metadata(source_dir, parts.offsets, source_dir / "index" / "metadata.arrow")
    infos["key_index_rows"] = write_key_index(source_dir, metadata)
    tmp = index_dir / ".infos.json.tmp"
    tmp.write_text(json.dumps(infos, indent=2))
    os.replace(tmp, index_dir / "infos.json")
    return infos


#: ``kind="auto"`` keeps an ivf index only if its calibrated nprobe probes at most this
#: share of the cells (and reaches the recall target); otherwise it is no faster than exact.
AUTO_IVF_MAX_PROBE_FRACTION = 0.25
_BASE_INFOS = ("kind", "count", "dim", "model", "pretrained")


def _ivf_pays_off(infos: dict) -> bool:
    return bool(infos.get("recall_target_met")) and (
        infos["nprobe"] <= AUTO_IVF_MAX_PROBE_FRACTION * infos["nlist"]
    )


def auto_kind(count: int, auto_exact_max_rows: int = AUTO_EXACT_MAX_ROWS) -> str:
    """``kind="auto"``'s rule: ``"exact"`` up to ``auto_exact_max_rows`` rows, else ``"ivf"``."""
    return "exact" if count <= auto_exact_max_rows else "ivf"


def _build_autofaiss(source_dir, parts, index_dir, memory, query_ms) -> dict:
    try:
        from autofaiss import build_index as autofaiss_build
    except ImportError:
        raise ImportError(
            "kind='autofaiss' needs the autofaiss extra: pip install 'starkret[autofaiss]' "
            "(it pins numpy<2, pyarrow<18 and faiss-cpu 1.9.0.post1 for autofaiss 2.18); "
            "or use kind='exact'"
        ) from None

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


def _recall_at_10(index: SourceIndex, parts: Parts, n: int, seed: int) -> float:
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


def _ivf_search(index: SourceIndex, queries, k, exclude: Exclusions | None, **_):
    return index._ivf.search(queries, k, exclude=exclude)


def _device_search(index: SourceIndex, queries, k, exclude: Exclusions | None, *, device, **_):
    from .gpu_search import DeviceSearcher

    searchers = index.__dict__.setdefault("_device_searchers", {})
    if device not in searchers:  # parts stay resident on the device between calls
        torch_device = "cpu" if device == "torch-cpu" else device  # the GPU code, run on CPU
        searchers[device] = DeviceSearcher(index.parts.arrays, device=torch_device)
    if exclude is not None:
        exclude = exclude.shared if exclude.per_query is None else list(exclude.per_query)
    return searchers[device].search(queries, k, exclude=exclude)


register_searcher("ivf", "cpu", _ivf_search)
register_searcher("*", "cuda", _device_search)
register_searcher("*", "mps", _device_search)
register_searcher("*", "torch-cpu", _device_search)
