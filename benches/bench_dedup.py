"""Whole-DB near-duplicate removal (``starkret.dedup``) against the exhaustive comparison.

Data: clustered unit vectors (2,000 topics, like CLIP images: images of one topic score
about 0.5 with each other) written as a DB of two sources, with 1% of the rows replaced
by planted near duplicates of another row (cosine uniform in [0.95, 0.995], across and
within sources). Exhaustive = every pair compared, by the same Rust kernel (one cluster).

- ``recall``: at ``--dedup-recall-rows`` (100,000; --quick 20,000), dedup against the
  exhaustive run on the same rows: rows/s of each, and recall of the exhaustive run's
  pairs (the pairs the clusters missed are printed).
- ``scale``: at ``--dedup-rows`` (200,000; --quick 50,000), dedup's seconds and rows/s;
  the baseline is the exhaustive rate scaled by n^2 from the recall case (not run).
  Planted pairs found and pairs found below the threshold are printed.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from common import Row

TOPICS = 2000
THRESHOLD = 0.95


def add_arguments(parser) -> None:
    group = parser.add_argument_group("dedup")
    group.add_argument("--dedup-rows", type=int, default=200_000, help="(--quick: 50,000)")
    group.add_argument("--dedup-recall-rows", type=int, default=100_000, help="(--quick: 20,000)")
    group.add_argument("--dedup-dim", type=int, default=768, help="embedding dimension")


def _planted_db(root: Path, n: int, dim: int, seed: int = 0):
    """Two sources (aa: 2/3 of the rows, bb: the rest); returns the planted (row, row)
    pairs as global rows (aa first) and all vectors as float16."""
    from starkret.testing import write_source

    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((TOPICS, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float16)
    for start in range(0, n, 50_000):
        stop = min(n, start + 50_000)
        v = topics[rng.integers(0, TOPICS, stop - start)]
        v = v + rng.standard_normal((stop - start, dim)).astype(np.float32) / np.sqrt(dim)
        x[start:stop] = v / np.linalg.norm(v, axis=1, keepdims=True)
    m = n // 100
    picked = rng.choice(n, 2 * m, replace=False)
    src, dst = picked[:m], picked[m:]
    base = x[src].astype(np.float32)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = rng.uniform(0.95, 0.995, m).astype(np.float32)[:, None]
    x[dst] = cos * base + np.sqrt(1 - cos**2) * noise
    cut = 2 * n // 3
    write_source(root / "aa", "aa", x[:cut].astype(np.float32), part_size=50_000)
    write_source(root / "bb", "bb", x[cut:].astype(np.float32), part_size=50_000)
    return {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist(), strict=True)}, x


def _found(root: Path) -> set[tuple[int, int]]:
    """Every (a, b) within a recorded group, as global rows (a < b)."""
    from starkret.index.duplicates import read_record

    record = read_record(root, with_clusters=False)
    counts = {s["name"]: s["covered"] for s in record.info["sources"]}
    starts = np.cumsum([0] + [counts[s] for s in record.sources])[:-1]
    rows = starts[record.members_source] + record.members_row
    out = set()
    for g in np.unique(record.members_group):
        members = sorted(rows[record.members_group == g].tolist())
        out |= {(a, b) for i, a in enumerate(members) for b in members[i + 1 :]}
    return out


def _exhaustive(x: np.ndarray) -> tuple[set[tuple[int, int]], float]:
    import starkret._core as core

    n = len(x)
    start = time.perf_counter()
    a, b, _, _ = core.neardup_pairs(
        [x.view(np.uint16)], np.zeros((n, 1), np.int32), np.ones(n, np.uint8), THRESHOLD
    )
    seconds = time.perf_counter() - start
    return set(zip(a.tolist(), b.tolist(), strict=True)), seconds


def _connected(pairs: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Pairs within the connected components of ``pairs`` (what a group record holds)."""
    import starkret._core as core

    if not pairs:
        return set()
    a, b = (np.array(v, np.int64) for v in zip(*pairs, strict=True))
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    labels = core.connected_components(inv[: len(a)], inv[len(a) :], len(nodes))
    out = set()
    for label in np.unique(labels):
        members = sorted(nodes[labels == label].tolist())
        out |= {(p, q) for i, p in enumerate(members) for q in members[i + 1 :]}
    return out


def run(args) -> list[Row]:
    from starkret.index.dedup import dedup

    rows: list[Row] = []
    dim = args.dedup_dim
    recall_n = 20_000 if args.quick else args.dedup_recall_rows
    scale_n = 50_000 if args.quick else args.dedup_rows
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "recall"
        _, x = _planted_db(root, recall_n, dim)
        summary = dedup(root, THRESHOLD)
        found = _found(root)
        truth, exhaustive_s = _exhaustive(x)
        want = _connected(truth)
        missed = want - found
        recall = 1 - len(missed) / max(1, len(want))
        print(
            f"  dedup {recall_n:,} rows: {summary['seconds']:.1f} s, exhaustive "
            f"{exhaustive_s:.1f} s; recall of exhaustive pairs {recall:.4f} "
            f"({len(missed)} of {len(want)} missed; {summary['clusters']} clusters, "
            f"{summary['compared']:,} dot products vs {recall_n * (recall_n - 1) // 2:,})",
            flush=True,
        )
        rows.append(
            Row(
                "dedup",
                f"{recall_n:,} rows x {dim}, recall {recall:.4f}",
                recall_n / summary["seconds"],
                recall_n / exhaustive_s,
                "exhaustive pairs (same kernel)",
                "rows/s",
            )
        )
        root = Path(tmp) / "scale"
        planted, x = _planted_db(root, scale_n, dim, seed=1)
        del x
        summary = dedup(root, THRESHOLD)
        found = _found(root)
        below = _below_threshold(root)
        hit = len(planted & found)
        print(
            f"  dedup {scale_n:,} rows: {summary['seconds']:.1f} s; planted pairs found "
            f"{hit} of {len(planted)}; pairs below the threshold: {below}",
            flush=True,
        )
        scaled = (recall_n / exhaustive_s) * (recall_n / scale_n)
        rows.append(
            Row(
                "dedup",
                f"{scale_n:,} rows x {dim}, {summary['seconds']:.1f} s, planted "
                f"{hit}/{len(planted)}",
                scale_n / summary["seconds"],
                scaled,
                "exhaustive pairs (n^2-scaled, not run)",
                "rows/s",
            )
        )
    return rows


def _below_threshold(root: Path) -> int:
    """Recorded images whose best cosine within their group is under the threshold."""
    from starkret.index.db import ImageDB
    from starkret.index.duplicates import read_record

    record = read_record(root, with_clusters=False)
    db = ImageDB.open(root, duplicates="keep")
    bad = 0
    for g in np.unique(record.members_group):
        at = np.flatnonzero(record.members_group == g)
        vecs = np.stack(
            [
                db.vectors(
                    record.sources[int(record.members_source[i])], [int(record.members_row[i])]
                )[0]
                for i in at
            ]
        )
        sims = vecs @ vecs.T
        np.fill_diagonal(sims, -1)
        bad += int((sims.max(axis=1) < THRESHOLD - 1e-6).sum())
    return bad
