"""Stark-scale exact search on one GPU: 1M descriptions x up to 25M images, synthetic.

The image rows (float16, unit) and the queries are generated on the device, so nothing
touches the disk; rows stay resident (25M x 768 x 2 bytes = 38 GB fits an H200/H100).
Query blocks run until ``--time-limit`` seconds, then queries/s and TFLOP/s are reported
and the full run's time extrapolated. TFLOP/s counts the useful 2 x rows x dim multiply-
adds per query; the float32-exact path executes twice that (the query's high and low
float16 halves).

    python benches/gpu_stark.py                       # 25M rows, 1M queries, < 8 min
    python benches/gpu_stark.py --rows 1000000 --queries 20000
    python benches/gpu_stark.py --device cpu --rows 20000 --queries 64 --check   # smoke

``--check`` first compares a small slice with the Rust scan (``starkret.topk``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=25_000_000)
    parser.add_argument("--queries", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--block", type=int, default=16384, help="queries per timed block")
    parser.add_argument("--query-chunk", type=int, default=None)
    parser.add_argument("--tile-rows", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=420.0, help="seconds of search")
    parser.add_argument("--check", action="store_true", help="compare a slice with the Rust scan")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    from starkret.index.gpu import DeviceSearcher

    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    report: dict[str, object] = {"rows": args.rows, "dim": args.dim, "device": str(dev)}
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(dev)

    if args.check:
        report["check"] = _check(args, DeviceSearcher)

    t = time.perf_counter()
    parts, step = [], 1 << 20
    for start in range(0, args.rows, step):
        n = min(step, args.rows - start)
        x = torch.randn((n, args.dim), generator=gen, device=dev, dtype=torch.float32)
        parts.append((x / x.norm(dim=1, keepdim=True)).half())
        del x
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    report["generate_s"] = round(time.perf_counter() - t, 2)
    searcher = DeviceSearcher(
        parts, device=args.device, query_chunk=args.query_chunk, tile_rows=args.tile_rows
    )
    rng = np.random.default_rng(1)
    done, elapsed = 0, 0.0
    while done < args.queries and elapsed < args.time_limit:
        n = min(args.block, args.queries - done)
        q = rng.standard_normal((n, args.dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        t = time.perf_counter()
        searcher.search(q, args.k)
        elapsed += time.perf_counter() - t
        done += n
        print(f"{done:,} queries in {elapsed:.1f} s ({done / elapsed:,.0f} q/s)", flush=True)
    qps = done / elapsed
    report.update(
        {
            "queries_run": done,
            "search_s": round(elapsed, 2),
            "queries_per_s": round(qps, 1),
            "tflops_useful": round(2 * args.rows * args.dim * qps / 1e12, 1),
            "extrapolated_s_for_all_queries": round(args.queries / qps, 1),
        }
    )
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _check(args, DeviceSearcher) -> dict:
    """The device path against the Rust scan on a small slice with exclusions."""
    from starkret import topk

    rng = np.random.default_rng(2)
    rows = min(args.rows, 200_000)
    db = rng.standard_normal((rows, args.dim)).astype(np.float32)
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float16)
    q = rng.standard_normal((64, args.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exclude = [set(rng.integers(0, rows, 10).tolist()) for _ in range(64)]
    s1, r1 = topk(q, db, 10, exclude=exclude)
    parts = [db[: rows // 3], db[rows // 3 :]]
    s2, r2 = DeviceSearcher(parts, device=args.device).search(q, 10, exclude=exclude)
    result = {
        "rows": rows,
        "ids_equal": float((r1 == r2).mean()),
        "max_score_diff": float(np.abs(s1 - s2).max()),
    }
    print("check against the Rust scan:", result, flush=True)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
