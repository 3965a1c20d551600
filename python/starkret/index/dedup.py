"""Whole-DB near-duplicate removal: ``starkret dedup`` / :func:`dedup`.

Finds every group of images whose embeddings are at least ``threshold`` similar
(cosine; the rows are unit vectors), within and across the DB's sources, keeps one
image per group and records the others in ``DB/duplicates.npz``
(:mod:`starkret.index.duplicates`), which every search then leaves out. Embeddings and
indices are never rewritten.

How (SemDeDup's plan, in Rust on the CPU, ``rust/neardup.rs``):

1. **Clusters.** The centroids of the largest source's ivf index when it has one and
   holds at least half the rows; else spherical k-means on a sample (about
   ``sqrt(rows)`` clusters, :data:`KMEANS_ITERATIONS` rounds). A DB of up to
   :data:`EXHAUSTIVE_ROWS` rows is one cluster: the exhaustive comparison.
2. **Assignment.** Every row joins its nearest centroid and every other centroid
   scoring within ``margin`` of the nearest, at most ``max_clusters`` in all: two
   near-identical rows on either side of a border still share a cluster. (Two unit
   rows with cosine ``t`` differ by at most ``sqrt(2 - 2t)`` in their score against
   any unit centroid, so a wider margin can only find more pairs.)
3. **Exact comparison** inside each cluster, float32 dot products with the exact
   search's kernel; a pair is reported once (by the lowest cluster both share).
4. **Groups** are the connected components of the ``>= threshold`` graph (union-find):
   if A~B and B~C, then A, B, C are one group even when A and C score lower.
5. **Keep rule:** per group, the image with the most pixels (``width x height`` from
   the metadata written by ``embed``); unknown sizes count as 0; ties go to the earlier
   source (sorted by name), then the lower row.

**Incremental.** The record notes, per source, the rows it covered and the clusters of
each. A rerun with the same settings and sources places only the rows added since into
those clusters and compares them with every member of their clusters (old and new);
pairs of two old rows are not compared again. Old groups are merged with the new pairs.
Otherwise (other settings, sources, or a source rebuilt shorter) it starts over.

**Safety.** One dedup per DB at a time (a lock under ``DB/.starkret/``; a second run
is refused with :class:`~starkret.errors.OutputBusyError`); the record is published
whole, so a killed run leaves the previous record (or none) and a rerun completes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import starkret._core as _core
from starkret._io import temp_target
from starkret.errors import IncompatibleSourcesError, InvalidInputError, OutputBusyError
from starkret.index.duplicates import RECORD_FILE, RECORD_FORMAT, Record, read_record, write_record
from starkret.index.source import SourceIndex, source_dirs
from starkret.store.claims import STATE_DIR, lock_file
from starkret.store.layout import part_files

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_MAX_CLUSTERS",
    "DEFAULT_THRESHOLD",
    "dedup",
]

#: Cosine at or above which two images are near duplicates, by default.
DEFAULT_THRESHOLD = 0.95
#: A row also joins every cluster scoring within this of its nearest one...
DEFAULT_MARGIN = 0.05
#: ... up to this many clusters in all.
DEFAULT_MAX_CLUSTERS = 4
#: Up to this many rows, one cluster: every pair is compared.
EXHAUSTIVE_ROWS = 4096
#: k-means: rounds, and sample rows per cluster.
KMEANS_ITERATIONS = 6
KMEANS_SAMPLE_PER_CLUSTER = 40
#: The lock file, under ``DB/.starkret/``.
LOCK_FILE = "dedup.lock"

_logger = logging.getLogger("starkret")


@dataclass
class _Source:
    name: str
    index: SourceIndex
    start: int  # global row of its first row in this run

    @property
    def count(self) -> int:
        return self.index.count

    def views(self, first: int = 0) -> list[np.ndarray]:
        """Its parts as float16 bits from row ``first`` on (memory maps, sliced)."""
        out = []
        offsets = self.index.parts.offsets
        for p, array in enumerate(self.index.parts.arrays):
            lo = max(0, first - int(offsets[p]))
            if lo < array.shape[0]:
                out.append(_bits(array[lo:]))
        return out


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint16) if array.dtype == np.float16 else array


def dedup(
    db_path: str | os.PathLike,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    sources: list[str] | None = None,
    margin: float = DEFAULT_MARGIN,
    max_clusters: int = DEFAULT_MAX_CLUSTERS,
    clusters: int | None = None,
    full: bool = False,
    threads: int | None = None,
    seed: int = 0,
) -> dict:
    """Find near-duplicate groups across the DB at ``db_path`` and record them (see the
    module doc); returns the summary.

    ``sources``: only these (default: all); ``clusters``: k-means clusters (default:
    about ``sqrt(rows)``, or the ivf centroids); ``full``: ignore an earlier record and
    compare everything again.

    Returns ``{"rows", "new_rows", "groups", "dropped", "pairs", "compared",
    "seconds", "record", ...}``: ``rows`` covered, ``groups`` of two or more images,
    ``dropped`` images left out of searches from now on, ``pairs`` found by this run,
    ``compared`` dot products computed.

    >>> starkret.dedup("db", threshold=0.95)  # doctest: +SKIP
    {'rows': 200000, 'new_rows': 200000, 'groups': 1000, 'dropped': 1000, ...}
    """
    started = time.perf_counter()
    threshold, margin = float(threshold), float(margin)
    if not -1.0 <= threshold <= 1.0:
        raise InvalidInputError(f"threshold must be a cosine in [-1, 1], got {threshold}")
    if not margin >= 0:
        raise InvalidInputError(f"margin must be >= 0, got {margin}")
    if isinstance(max_clusters, bool) or int(max_clusters) < 1:
        raise InvalidInputError(f"max_clusters must be at least 1, got {max_clusters!r}")
    root = Path(db_path)
    picked = _open_sources(root, sources)
    state = root / STATE_DIR
    state.mkdir(exist_ok=True)
    claim = lock_file(state / LOCK_FILE)
    if claim is None:
        raise OutputBusyError(
            f"another starkret dedup is running on {root} (it holds {state / LOCK_FILE}): "
            "wait for it to finish"
        )
    with claim:
        _remove_stale_temporaries(root)
        settings = {
            "threshold": threshold,
            "margin": margin,
            "max_clusters": int(max_clusters),
        }
        old = None if full else _reusable(read_record(root), picked, settings)
        return _run(root, picked, settings, old, clusters, threads, seed, started)


def _open_sources(root: Path, names: list[str] | None) -> list[_Source]:
    indices = [SourceIndex.open(d) for d in source_dirs(root)]
    by_name = {idx.manifest["source"]: idx for idx in indices}
    if names is not None:
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            raise InvalidInputError(f"unknown sources {unknown}; this DB has {sorted(by_name)}")
        by_name = {n: by_name[n] for n in names}
    picked, start = [], 0
    dims = set()
    for name in sorted(by_name):
        idx = by_name[name]
        dims.add((idx.manifest.get("model"), idx.parts.dim))
        picked.append(_Source(name, idx, start))
        start += idx.count
    if len(dims) > 1:
        raise IncompatibleSourcesError(
            f"the sources of {root} were embedded with different models {sorted(dims)}: "
            "their vectors cannot be compared"
        )
    return picked


def _remove_stale_temporaries(root: Path) -> None:
    """A killed run's half-written record (we hold the lock: no live writer)."""
    for path in root.glob(f".{RECORD_FILE}.tmp-*"):
        if temp_target(path.name) == RECORD_FILE:
            path.unlink(missing_ok=True)


