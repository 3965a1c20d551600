"""One embedded source's index, opened for search: exact (Rust scan of the float16 parts),
ivf, AutoFaiss, or a torch device.

``SourceIndex.open(dir)`` searches every kind and returns global row numbers: rows of the
source's parts concatenated in part order (part 0 first), the same order as its metadata.
Which function searches a source is chosen by its kind and the device
(:func:`starkret.index.exact.searcher`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from starkret.errors import MissingIndexError, NotFoundError
from starkret.index.exact import (
    Exclusions,
    Parts,
    register_searcher,
    searcher,
)
from starkret.index.ivf import IvfIndex, SharedSelector
from starkret.index.q8 import Q8Copy

_logger = logging.getLogger("starkret")


def source_dirs(path: str | os.PathLike) -> list[Path]:
    """The embedded sources at ``path``: itself if it is one, else its sub-folders that are."""
    root = Path(path)
    if not root.is_dir():
        what = "it is not a folder" if root.exists() else "it does not exist"
        raise NotFoundError(f"no embedded sources under {root}: {what}")
    if (root / "starkret.json").exists():
        return [root]
    dirs = sorted(p.parent for p in root.glob("*/starkret.json"))
    if not dirs:
        raise MissingIndexError(
            f"no embedded sources (*/starkret.json) under {root}: run embed-shards first"
        )
    return dirs


def _manifest(source_dir: Path) -> dict:
    path = source_dir / "starkret.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise MissingIndexError(
            f"{path} not found: {source_dir} is not an embed-shards output"
        ) from None
    if not manifest.get("complete"):
        raise MissingIndexError(
            f"{source_dir} is not completely embedded: re-run embed-shards first"
        )
    return manifest


class SourceIndex:
    """Search one source: exact over its memory-mapped parts, or its AutoFaiss index."""

    def __init__(self, source_dir: Path, manifest: dict, parts: Parts, infos: dict, faiss_index):
        self.source_dir, self.manifest, self.parts = source_dir, manifest, parts
        self.infos, self._faiss = infos, faiss_index
        self._ivf = None
        #: The int8 copy exact search runs its first pass on (None: float32 scan only).
        self.q8 = Q8Copy.open(source_dir, infos, parts.arrays) if self.kind == "exact" else None
        if infos.get("kind") == "ivf":
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

        ``exclude``: global rows never returned (any form
        :meth:`~starkret.index.topk.Exclusions.parse` reads, or an ``Exclusions``).
        ``exact=True`` scans exactly whatever the index kind; the function is
        :func:`~starkret.index.exact.searcher`'s choice for the kind and ``device``.
        """
        queries = np.ascontiguousarray(queries, np.float32)
        exclusions = Exclusions.parse(exclude, len(queries))
        kind = "exact" if exact else self.kind
        search = searcher(kind, device)
        return search(self, queries, k, exclusions, threads=threads, device=device)


def _faiss_search(index: SourceIndex, queries, k, exclude: Exclusions | None, **_):
    # Shared excluded rows are left out inside faiss's search where the index takes a
    # selector; the rest is filtered after it, with enough extra hits asked for.
    order = np.asarray(index.infos["faiss_order"], dtype=np.int64)
    offsets = index.parts.offsets
    scores, ids = _faiss_selector(index, order, offsets).search(index._faiss, queries, k, exclude)
    rows = _faiss_ids_to_rows(ids, order, offsets)
    if exclude is None:
        return scores[:, :k], rows[:, :k]
    keep = (rows >= 0) & ~exclude.mask(rows)
    # kept hits first, in rank order; the rest becomes padding
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, order, 1)
    out_s = np.where(kept, np.take_along_axis(scores, order, 1), -np.inf).astype(np.float32)
    out_r = np.where(kept, np.take_along_axis(rows, order, 1), -1)
    if out_s.shape[1] < k:  # faiss returned fewer columns than asked for
        pad = k - out_s.shape[1]
        out_s = np.pad(out_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_r = np.pad(out_r, ((0, 0), (0, pad)), constant_values=-1)
    return out_s, out_r


register_searcher("autofaiss", "cpu", _faiss_search)


def _faiss_selector(index: SourceIndex, order, offsets) -> SharedSelector:
    """The source's selector for its faiss index (made once, remade if the index or its
    row order changes): shared sets are turned into faiss ids once each."""
    key = (index._faiss, order.tobytes(), np.asarray(offsets).tobytes())
    cached = index.__dict__.get("_faiss_selector")
    if cached is None or cached[0][0] is not key[0] or cached[0][1:] != key[1:]:
        selector = SharedSelector(
            index._faiss, lambda rows: _rows_to_faiss_ids(rows, order, offsets)
        )
        cached = index.__dict__["_faiss_selector"] = (key, selector)
    return cached[1]


def _faiss_order(order, offsets):
    """Parts in faiss's order (those missing from ``order`` last) and where each starts
    among faiss's ids."""
    missing = np.setdiff1d(np.arange(len(offsets) - 1), order)
    order = np.concatenate([order, missing]).astype(np.int64)
    sizes = np.diff(offsets)[order]
    return order, np.concatenate([[0], np.cumsum(sizes)])


def _rows_to_faiss_ids(rows, order, offsets):
    """Global rows -> faiss ids (the inverse of :func:`_faiss_ids_to_rows`; -1 for rows
    outside the source)."""
    order, faiss_offsets = _faiss_order(order, offsets)
    rows = np.asarray(rows, np.int64)
    valid = (rows >= 0) & (rows < offsets[-1])
    part = np.searchsorted(offsets, rows[valid], side="right") - 1
    slot_of_part = np.empty(len(order), np.int64)
    slot_of_part[order] = np.arange(len(order))
    slot = slot_of_part[part]
    out = np.full(rows.shape, -1, np.int64)
    out[valid] = faiss_offsets[slot] + (rows[valid] - offsets[part])
    return out


def _faiss_ids_to_rows(ids, order, offsets):
    """faiss numbers rows in the order autofaiss read the files (sorted by name), then
    the rows of parts added since in part order (:mod:`starkret.index.grow`; an index
    file can be newer than the ``faiss_order`` read with it for a moment)."""
    order, faiss_offsets = _faiss_order(order, offsets)
    flat = ids.reshape(-1)
    valid = flat >= 0
    slot = np.searchsorted(faiss_offsets, flat[valid], side="right") - 1
    rows = np.full(flat.shape, -1, np.int64)
    rows[valid] = offsets[order[slot]] + (flat[valid] - faiss_offsets[slot])
    return rows.reshape(ids.shape)


def _ivf_search(index: SourceIndex, queries, k, exclude: Exclusions | None, **_):
    return index._ivf.search(queries, k, exclude=exclude)


def _device_search(index: SourceIndex, queries, k, exclude: Exclusions | None, *, device, **_):
    from starkret.index.gpu import DeviceSearcher

    searchers = index.__dict__.setdefault("_device_searchers", {})
    if device not in searchers:  # parts stay resident on the device between calls
        torch_device = "cpu" if device == "torch-cpu" else device  # the GPU code, run on CPU
        searchers[device] = DeviceSearcher(index.parts.arrays, device=torch_device)
    return searchers[device].search(queries, k, exclude=exclude)


register_searcher("ivf", "cpu", _ivf_search)
register_searcher("*", "cuda", _device_search)
register_searcher("*", "mps", _device_search)
register_searcher("*", "torch-cpu", _device_search)
