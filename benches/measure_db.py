"""Measure ``ImageDB.open``, key lookup, search and ``Aligner.align`` on a synthetic DB.

Usage::

    python benches/measure_db.py make DIR --rows 2000000 [--source big] [--part 10000]
    python benches/measure_db.py measure DIR [--queries 64]

``make`` writes an ``embed-shards``-like source (768-d float16 parts, img2dataset-like
metadata: key, url, caption) part by part, so memory stays small (disk: ~1.5 GB per
million rows). ``measure`` opens the DB in a fresh process and prints open time and RSS,
first key lookup, exact search q/s and the aligner's end-to-end ratio to raw search.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

DIM = 768


def make(
    folder: Path, source: str, rows: int, part_size: int, seed: int, link: Path | None = None
) -> None:
    from starkret.store.layout import part_file, part_files
    from starkret.testing import write_manifest, write_part

    rng = np.random.default_rng(seed)
    for part, start in enumerate(range(0, rows, part_size)):
        n = min(part_size, rows - start)
        vectors = None
        if link is None:
            vectors = rng.standard_normal((n, DIM), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        keys = [f"{start + i:09d}" for i in range(n)]
        write_part(
            folder,
            source,
            part,
            keys,
            vectors,
            urls=[f"https://img.example.com/{source}/photos/{k}.jpg" for k in keys],
            captions=[f"a synthetic photo number {k} of something nice" for k in keys],
            size=(640, 480),
            shard=f"{part:05d}",
        )
        if link is not None:
            # Reuse another source's parts (same size) as hard links: no disk, no time.
            donors = part_files(link, "img_emb")
            os.link(donors[part % len(donors)], part_file(folder, "img_emb", part))
    write_manifest(folder, source, DIM, rows, model="ViT-L-14-336-quickgelu", pretrained="openai")


def rss_mb(field: str = "VmRSS") -> float:
    """Resident memory (MB); ``RssAnon`` leaves out mapped file pages (page cache)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(root: Path, n_queries: int, align: bool) -> dict:
    from starkret import Aligner, ImageDB

    out: dict = {}
    import pyarrow  # noqa: F401  (a library import, not the DB's memory)

    before, anon = rss_mb(), rss_mb("RssAnon")
    t = time.perf_counter()
    db = ImageDB.open(root)
    out["open_s"] = time.perf_counter() - t
    out["open_rss_mb"] = rss_mb() - before
    sources = db.sources
    big = max(sources, key=lambda s: db.source_manifest(s)["count"])
    count = db.source_manifest(big)["count"]
    key = f"{big}/{count // 2:09d}"
    t = time.perf_counter()
    found = db.locate(key)
    out["first_lookup_s"] = time.perf_counter() - t
    assert found == (big, count // 2), found
    t = time.perf_counter()
    for i in range(100):
        db.locate(f"url:https://img.example.com/{big}/photos/{(i * 7919) % count:09d}.jpg")
    out["lookup_ms"] = (time.perf_counter() - t) * 10
    out["rss_after_lookup_mb"] = rss_mb() - before
    out["anon_rss_after_lookup_mb"] = rss_mb("RssAnon") - anon
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((n_queries, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    db.search(queries[:2], k=5)
    t = time.perf_counter()
    db.search(queries, k=5)
    search_s = time.perf_counter() - t
    out["search_qps"] = n_queries / search_s
    out["rss_after_search_mb"] = rss_mb() - before
    out["anon_rss_after_search_mb"] = rss_mb("RssAnon") - anon
    if align:
        aligner = Aligner(db, k_per_source=5)
        moments = [
            {"episode_id": f"e{i // 8}", "moment_id": f"m{i}", "vector": queries[i]}
            for i in range(n_queries)
        ]
        t = time.perf_counter()
        aligner.align(moments)
        align_s = time.perf_counter() - t
        # Raw batched search at the aligner's fetch size, same queries, same DB.
        fetch = 5 * aligner.overfetch
        t = time.perf_counter()
        db.search(queries, k=fetch)
        raw_s = time.perf_counter() - t
        out["align_moments_per_s"] = n_queries / align_s
        out["raw_search_k20_qps"] = n_queries / raw_s
        out["align_ratio"] = raw_s / align_s
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder", type=Path)
    m.add_argument("--rows", type=int, required=True)
    m.add_argument("--source", default="big")
    m.add_argument("--part", type=int, default=10_000)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument(
        "--link-embeddings",
        type=Path,
        help="hard-link the parts of this source (same part size) instead of writing vectors",
    )
    r = sub.add_parser("measure")
    r.add_argument("root", type=Path)
    r.add_argument("--queries", type=int, default=64)
    r.add_argument("--no-align", action="store_true")
    args = parser.parse_args()
    if args.cmd == "make":
        make(args.folder, args.source, args.rows, args.part, args.seed, args.link_embeddings)
    else:
        print(json.dumps(measure(args.root, args.queries, not args.no_align), indent=1))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