def _reusable(record: Record | None, picked: list[_Source], settings: dict) -> Record | None:
    """The earlier record when this run can extend it, else None (a full run)."""
    if record is None:
        return None
    info = record.info
    same = all(info.get(k) == v for k, v in settings.items())
    names = [s.name for s in picked]
    if not same or record.sources != names:
        _logger.warning(
            "%s: recorded with other settings or sources; comparing every row again",
            RECORD_FILE,
        )
        return None
    for s in picked:
        if record.covered[s.name] > s.count:
            _logger.warning(
                "%s: source %s shrank since the last dedup; comparing every row again",
                RECORD_FILE,
                s.name,
            )
            return None
    if len(record.assigned) != sum(record.covered.values()):
        return None
    return record


def _run(root, picked, settings, old, clusters, threads, seed, started) -> dict:
    n = sum(s.count for s in picked)
    r = settings["max_clusters"]
    if n == 0:
        raise InvalidInputError(f"{root}: the sources hold no rows")
    covered = old.covered if old is not None else {s.name: 0 for s in picked}
    new_rows = n - sum(covered.values())
    if old is not None and new_rows == 0:
        return _summary(old, n, 0, 0, 0, started, root, unchanged=True)

    if old is not None:
        centroids, origin = old.centroids, old.info["centroids"]
        r = old.assigned.shape[1]
    else:
        centroids, origin = _centroids(picked, n, clusters, seed, threads)
    # clusters of every row: the recorded ones for covered rows, computed for new ones
    assigned = np.empty((n, r), np.int32)
    is_new = np.zeros(n, np.uint8)
    old_at = 0
    for s in picked:
        c = covered[s.name]
        if c:
            assigned[s.start : s.start + c] = old.assigned[old_at : old_at + c]
            old_at += c
        if c < s.count:
            views = s.views(c)
            assigned[s.start + c : s.start + s.count] = _core.neardup_nearest_centroids(
                views, centroids, r, settings["margin"], threads=threads
            )
            is_new[s.start + c : s.start + s.count] = 1
    parts = [v for s in picked for v in s.views()]
    a, b, _, compared = _core.neardup_pairs(
        parts, assigned, is_new, np.float32(settings["threshold"]), threads=threads
    )
    groups = _groups(picked, old, a, b)
    kept = _keep(picked, groups)
    members_global, members_group = groups
    starts = np.array([s.start for s in picked], np.int64)
    which = (np.searchsorted(starts, members_global, side="right") - 1).astype(np.int16)
    info = {
        "format": RECORD_FORMAT,
        "written_by": "starkret dedup",
        **settings,
        "centroids": origin,
        "clusters": len(centroids),
        "groups_rule": "connected components of the >= threshold graph",
        "keep_rule": "most pixels (width x height), then earlier source (by name), then lower row",
        "sources": [{"name": s.name, "covered": s.count} for s in picked],
    }
    record = Record(
        info=info,
        members_source=which,
        members_row=members_global - starts[which],
        members_group=members_group,
        members_kept=kept,
        centroids=np.asarray(centroids, np.float32),
        assigned=assigned,
    )
    info["groups"] = len(np.unique(members_group))
    info["dropped"] = int((~kept).sum())
    info["seconds"] = round(time.perf_counter() - started, 3)
    write_record(root, record)
    return _summary(record, n, new_rows, len(a), int(compared), started, root)


