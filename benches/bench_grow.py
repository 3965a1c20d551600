"""Growing an index: ``build-index`` adding a new part's rows against a full rebuild.

For each size N (``--grow-rows``, 200,000 by default; ``--grow-large`` adds 2,000,000)
a synthetic source of N clustered 768-d rows (``bench_scale``'s generator) is indexed,
then one part of ``--grow-add`` rows (10,000) from the same distribution is appended
and ``build_index`` adds it; the baseline is ``build_index(rebuild=True)`` of the same
N + 10,000 rows. Reported for ``exact`` (metadata, key index, int8 copies) and ``ivf``
(codes appended to the trained cells) as milliseconds, so the ratio is the add's share of a
rebuild (targets, DESIGN.md section 6: ivf <= 0.10x at 200k rows, <= 0.02x at 2M).

    starkret bench -- --only grow                   # 200k rows, ~5 minutes on 2 cores
    starkret bench -- --only grow --grow-large      # and 2M rows (~7 GB of disk)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_scale import DIM, PART_ROWS, write_synthetic_source
from common import Row

LARGE_ROWS = 2_000_000
CLUSTERS = 4096  # write_synthetic_source's default
#: DESIGN.md section 6: the add's share of a full rebuild, for 10,000 new rows.
TARGETS = {("ivf", 200_000): 0.10, ("ivf", LARGE_ROWS): 0.02}


def add_arguments(parser) -> None:
    group = parser.add_argument_group("grow")
    group.add_argument(
        "--grow-rows", type=int, nargs="+", default=[200_000], help="source sizes to grow"
    )
    group.add_argument("--grow-large", action="store_true", help="also 2,000,000 rows")
    group.add_argument("--grow-add", type=int, default=10_000, help="rows the new part holds")
    group.add_argument("--grow-dir", default=tempfile.gettempdir(), help="where to write")
    group.add_argument(
        "--grow-kinds", nargs="+", default=["exact", "ivf"], choices=["exact", "ivf"]
    )


def _write_new_part(folder: Path, part: int, start: int, rows: int) -> None:
    """Part ``part`` of ``rows`` new rows from the source's distribution: around the
    centres ``write_synthetic_source(seed=0)`` drew (its rng's first draw), same spread."""
    from starkret.testing import write_manifest, write_part

    centres = np.random.default_rng(0).standard_normal((CLUSTERS, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(1000 + part)
    noise = rng.standard_normal((rows, DIM)).astype(np.float32) / np.sqrt(DIM)
    vectors = centres[rng.integers(0, CLUSTERS, rows)] + 0.7 * noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = [f"{i:09d}" for i in range(start, start + rows)]
    write_part(
        folder,
        "grow",
        part,
        keys,
        vectors,
        urls=[f"https://img.example/grow/{k}.jpg" for k in keys],
        captions=[f"synthetic caption {k}" for k in keys],
        shard=f"{part:05d}",
    )
    write_manifest(folder, "grow", DIM, start + rows, model="ViT-L-14-336", pretrained="openai")


def _new_part_files(folder: Path, part: int) -> list[Path]:
    from starkret.store.layout import part_file

    return [part_file(folder, sub, part) for sub in ("img_emb", "metadata", "failures")]


def _timed(fn) -> tuple[float, dict]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _grow_case(root: Path, rows: int, add: int, kinds: list[str]) -> list[Row]:
    from starkret import build_index

    folder = root / "grow"
    write_synthetic_source(folder, "grow", rows)
    part = -(-rows // PART_ROWS)
    _write_new_part(folder, part, rows, add)
    aside = root / "aside"
    aside.mkdir()
    new_files = [p for p in _new_part_files(folder, part) if p.exists()]
    out = []
    for kind in kinds:
        for p in new_files:  # the source as it was before the new part
            os.replace(p, aside / p.name)
        build_index(folder, kind=kind, rebuild=True)
        for p in new_files:
            os.replace(aside / p.name, p)
        add_s, infos = _timed(lambda k=kind: build_index(folder, kind=k))
        assert infos["added"] == add and infos["rebuilt"] is None, infos.get("rebuilt")
        drift = infos.get("drift", {}).get("distance_ratio")
        rebuild_s, _ = _timed(lambda k=kind: build_index(folder, kind=k, rebuild=True))
        print(
            f"  grow {kind}: {rows:,} + {add:,} rows: add {add_s:.2f} s, rebuild "
            f"{rebuild_s:.2f} s ({add_s / rebuild_s:.1%})"
            + (f", drift ratio {drift}" if drift is not None else ""),
            flush=True,
        )
        target = TARGETS.get((kind, rows))
        out.append(
            Row(
                "grow",
                f"{kind}: add {add:,} rows to {rows:,} (time; ratio = add / rebuild)",
                add_s * 1000,
                rebuild_s * 1000,
                "full rebuild (build-index --rebuild)",
                "ms",
                details={
                    "target ratio": f"<= {target:.2f}x" if target else "none",
                    "drift ratio": drift if drift is not None else "n/a",
                },
            )
        )
    return out


def run(args) -> list[Row]:
    sizes = [20_000] if args.quick else list(args.grow_rows)
    if args.grow_large and not args.quick:
        sizes.append(LARGE_ROWS)
    add = 1_000 if args.quick else args.grow_add
    rows: list[Row] = []
    for n in sizes:
        need = (n + add) * (DIM * 2 + 100) * 1.3
        root = Path(tempfile.mkdtemp(prefix="starkret-grow-", dir=args.grow_dir))
        print(f"  grow: {n:,} + {add:,} rows in {root}: ~{need / 1e9:.1f} GB of disk", flush=True)
        try:
            rows += _grow_case(root, n, add, args.grow_kinds)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows
