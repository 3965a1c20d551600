"""The aligner's choice (reuse + near-duplicate rules) in Rust against the Python reference.

Same moments, same candidates, same run: episodes of 8 moments, 100 candidates each
(5 sources x top 5 x over-fetch 4) of 768-d CLIP vectors. Moments of one episode draw
their candidates from a shared pool of 150 images (one conversation keeps returning to
its topics), 10% of candidates are near duplicates of a neighbour, and scores range
across the threshold, so reuse, near-duplicate and threshold rules all do work.
"""

from __future__ import annotations

import numpy as np
from common import Row, best_rate


def add_arguments(parser) -> None:
    group = parser.add_argument_group("align")
    group.add_argument("--align-moments", type=int, default=2000, help="moments")


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
        )
    ]