def _summary(record, n, new_rows, pairs, compared, started, root, unchanged=False) -> dict:
    return {
        "rows": int(n),
        "new_rows": int(new_rows),
        "groups": int(record.info.get("groups", 0)),
        "dropped": int(record.info.get("dropped", 0)),
        "pairs": int(pairs),
        "compared": int(compared),
        "clusters": int(record.info.get("clusters", 0)),
        "centroids": record.info.get("centroids"),
        "threshold": record.info.get("threshold"),
        "unchanged": unchanged,
        "seconds": round(time.perf_counter() - started, 3),
        "record": str(Path(root) / RECORD_FILE),
    }


# ==== Clusters ====


def _centroids(picked, n, clusters, seed, threads) -> tuple[np.ndarray, str]:
    dim = picked[0].index.parts.dim
    if clusters is None and n <= EXHAUSTIVE_ROWS:
        return np.full((1, dim), 1.0 / np.sqrt(dim), np.float32), "one cluster (exhaustive)"
    if clusters is None:
        biggest = max(picked, key=lambda s: s.count)
        ivf = getattr(biggest.index, "_ivf", None)
        if ivf is not None and biggest.count * 2 >= n:
            found = _ivf_centroids(ivf.index)
            if found is not None and len(found) > 1:
                return found, f"ivf:{biggest.name}"
    k = int(clusters) if clusters is not None else max(1, round(np.sqrt(n)))
    if k < 1:
        raise InvalidInputError(f"clusters must be at least 1, got {clusters}")
    return _kmeans(picked, n, min(k, n), seed, threads), f"k-means ({k} clusters)"


