"""Growing an index: ``build-index`` on a source that gained parts adds only their rows.

``embed`` appends parts to a source (``img_emb_{i}.npy`` + ``metadata_{i}.parquet``;
the parts already there never change). ``build_index`` records in ``infos.json`` what
its index covers (:func:`coverage`: the number of parts and a digest of them); the next
``build_index`` compares that record with the source (:func:`plan_add`) and, when the
source only gained parts, adds their rows (:func:`add_rows`):

- metadata: one more Arrow file, ``index/metadata.pNNNNN.arrow``, holding the new parts'
  rows (the existing files are not rewritten; :mod:`starkret.store.metadata`);
- key index: the new rows' hashes merged into the sorted arrays (the old rows' metadata is
  not read; :func:`starkret.store.keyindex.extend_key_index`);
- ivf: the new rows assigned to the trained cells and their codes appended (no
  retraining); nprobe and candidates stay as calibrated;
- autofaiss: the trained index read, the new rows ``add``-ed, written back;
- exact: nothing beyond the above (and the per-part writers ``build.py`` runs for new
  parts only).

Every file is written under a temporary name and renamed, and ``infos.json`` is
published last, so a reader sees the old index or the grown one. A faiss index file is
replaced whole, never appended in place: a reader that opened the old file keeps a
consistent one. A killed add leaves the old ``infos.json``; running ``build-index``
again redoes the add, and the steps that may already have been done (an index file
already holding the new rows, key entries already merged) are recognised and not
repeated.

Drift: the ivf build stores how similar its training rows are to their cell's centroid
(``centroid_similarity``); an add measures the same for the new rows and warns
(``drift`` in the infos) when their mean distance ``1 - similarity`` is more than
:data:`DRIFT_RATIO` times the training rows', since the cells (trained on other data)
then split the new rows badly and recall falls; ``--rebuild`` retrains.

A rebuild from scratch happens, with a log line saying why, when the index predates
this record, when parts were removed or replaced, when the kind or a build option
changes, or when asked (``rebuild=True``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starkret.index.exact import Parts
from starkret.store.keyindex import HASHES_FILE, ROWS_FILE, extend_key_index
from starkret.store.metadata import (
    METADATA_FILE,
    arrow_rows,
    segment_name,
    write_metadata_arrow,
)

__all__ = [
    "DRIFT_RATIO",
    "DRIFT_SAMPLE_ROWS",
    "AddPlan",
    "add_rows",
    "centroid_similarity",
    "coverage",
    "drift_report",
    "index_similarity",
    "parts_digest",
    "plan_add",
    "read_infos",
    "remove_stale_segments",
    "similarity_summary",
    "warn_drift",
]

#: New rows drift when their mean distance to their centroid (1 - inner product) is
#: more than this many times the training rows'.
DRIFT_RATIO = 1.25
#: Rows (training rows at build time, new rows at an add) measured for drift.
DRIFT_SAMPLE_ROWS = 2_000
#: ``efSearch`` of an HNSW coarse quantizer while rows are assigned to cells: faiss's
#: default, what ``build_ivf`` assigned its rows with.
ASSIGN_EF_SEARCH = 16
#: Rows per ``faiss.add`` call.
_ADD_CHUNK = 65536
#: The faiss index file of each kind that has one (ivf records its own in the infos).
_FAISS_FILES = {"ivf": "image.index", "autofaiss": "knn.index"}
#: First and last rows of a part that go into its signature.
_SIGNATURE_ROWS = 2

_logger = logging.getLogger("starkret")


# ==== What an index covers ====


def _part_signature(array: np.ndarray) -> bytes:
    """Rows, width and the bytes of the first and last rows of one part: a part
    replaced by other embeddings changes it; reading it costs a page or two."""
    head = np.ascontiguousarray(array[:_SIGNATURE_ROWS]).tobytes()
    tail = np.ascontiguousarray(array[-_SIGNATURE_ROWS:]).tobytes()
    return f"{array.shape[0]}x{array.shape[1]}:".encode() + head + tail


def parts_digest(parts: Parts, n: int) -> str:
    """A digest of the first ``n`` parts (their signatures, in order)."""
    digest = hashlib.blake2b(digest_size=16)
    for array in parts.arrays[:n]:
        digest.update(_part_signature(array))
    return digest.hexdigest()


def coverage(parts: Parts) -> dict:
    """The record ``infos.json`` keeps of the parts an index covers."""
    n = len(parts.arrays)
    return {"parts": n, "count": parts.count, "parts_digest": parts_digest(parts, n)}


# ==== Deciding: add, rebuild, or nothing to do ====


@dataclass
class AddPlan:
    """An add of parts ``first_part`` on (rows ``start`` on) to the index in ``infos``."""

    infos: dict
    first_part: int
    start: int


def plan_add(
    index_dir: Path, parts: Parts, infos: dict | None, kind: str, options: dict
) -> AddPlan | str:
    """An :class:`AddPlan` when ``parts`` only gained parts since ``infos`` (none new:
    the plan adds nothing), else why the index in ``index_dir`` must be rebuilt.

    ``kind`` is the kind asked for (``auto`` already resolved by the caller);
    ``options`` the build options that shape the index (a change means a rebuild;
    None: not asked for).
    """
    if infos is None:
        return "no index yet"
    if "parts_digest" not in infos or "parts" not in infos:
        return "the index was built before starkret recorded which parts it covers"
    if infos.get("kind") != kind:
        return f"the kind changes from {infos.get('kind')} to {kind}"
    for name, value in options.items():
        if value is not None and name in infos and infos[name] != value:
            return f"{name} changes from {infos[name]!r} to {value!r}"
    known, count = int(infos["parts"]), int(infos["count"])
    if len(parts.arrays) < known or parts.count < count:
        return f"parts were removed ({len(parts.arrays)} parts now, {known} indexed)"
    if int(parts.offsets[known]) != count or parts_digest(parts, known) != infos["parts_digest"]:
        return f"parts already indexed were replaced (among the first {known})"
    needed = [*infos.get("metadata_segments", []), METADATA_FILE.name]
    needed += [HASHES_FILE.name, ROWS_FILE.name]
    if kind in _FAISS_FILES:
        needed.append(infos.get("index_file", _FAISS_FILES[kind]))
    for name in needed:
        if not (index_dir / name).exists():
            return f"{index_dir / name} is missing"
    metadata = [index_dir / METADATA_FILE.name]
    metadata += [index_dir / name for name in infos.get("metadata_segments", [])]
    if sum(arrow_rows(path) for path in metadata) != count:
        # e.g. a rebuild killed after it rewrote metadata.arrow, before infos.json
        return "the metadata files do not hold the rows infos.json says (an interrupted build)"
    return AddPlan(infos, known, count)


class _RebuildNeeded(Exception):
    """An add found the index files out of step with ``infos.json``; the message says
    how (the caller rebuilds from scratch and logs it)."""


# ==== Adding ====


def add_rows(source_dir: Path, parts: Parts, plan: AddPlan) -> dict:
    """Add the rows of the plan's new parts to the index files; returns the new infos
    (not yet published: the caller writes ``infos.json`` last)."""
    started = time.perf_counter()
    infos = dict(plan.infos)
    index_dir = source_dir / "index"
    added = parts.count - plan.start
    infos.update(coverage(parts))
    infos.pop("drift", None)  # an earlier add's
    infos["added"] = added
    if added == 0:
        return infos
    rows = write_metadata_arrow(source_dir, parts.offsets, first_part=plan.first_part)
    segment = segment_name(plan.first_part)
    segments = [s for s in infos.get("metadata_segments", []) if s != segment]
    infos["metadata_segments"] = [*segments, segment]
    infos["metadata_rows"] = int(infos["metadata_rows"]) + rows
    infos["key_index_rows"] = extend_key_index(
        source_dir, _segment_batches(index_dir / segment), plan.start
    )
    kind = infos["kind"]
    if kind == "ivf":
        infos.update(_add_faiss(index_dir / infos["index_file"], parts, plan.start, infos))
    elif kind == "autofaiss":
        infos.update(_add_faiss(index_dir / _FAISS_FILES[kind], parts, plan.start, infos))
        order = list(infos["faiss_order"])
        infos["faiss_order"] = order + list(range(plan.first_part, len(parts.arrays)))
    infos["add_seconds"] = round(time.perf_counter() - started, 3)
    return infos


def _segment_batches(path: Path):
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i).select(["key", "url"])


def _add_faiss(path: Path, parts: Parts, start: int, infos: dict) -> dict:
    """Append rows ``start`` on to the faiss index at ``path`` (global rows in order),
    and measure their drift; the file is replaced whole."""
    import faiss

    from starkret._io import atomic_path

    index = faiss.read_index(str(path))
    have = int(index.ntotal)
    if have < start or have > parts.count:
        raise _RebuildNeeded(
            f"{path.name} holds {have:,} vectors, infos.json says {start:,} were indexed"
        )
    with _assignment_search(index):
        drift = drift_report(index, parts, start, infos.get("centroid_similarity"))
        for array, offset in zip(parts.arrays, parts.offsets[:-1].tolist(), strict=True):
            # rows a killed add already put in (have > start) are not added twice
            first = max(have - offset, 0)
            for lo in range(first, array.shape[0], _ADD_CHUNK):
                index.add(np.ascontiguousarray(array[lo : lo + _ADD_CHUNK], np.float32))
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
    out = {"index_bytes": os.path.getsize(path)}
    if drift is not None:
        out["drift"] = drift
    return out


@contextlib.contextmanager
def _assignment_search(index):
    """Assign rows to cells as the build did: an HNSW coarse quantizer searched with
    faiss's default ``efSearch`` (the build added its rows before calibration raised it
    for queries, up to 2 x nprobe; kept that high, assigning 10,000 rows took 20 s
    instead of a fraction of one). The query setting is restored before writing."""
    import faiss

    try:
        quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    except RuntimeError:  # not an ivf index
        quantizer = None
    hnsw = getattr(quantizer, "hnsw", None)
    if hnsw is None:
        yield
        return
    saved = hnsw.efSearch
    hnsw.efSearch = ASSIGN_EF_SEARCH
    try:
        yield
    finally:
        hnsw.efSearch = saved


# ==== Drift ====


def centroid_similarity(index, vectors: np.ndarray) -> np.ndarray | None:
    """Inner product of each vector with its nearest cell centroid (None: no cells)."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # a flat index: nothing to drift from
        return None
    sims, _ = ivf.quantizer.search(np.ascontiguousarray(vectors, np.float32), 1)
    return sims[:, 0]


