"""Retrieval at scale: a synthetic N-row source (768-d float16, img2dataset-like metadata).

Reports ``ImageDB.open`` time and RSS, key lookup time, search queries/s at batch
1/64/1024 (exact CPU scan, ivf, and exact GPU when torch sees one), ivf recall@5 on
text-like queries, and ``Aligner.align`` moments/s end to end, against same-run
baselines: a numpy float32 scan of the memory maps and faiss ``IndexFlatIP`` (a float32
copy in RAM, when it fits). The source is written under ``--scale-dir`` (N x 768 x 2
bytes of embeddings plus ~100 bytes of metadata per row; printed before writing) and
removed afterwards unless ``--scale-keep``.

    starkret bench -- --only scale --scale-rows 1000000
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Row, best_rate

PART_ROWS = 100_000
DIM = 768


def add_arguments(parser) -> None:
    group = parser.add_argument_group("scale")
    group.add_argument("--scale-rows", type=int, default=1_000_000, help="rows of the source")
    group.add_argument("--scale-dir", default=tempfile.gettempdir(), help="where to write it")
    group.add_argument("--scale-keep", action="store_true", help="keep the synthetic source")
    group.add_argument("--scale-nlist", type=int, default=None, help="ivf cells (default: auto)")
    group.add_argument(
        "--scale-skip-ivf", action="store_true", help="no ivf build (slow on 2 cores)"
    )


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_synthetic_source(folder: Path, name: str, rows: int, *, clusters: int = 4096, seed=0):
    """Clustered unit rows, written part by part (memory: one part at a time)."""
    from starkret.testing import write_manifest, write_part

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for part, start in enumerate(range(0, rows, PART_ROWS)):
        n = min(PART_ROWS, rows - start)
        v = centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, DIM)).astype(
            np.float32
        ) / np.sqrt(DIM)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        keys = [f"{i:09d}" for i in range(start, start + n)]
        write_part(
            folder,
            name,
            part,
            keys,
            v,
            urls=[f"https://img.example/{name}/{k}.jpg" for k in keys],
            captions=[f"synthetic caption {k}" for k in keys],
            shard=f"{part:05d}",
        )
    write_manifest(folder, name, DIM, rows, model="ViT-L-14-336", pretrained="openai")


def _numpy_scan(parts, queries, k):
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    offset = 0
    for p in parts:
        s = queries @ np.asarray(p, np.float32).T
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        best_i = np.concatenate([best_i, top + offset], 1)
        offset += p.shape[0]
    order = np.argsort(-best_s, axis=1)[:, :k]
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def run(args) -> list[Row]:
    import starkret
    from starkret import Aligner, ImageDB, build_index
    from starkret.index.source import SourceIndex
    from starkret.index.text_like import text_like_queries

    rows_n = 20_000 if args.quick else args.scale_rows
    need = rows_n * (DIM * 2 + 100) + 20_000 * (DIM * 2 + 100)
    root = Path(tempfile.mkdtemp(prefix="starkret-scale-", dir=args.scale_dir))
    print(f"  scale: writing {rows_n:,} + 20,000 rows to {root}: ~{need / 1e9:.1f} GB of disk")
    out: list[Row] = []
    info: dict[str, object] = {"rows": rows_n}
    try:
        t = time.perf_counter()
        write_synthetic_source(root / "big", "big", rows_n)
        write_synthetic_source(root / "small", "small", 20_000, seed=1)
        info["write_s"] = round(time.perf_counter() - t, 1)

        rss0 = _rss_mb()
        t = time.perf_counter()
        db = ImageDB.open(root)
        info["open_s"] = round(time.perf_counter() - t, 3)
        info["open_rss_mb"] = round(_rss_mb() - rss0, 1)
        key = f"big/{rows_n // 2:09d}"
        t = time.perf_counter()
        db.locate(key)
        info["first_lookup_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        for i in range(100):
            db.locate(f"big/{(i * 7919) % rows_n:09d}")
        info["lookup_ms"] = round((time.perf_counter() - t) * 10, 3)
        info["rss_after_lookup_mb"] = round(_rss_mb() - rss0, 1)

        index = SourceIndex.open(root / "big")
        parts = index.parts
        queries = text_like_queries(parts.rows, parts.count, 1024, DIM, seed=3)
        batches = (1, 64) if args.quick else (1, 64, 1024)
        for b in batches:
            q = queries[:b]
            ours = best_rate(
                lambda q=q: index.search(q, 5, exact=True), b, repeats=1 if b > 64 else 2
            )
            base = best_rate(lambda q=q: _numpy_scan(parts.arrays, q, 5), b, repeats=1, warmup=0)
            out.append(
                Row(
                    "scale",
                    f"exact CPU, batch {b}, {rows_n:,} rows",
                    ours,
                    base,
                    "numpy float32 scan",
                    "queries/s",
                )
            )
        # faiss IndexFlatIP over a float32 copy (only when it fits comfortably)
        flat = None
        if rows_n * DIM * 4 < 0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
            import faiss

            flat = faiss.IndexFlatIP(DIM)
            for a in parts.arrays:
                flat.add(np.asarray(a, np.float32))
            q = queries[:64]
            ours = best_rate(lambda: index.search(q, 5, exact=True), 64, repeats=2)
            base = best_rate(lambda: flat.search(q, 5), 64, repeats=2)
            out.append(
                Row(
                    "scale",
                    f"exact CPU, batch 64, {rows_n:,} rows",
                    ours,
                    base,
                    "faiss IndexFlatIP (f32 in RAM)",
                    "queries/s",
                )
            )
            del flat

        # ivf
        if args.scale_skip_ivf:
            info["ivf"] = "skipped (--scale-skip-ivf)"
        else:
            _ivf(root, parts, queries, batches, rows_n, args, info, out)

        # GPU exact, when present
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
        if gpu:
            db.search(queries[:64], k=5, device="cuda")  # upload
            for b in batches:
                q = queries[:b]
                ours = best_rate(lambda q=q: db.search(q, k=5, device="cuda"), b, repeats=2)
                base = best_rate(lambda q=q: db.search(q, k=5), b, repeats=1, warmup=0)
                out.append(
                    Row(
                        "scale",
                        f"exact GPU, batch {b}, {rows_n:,} rows",
                        ours,
                        base,
                        "exact CPU scan",
                        "queries/s",
                    )
                )
        else:
            info["gpu"] = "not measured (no GPU)"

        # Aligner end to end (exact search: the big source rebuilt as exact) vs raw search
        build_index(root / "big", kind="exact")
        db = ImageDB.open(root)
        n_m = 64
        moments = [
            {
                "episode_id": f"e{i // 8}",
                "moment_id": f"m{i}",
                "description": "x",
                "vector": queries[i].tolist(),
            }
            for i in range(n_m)
        ]
        aligner = Aligner(db, k_per_source=5, min_score=0.0)
        ours = best_rate(lambda: aligner.align(moments), n_m, repeats=1)
        base = best_rate(lambda: db.search(queries[:n_m], k=20), n_m, repeats=1)
        out.append(
            Row(
                "scale",
                f"Aligner.align, {n_m} moments, {rows_n:,}+20k rows",
                ours,
                base,
                "raw ImageDB.search k=20",
                "moments/s",
            )
        )
        print("  scale: " + json.dumps(info))
        print(f"  scale: starkret {starkret.__file__}")
    finally:
        if not args.scale_keep:
            shutil.rmtree(root, ignore_errors=True)
    return out


def _ivf(root, parts, queries, batches, rows_n, args, info, out):
    from starkret import build_index
    from starkret.index.source import SourceIndex
    from starkret.index.text_like import recall_at, text_like_queries

    t = time.perf_counter()
    infos = build_index(
        root / "big", kind="ivf", max_index_memory_usage="16GB", ivf_nlist=args.scale_nlist
    )
    info["ivf_build_s"] = round(time.perf_counter() - t, 1)
    for field in (
        "factory",
        "nprobe",
        "candidates",
        "recall_at_5_text_like",
        "index_bytes",
        "query_best_cosine_median",
    ):
        info[f"ivf_{field}"] = infos[field]
    ivf = SourceIndex.open(root / "big")
    fresh = text_like_queries(parts.rows, parts.count, 300, DIM, seed=11)
    _, truth = ivf.search(fresh, 5, exact=True)
    _, got = ivf.search(fresh, 5)
    info["ivf_recall_at_5_fresh_queries"] = round(recall_at(truth, got, 5), 4)
    for b in batches:
        q = queries[:b]
        ours = best_rate(lambda q=q: ivf.search(q, 5), b, repeats=2)
        base = best_rate(lambda q=q: ivf.search(q, 5, exact=True), b, repeats=1, warmup=0)
        out.append(
            Row(
                "scale",
                f"ivf (re-ranked), batch {b}, {rows_n:,} rows",
                ours,
                base,
                "exact CPU scan",
                "queries/s",
            )
        )