def _ivf_centroids(index) -> np.ndarray | None:
    """The coarse centroids of a faiss ivf index, as unit rows."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
        cents = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    except RuntimeError:
        return None
    norms = np.linalg.norm(cents, axis=1, keepdims=True)
    return np.ascontiguousarray(cents / np.where(norms > 0, norms, 1), np.float32)


def _sample(picked, n, size, rng) -> np.ndarray:
    rows = np.sort(rng.choice(n, min(n, size), replace=False))
    out = []
    for s in picked:
        mine = rows[(rows >= s.start) & (rows < s.start + s.count)] - s.start
        if len(mine):
            out.append(s.index.parts.rows(mine))
    return np.ascontiguousarray(np.concatenate(out), np.float32)


def _kmeans(picked, n, k, seed, threads) -> np.ndarray:
    """Spherical k-means on a sample; the assignment step is the Rust scan."""
    rng = np.random.default_rng(seed)
    sample = _sample(picked, n, k * KMEANS_SAMPLE_PER_CLUSTER, rng)
    cents = sample[rng.choice(len(sample), k, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        label = _core.neardup_nearest_centroids([sample], cents, 1, 0.0, threads=threads)[:, 0]
        order = np.argsort(label, kind="stable")
        counts = np.bincount(label, minlength=k)
        sums = np.zeros_like(cents)
        present = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts[present])[:-1]])
        sums[present] = np.add.reduceat(sample[order], starts, axis=0)
        empty = np.flatnonzero(counts == 0)
        sums[empty] = sample[rng.choice(len(sample), len(empty))]  # reseed
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        cents = np.ascontiguousarray(sums / np.where(norms > 0, norms, 1), np.float32)
    return cents


# ==== Groups and the keep rule ====


def _groups(picked, old: Record | None, a, b) -> tuple[np.ndarray, np.ndarray]:
    """Every image in a group of two or more (global rows) and its group's number:
    connected components of the new pairs and the old groups."""
    ea, eb = [np.asarray(a, np.int64)], [np.asarray(b, np.int64)]
    if old is not None and len(old.members_row):
        starts = {s.name: s.start for s in picked}
        base = np.array([starts[name] for name in old.sources], np.int64)
        rows = base[old.members_source] + old.members_row
        order = np.argsort(old.members_group, kind="stable")
        g, rows = old.members_group[order], rows[order]
        first = np.concatenate([[0], np.flatnonzero(np.diff(g)) + 1])
        head = rows[np.repeat(first, np.diff(np.append(first, len(g))))]
        ea.append(head)
        eb.append(rows)
    ea, eb = np.concatenate(ea), np.concatenate(eb)
    nodes, inverse = np.unique(np.concatenate([ea, eb]), return_inverse=True)
    labels = _core.connected_components(
        np.ascontiguousarray(inverse[: len(ea)], np.int64),
        np.ascontiguousarray(inverse[len(ea) :], np.int64),
        len(nodes),
    )
    _, group = np.unique(labels, return_inverse=True)
    keep = np.bincount(group)[group] > 1
    return nodes[keep], group[keep].astype(np.int64)


def _pixels(picked, members: np.ndarray) -> np.ndarray:
    """``width x height`` of each member (global rows) from the metadata parts; 0 where
    unknown."""
    import pyarrow.parquet as pq

    out = np.zeros(len(members), np.int64)
    for s in picked:
        mine = np.flatnonzero((members >= s.start) & (members < s.start + s.count))
        if not len(mine):
            continue
        rows = members[mine] - s.start
        offsets = s.index.parts.offsets
        part = np.searchsorted(offsets, rows, side="right") - 1
        files = part_files(s.index.source_dir, "metadata")
        for p in np.unique(part).tolist():
            at = mine[part == p]
            if p >= len(files):
                continue
            try:
                table = pq.read_table(files[p], columns=["width", "height"])
            except (OSError, KeyError, ValueError):
                continue  # no sizes recorded: unknown
            if table.num_rows != offsets[p + 1] - offsets[p]:
                continue
            w = table.column("width").to_numpy(zero_copy_only=False)
            h = table.column("height").to_numpy(zero_copy_only=False)
            local = members[at] - s.start - offsets[p]
            pw = np.nan_to_num(np.asarray(w[local], np.float64), nan=0.0)
            ph = np.nan_to_num(np.asarray(h[local], np.float64), nan=0.0)
            out[at] = (np.clip(pw, 0, None) * np.clip(ph, 0, None)).astype(np.int64)
    return out


def _keep(picked, groups) -> np.ndarray:
    """Which member of each group is kept (see the keep rule in the module doc)."""
    members, group = groups
    kept = np.zeros(len(members), bool)
    if not len(members):
        return kept
    pixels = _pixels(picked, members)
    # global rows run in source-name order, so a lower global row = earlier source, row
    order = np.lexsort((members, -pixels, group))
    first = np.concatenate([[True], np.diff(group[order]) != 0])
    kept[order[first]] = True
    return kept


def describe(summary: dict) -> str:
    """The one-paragraph text summary ``starkret dedup`` prints."""
    if summary.get("unchanged"):
        head = f"{summary['rows']:,} rows, nothing new since the last dedup"
    else:
        head = (
            f"{summary['rows']:,} rows ({summary['new_rows']:,} compared as new) in "
            f"{summary['seconds']:.1f} s: {summary['pairs']:,} pairs >= "
            f"{summary['threshold']} ({summary['compared']:,} dot products, "
            f"{summary['clusters']:,} clusters from {summary['centroids']})"
        )
    return (
        f"{head}\n{summary['groups']:,} groups of near duplicates; {summary['dropped']:,} "
        f"images are left out of searches from now on (record: {summary['record']})"
    )


def summary_json(summary: dict) -> str:
    return json.dumps(summary)