def similarity_summary(sims: np.ndarray) -> dict:
    """The figure ``infos.json`` keeps of the training rows' ``centroid_similarity``."""
    return {
        "mean": round(float(sims.mean()), 5),
        "std": round(float(sims.std()), 5),
        "rows": len(sims),
    }


def index_similarity(index, parts: Parts, seed: int = 0) -> dict | None:
    """:func:`similarity_summary` of up to :data:`DRIFT_SAMPLE_ROWS` random rows of a
    built faiss index (None if it has no cells): the figure an add compares new rows
    with, for indices built by another tool (autofaiss)."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(parts.count, min(parts.count, DRIFT_SAMPLE_ROWS), replace=False))
    with _assignment_search(index):
        sims = centroid_similarity(index, parts.rows(rows))
    return None if sims is None else similarity_summary(sims)


def drift_report(index, parts: Parts, start: int, trained: dict | None) -> dict | None:
    """How far rows ``start`` on sit from their centroids, against the training rows'
    figure ``trained``; warns when beyond :data:`DRIFT_RATIO`. None when unmeasurable."""
    if trained is None or parts.count <= start:
        return None
    rng = np.random.default_rng(0)
    count = parts.count - start
    rows = start + np.sort(rng.choice(count, min(count, DRIFT_SAMPLE_ROWS), replace=False))
    sims = centroid_similarity(index, parts.rows(rows))
    if sims is None:
        return None
    trained_distance = max(1.0 - float(trained["mean"]), 1e-6)
    new_distance = 1.0 - float(sims.mean())
    ratio = new_distance / trained_distance
    report = {
        "new_similarity_mean": round(float(sims.mean()), 5),
        "trained_similarity_mean": trained["mean"],
        "distance_ratio": round(ratio, 3),
        "drifted": bool(ratio > DRIFT_RATIO),
    }
    return report


def warn_drift(source_dir: Path, drift: dict | None) -> None:
    if drift is None or not drift["drifted"]:
        return
    _logger.warning(
        "%s: the new rows sit %.2fx farther from their cells' centroids than the rows the "
        "index was trained on (mean similarity %.3f vs %.3f): the cells fit them badly and "
        "recall may drop; run `starkret build-index %s --rebuild` to retrain",
        source_dir,
        drift["distance_ratio"],
        drift["new_similarity_mean"],
        drift["trained_similarity_mean"],
        source_dir,
    )


def read_infos(index_dir: Path) -> dict | None:
    """The published ``infos.json`` of an index folder, None if there is none."""
    path = index_dir / "infos.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none, or unreadable: build from scratch
        return None


def remove_stale_segments(index_dir: Path, infos: dict) -> None:
    """Remove metadata segments ``infos`` does not list (left by a rebuild or a killed
    add); call after publishing ``infos``."""
    keep = set(infos.get("metadata_segments", []))
    base = METADATA_FILE.name
    for path in index_dir.glob("metadata.p*.arrow"):
        if path.name not in keep and path.name != base:
            path.unlink(missing_ok=True)
