"""Exact inner-product top-k: starkret.topk against faiss IndexFlatIP and numpy.

Same data, same run: n rows x 768 (float32, and the same rows as float16 for
starkret), batches of 1, 16, 256 and 1024 random queries, k=10, all cores for
everyone. faiss searches float32 (IndexFlatIP has no float16 storage); numpy is
``q @ db.T`` then ``argpartition``. For batches >= 256 the achieved GFLOP/s
(2 * n * d * q / time) is printed too.

The int8 first pass (``starkret.index.q8``: int8 copy of the float16 rows, proven
bound, float32 re-rank; results identical to the float32 scan, checked here) is
measured against faiss IndexFlatIP (f32) and against faiss's own 8-bit route,
IndexScalarQuantizer 8-bit re-ranked by IndexRefine over the flat index (approximate:
its recall@10 against exact is reported). Its rows give the rows re-ranked per query
(median and p99), its memory per million rows and its effective GFLOP/s (the float32
work of an exhaustive scan, 2 * n * d per query, over its time).
"""

from __future__ import annotations

import os
import time

import numpy as np
from common import Row, best_rate

DIM = 768
K = 10
BATCHES = (1, 16, 256, 1024)
#: faiss IndexRefine re-ranks k_factor * k candidates of its SQ8 scan.
SQ8_K_FACTOR = 4


def add_arguments(parser) -> None:
    group = parser.add_argument_group("topk")
    group.add_argument(
        "--topk-rows", type=int, default=1_000_000, help="database rows (--quick: 100,000)"
    )


def _database(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    db = np.empty((n, DIM), np.float32)
    for start in range(0, n, 65_536):
        block = rng.standard_normal((min(65_536, n - start), DIM), dtype=np.float32)
        db[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return db


def _numpy_topk(queries: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    out = []
    # 256 queries at a time keep the score matrix at 1 GB for a million rows.
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ db.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
        out.append(np.take_along_axis(part, order, 1))
    return np.concatenate(out)


def run(args) -> list[Row]:
    import faiss

    import starkret
    from starkret.index.q8 import topk_q8_parts

    cores = os.cpu_count() or 1
    faiss.omp_set_num_threads(cores)
    n = 100_000 if args.quick else args.topk_rows
    t0 = time.perf_counter()
    db32 = _database(n)
    db16 = db32.astype(np.float16)
    index = faiss.IndexFlatIP(DIM)
    index.add(db32)
    print(f"  topk: {n:,} x {DIM} rows ready in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    codes = starkret._core.q8_quantize(db16.view(np.uint16))
    q8_seconds = time.perf_counter() - t0
    q8_mb = codes.nbytes / n  # bytes per row = MB per million rows
    sq8 = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq8.train(db32[: min(n, 100_000)])
    sq8.add(db32)
    refined = faiss.IndexRefine(sq8, index)  # re-ranks with the flat index's f32 rows
    refined.k_factor = SQ8_K_FACTOR
    print(
        f"  topk: int8 copy in {q8_seconds:.1f} s ({q8_mb:.0f} MB per million rows, "
        f"first pass {starkret._core.q8_default_first_pass()})",
        flush=True,
    )

    rows: list[Row] = []
    rng = np.random.default_rng(1)
    for batch in BATCHES:
        queries = rng.standard_normal((batch, DIM), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        # One timed run for the long cases (a 1024-query batch is ~1.6 TFLOP at 1M rows).
        heavy = n * batch > 100_000_000
        timing = {"repeats": 1 if heavy else 3, "warmup": 0 if heavy else 1}

        def int8(q=queries):
            return topk_q8_parts(q, [db16], [codes], K)

        rates = {
            "int8": best_rate(int8, batch, **timing),
            "sq8": best_rate(lambda q=queries: refined.search(q, K), batch, **timing),
            "f16": best_rate(lambda q=queries: starkret.topk(q, db16, K), batch, **timing),
            "f32": best_rate(lambda q=queries: starkret.topk(q, db32, K), batch, **timing),
            "faiss": best_rate(lambda q=queries: index.search(q, K), batch, **timing),
            "numpy": best_rate(lambda q=queries: _numpy_topk(q, db32, K), batch, **timing),
        }
        exact_scores, exact_ids = starkret.topk(queries, db16, K)
        got = int8()
        identical = np.array_equal(got.ids, exact_ids) and np.array_equal(
            got.scores.view(np.uint32), exact_scores.view(np.uint32)
        )
        assert identical, "the int8 first pass must give the float32 scan's results"
        sq8_ids = refined.search(queries, K)[1]
        sq8_recall = np.mean(
            [len(set(a) & set(b)) / K for a, b in zip(sq8_ids, exact_ids, strict=True)]
        )
        median, p99 = np.median(got.reranked), np.percentile(got.reranked, 99)
        reranked = f"median {median:.0f}, p99 {p99:.0f}"
        ours = starkret.topk(queries, db32, K)[1]
        theirs = index.search(queries, K)[1]
        agree = np.mean([len(set(a) & set(b)) / K for a, b in zip(ours, theirs, strict=True)])
        line = f"  topk batch {batch}: ids agree with faiss {100 * agree:.2f}%"
        if batch >= 256:
            flops = 2.0 * n * DIM
            gflops = ", ".join(f"{name} {rate * flops / 1e9:.0f}" for name, rate in rates.items())
            line += f"; GFLOP/s: {gflops}"
        line += f"; int8 re-ranked rows/query {reranked}"
        line += f"; faiss SQ8+refine recall@10 {sq8_recall:.4f}"
        print(line, flush=True)
        faiss_name = f"faiss IndexFlatIP f32 x{cores} threads"
        gflops = rates["int8"] * 2.0 * n * DIM / 1e9
        # got.first_pass: the kernel that ran (vnni, avx2; float32 where the CPU has
        # neither). bfloat16 was measured and is slower everywhere (docs/index.md).
        detail = (
            f"{got.first_pass} kernel; re-ranked/query {reranked}; {q8_mb:.0f} MB per M rows; "
            f"{gflops:.0f} effective GFLOP/s; identical to f32 scan"
        )
        rows.append(
            Row(
                "topk",
                f"{n:,} rows, int8 first pass, batch {batch} ({detail})",
                rates["int8"],
                rates["faiss"],
                faiss_name,
                "queries/s",
            )
        )
        rows.append(
            Row(
                "topk",
                f"{n:,} rows, int8 first pass (exact), batch {batch}",
                rates["int8"],
                rates["sq8"],
                f"faiss SQ8+IndexRefine k_factor {SQ8_K_FACTOR} (approximate, "
                f"recall@10 {sq8_recall:.4f})",
                "queries/s",
            )
        )
        for dtype in ("f16", "f32"):
            rows.append(
                Row(
                    "topk",
                    f"{n:,} rows, {dtype} DB, batch {batch}",
                    rates[dtype],
                    rates["faiss"],
                    faiss_name,
                    "queries/s",
                )
            )
        rows.append(
            Row(
                "topk",
                f"{n:,} rows, f16 DB, batch {batch}",
                rates["f16"],
                rates["numpy"],
                "numpy q@db.T+argpartition",
                "queries/s",
            )
        )
    return rows
