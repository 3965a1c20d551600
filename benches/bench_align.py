"""The aligner's choice (reuse + near-duplicate rules) in Rust against the Python reference,
and ``Aligner.align`` end to end against the raw batched search it runs.

Same moments, same candidates, same run: episodes of 8 moments, 100 candidates each
(5 sources x top 5 x over-fetch 4) of 768-d CLIP vectors. Moments of one episode draw
their candidates from a shared pool of 150 images (one conversation keeps returning to
its topics), 10% of candidates are near duplicates of a neighbour, and scores range
across the threshold, so reuse, near-duplicate and threshold rules all do work.
"""

from __future__ import annotations

import time

import numpy as np
from common import Row, best_rate


def add_arguments(parser) -> None:
    group = parser.add_argument_group("align")
    group.add_argument("--align-moments", type=int, default=2000, help="moments")
    group.add_argument(
        "--align-e2e-moments", type=int, default=1024, help="moments of the end-to-end case"
    )
    group.add_argument(
        "--align-db-rows",
        type=int,
        default=200_000,
        help="rows of the end-to-end case's main source (--quick: 50,000)",
    )


def _moments(n: int, candidates: int = 100, dim: int = 768, seed: int = 0):
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((4000, dim)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    moments = []
    for m in range(n):
        episode_pool = np.random.default_rng(m // 8).choice(len(pool), 150, replace=False)
        ids = rng.choice(episode_pool, candidates, replace=False)
        vectors = pool[ids].copy()
        dup = rng.random(candidates) < 0.1
        vectors[dup] = vectors[np.maximum(np.nonzero(dup)[0] - 1, 0)]
        scores = np.sort(rng.uniform(0.0, 0.35, candidates).astype(np.float32))[::-1]
        moments.append(
            {
                "episode": m // 8,
                "k": 1,
                "ids": ids.astype(np.uint64),
                "scores": scores,
                "vectors": vectors,
            }
        )
    return moments


def run(args) -> list[Row]:
    from starkret import _core
    from starkret.testing import reference_select

    n = 300 if args.quick else args.align_moments
    moments = _moments(n)
    offsets = np.concatenate([[0], np.cumsum([len(m["ids"]) for m in moments])]).astype(np.int64)
    flat = (
        np.array([m["episode"] for m in moments], np.uint64),
        np.array([m["k"] for m in moments], np.int64),
        offsets,
        np.concatenate([m["ids"] for m in moments]),
        np.concatenate([m["scores"] for m in moments]),
        np.concatenate([m["vectors"] for m in moments]),
    )
    options = {"reuse": "episode", "threshold": 0.94, "min_score": 0.2}
    ours = best_rate(lambda: _core.select_images(*flat, **options), n, repeats=5)
    ref = best_rate(lambda: reference_select(moments, **options), n, repeats=1, warmup=0)
    return [
        Row(
            "aligner choice",
            f"{n} moments x 100 candidates, 768-d",
            ours,
            ref,
            "Python reference",
            "moments/s",
        ),
        *run_end_to_end(args),
    ]


# ==== End to end: Aligner.align against the raw batched search it runs ====


def _write_db(root, sizes: dict[str, int], dim: int = 768, part: int = 10_000) -> None:
    """Embedded sources of random unit rows (written part by part, small memory)."""
    from starkret.testing import write_source

    rng = np.random.default_rng(3)
    for name, n in sizes.items():
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        write_source(root / name, name, vectors, part_size=part)


def run_end_to_end(args) -> list[Row]:
    """``Aligner.align`` moments/s against raw ``topk_parts`` queries/s, same queries, same DB.

    The raw search is what the aligner cannot avoid: one exact Rust scan of every source
    at the aligner's fetch size (``k_per_source x overfetch``). The ratio is the share of
    the aligner's time spent searching; the rest is encoding checks, candidate vectors,
    the Rust choice and the Alignment objects.
    """
    import tempfile
    from pathlib import Path

    import starkret
    from starkret import Aligner, ImageDB, build_index

    rows = 50_000 if args.quick else args.align_db_rows
    sizes = {"cc12m": rows, "chartqa": max(rows // 10, 1)}
    n = 256 if args.quick else args.align_e2e_moments
    with tempfile.TemporaryDirectory(prefix="starkret-bench-align-") as tmp:
        root = Path(tmp)
        _write_db(root, sizes)
        for name in sizes:
            build_index(root / name, kind="exact")
        db = ImageDB.open(root)
        rng = np.random.default_rng(4)
        # text-like queries: far from every image (random directions)
        queries = rng.standard_normal((n, 768), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        moments = [
            {"episode_id": f"e{i // 8}", "moment_id": f"m{i}", "vector": queries[i]}
            for i in range(n)
        ]
        aligner = Aligner(db, k_per_source=5, min_score=-1.0)
        fetch = aligner.k_per_source * aligner.overfetch
        parts = {name: db.embeddings(name) for name in db.sources}

        def raw() -> None:
            for name in db.sources:
                starkret.topk_parts(queries, parts[name], fetch)

        # Alternate the two, best of three each: on a shared machine the load changes
        # between runs, and alternating exposes both sides to the same conditions.
        align = lambda: Aligner(db, k_per_source=5, min_score=-1.0).align(moments)  # noqa: E731
        align()
        best = {"ours": float("inf"), "raw": float("inf")}
        for _ in range(3):
            for name, fn in (("ours", align), ("raw", raw)):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        ours, base = n / best["ours"], n / best["raw"]
    case = f"{n} moments, {sum(sizes.values()):,} rows x 768 in 2 sources, fetch {fetch}"
    return [Row("aligner end to end", case, ours, base, "raw batched search", "moments/s")]
