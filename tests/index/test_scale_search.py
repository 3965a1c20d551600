"""Stark-scale search paths: exact search on a torch device (run on the CPU here), the
ivf index with exact re-ranking on text-like queries, and build_index's auto rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from starkret import Aligner, ImageDB, build_index
from starkret.index.build import AUTO_EXACT_MAX_ROWS, auto_kind
from starkret.index.gpu import DeviceSearcher, device_search
from starkret.index.ivf import choose_codes, choose_nlist, parse_bytes
from starkret.index.source import SourceIndex
from starkret.index.text_like import recall_at, text_like_queries
from starkret.index.topk import topk
from starkret.testing import write_source

#: The torch-device searcher runs on the CPU in CI; on a GPU (benches/gpu.sh) on CUDA too.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def _unit(rng, n, dim):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _clustered(n, dim, clusters, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng, clusters, dim)
    v = centres[rng.integers(0, clusters, n)] + 0.6 * _unit(rng, n, dim)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ==== exact search on a torch device ====


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tile_rows,query_chunk", [(97, 5), (1024, 64), (None, None)])
def test_device_search_equals_the_rust_scan_with_exclusions(tile_rows, query_chunk, device):
    rng = np.random.default_rng(1)
    db = _unit(rng, 1500, 48).astype(np.float16)
    parts = [db[:400], db[400:401], db[401:1000], db[1000:]]
    queries = _unit(rng, 23, 48)
    per_query = [set(rng.integers(0, 1500, 30).tolist()) for _ in range(23)]
    shared = {3, 401, 1499, 7000, -5}
    searcher = DeviceSearcher(parts, device=device, tile_rows=tile_rows, query_chunk=query_chunk)
    for exclude in (None, per_query, shared):
        s1, r1 = topk(queries, db, 9, exclude=exclude)
        s2, r2 = searcher.search(queries, 9, exclude=exclude)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
        assert s2.dtype == np.float32
        # numpy brute force agrees too
        brute = queries @ db.astype(np.float32).T
        if exclude is not None:
            for q in range(len(queries)):
                ban = exclude[q] if isinstance(exclude, list) else exclude
                brute[q, [r for r in ban if 0 <= r < len(db)]] = -np.inf
        np.testing.assert_allclose(np.sort(brute, 1)[:, ::-1][:, :9], s2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_device_search_breaks_ties_to_the_lower_row_like_the_rust_scan(device):
    # Small integers: every product and sum is exact, so ties are exact in any order.
    rng = np.random.default_rng(2)
    db = rng.integers(-2, 3, size=(600, 8)).astype(np.float16)
    queries = rng.integers(-1, 2, size=(40, 8)).astype(np.float32)
    exclude = [set(rng.integers(0, 600, 20).tolist()) for _ in range(40)]
    for k in (1, 5, 60):
        for ex in (None, exclude):
            s1, r1 = topk(queries, db, k, exclude=ex)
            s2, r2 = device_search(
                queries, [db[:250], db[250:]], k, exclude=ex, device=device, tile_rows=64
            )
            np.testing.assert_array_equal(r1, r2)
            np.testing.assert_array_equal(s1, s2)


@pytest.mark.parametrize("device", DEVICES)
def test_device_search_pads_like_the_rust_scan_when_rows_run_out(device):
    db = np.eye(4, dtype=np.float16)
    q = np.ones((2, 4), np.float32)
    s1, r1 = topk(q, db, 6, exclude=[{0}, {0, 1, 2, 3}])
    s2, r2 = device_search(q, db, 6, exclude=[{0}, {0, 1, 2, 3}], device=device)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)
    assert r2[1].tolist() == [-1] * 6 and np.isneginf(s2[1]).all()


def test_split_float16_query_halves_give_float32_scores():
    # The CUDA path scores [hi; lo] float16 halves of each query with float32
    # accumulation; checked here with the same halves multiplied in float64.
    from starkret.index.gpu import split_halves

    rng = np.random.default_rng(4)
    q = _unit(rng, 50, 768)
    rows = _unit(rng, 400, 768).astype(np.float16).astype(np.float64)
    both = split_halves(torch, torch.from_numpy(q)).double().numpy()
    approx = both[:50] @ rows.T + (both[50:] @ rows.T) / 4096
    exact = q.astype(np.float64) @ rows.T
    assert np.abs(approx - exact).max() < 2e-7  # float16 queries alone: ~1e-4
    assert np.abs(both[:50] @ rows.T - exact).max() > 1e-5


def test_imagedb_and_aligner_reach_the_device_path(tmp_path):
    rng = np.random.default_rng(3)
    write_source(tmp_path / "db" / "a", "a", _unit(rng, 300, 16), part_size=70)
    write_source(tmp_path / "db" / "b", "b", _unit(rng, 50, 16), part_size=20)
    db = ImageDB.open(tmp_path / "db")
    queries = _unit(rng, 6, 16)
    exclude = [db.search(queries[:1], k=1)[0][0].key]
    cpu = db.search(queries, k=4, exclude=exclude)
    dev = db.search(queries, k=4, exclude=exclude, device="torch-cpu")
    assert [[(h.key, h.row) for h in q] for q in cpu] == [[(h.key, h.row) for h in q] for q in dev]
    moments = [
        {"episode_id": "e", "moment_id": f"m{i}", "description": "x", "vector": v.tolist()}
        for i, v in enumerate(queries)
    ]
    a = Aligner(db, min_score=-1.0).align(moments)
    b = Aligner(db, min_score=-1.0, device="torch-cpu").align(moments)
    assert [x.key for x in a] == [x.key for x in b]


# ==== ivf on text-like queries ====


def test_text_like_queries_are_as_far_from_the_images_as_clip_text():
    v = _clustered(5000, 512, 40)
    q = text_like_queries(lambda ids: v[ids], len(v), 200, 512, seed=0)
    best = (q @ v.T).max(1)
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    assert 0.2 <= np.median(best) <= 0.4
    # a perturbed image row, by contrast, stays near its row
    assert best.max() < 0.6


def test_ivf_index_reaches_recall_on_text_like_queries_and_maps_rows(tmp_path):
    import faiss

    vectors = _clustered(10000, 64, 64, seed=5)
    write_source(tmp_path / "src", "src", vectors, part_size=1500)
    infos = build_index(tmp_path / "src", kind="ivf", max_index_memory_usage="64MB")
    assert infos["kind"] == "ivf" and infos["codes"] == "SQ8"
    assert infos["recall_at_5_text_like"] >= 0.95 and infos["recall_target_met"]
    saved = json.loads((tmp_path / "src" / "index" / "infos.json").read_text())
    assert saved["nprobe"] == infos["nprobe"] and saved["candidates"] == infos["candidates"]
    # a standard faiss index whose ids are the global rows
    raw = faiss.read_index(str(tmp_path / "src" / "index" / "image.index"))
    assert raw.ntotal == 10000
    index = SourceIndex.open(tmp_path / "src")
    stored = vectors.astype(np.float16)
    queries = text_like_queries(lambda ids: stored[ids].astype(np.float32), 10000, 300, 64, seed=9)
    _s_exact, r_exact = index.search(queries, 5, exact=True)
    s_ivf, r_ivf = index.search(queries, 5)
    assert recall_at(r_exact, r_ivf, 5) >= 0.93  # fresh queries, not the calibration set
    # re-ranked scores are the true inner products of the rows returned
    rows = index.parts.rows(r_ivf.reshape(-1)).reshape(*r_ivf.shape, 64)
    true = np.einsum("qkd,qd->qk", rows, queries)
    np.testing.assert_allclose(s_ivf, true, rtol=1e-5, atol=1e-6)
    # exclusions hold
    ban = [{int(r)} for r in r_ivf[:, 0]]
    _, r_ex = index.search(queries, 5, exclude=ban)
    assert all(int(b.pop()) not in row for b, row in zip(ban, r_ex, strict=True))


def test_ivf_codes_shrink_to_product_quantisation_within_the_memory_budget(tmp_path):
    assert choose_codes(1000, 64, 1 << 20) == "SQ8"
    assert choose_codes(100_000, 768, 16 << 20) == "PQ128"
    assert choose_codes(12_000_000, 768, parse_bytes("1GB")) == "PQ64"
    assert choose_nlist(12_000_000) == 16384 and choose_nlist(50) == 1
    write_source(tmp_path / "src", "src", _clustered(4000, 64, 20, seed=6), part_size=4000)
    with pytest.raises(ValueError, match="too large"):
        build_index(tmp_path / "src", kind="ivf", max_index_memory_usage="10KB")


def test_auto_kind_is_exact_up_to_the_limit_and_ivf_above(tmp_path):
    assert auto_kind(AUTO_EXACT_MAX_ROWS) == "exact"
    assert auto_kind(AUTO_EXACT_MAX_ROWS + 1) == "ivf"
    write_source(tmp_path / "src", "src", _clustered(2000, 32, 10), part_size=1000)
    assert build_index(tmp_path / "src", kind="auto")["kind"] == "exact"
    infos = build_index(tmp_path / "src", kind="auto", auto_exact_max_rows=1000)
    assert infos["kind"] == "ivf" and SourceIndex.open(tmp_path / "src").kind == "ivf"


def test_cli_align_and_search_take_a_device():
    from starkret.cli.commands import build_parser

    parser = build_parser()
    args = parser.parse_args(["align", "db", "d.jsonl", "-o", "out.jsonl", "--device", "cuda:1"])
    assert args.device == "cuda:1"
    assert parser.parse_args(["search", "db", "a dog", "--device", "cuda"]).device == "cuda"
    assert parser.parse_args(["align", "db", "d.jsonl", "-o", "o"]).device == "cpu"


def test_auto_keeps_exact_search_when_the_ivf_would_probe_most_cells(tmp_path):
    # Unclustered rows: text-like queries need most cells for recall@5 >= 0.95, so an
    # ivf would be a slower full scan; auto must keep exact search and say why.
    rng = np.random.default_rng(3)
    write_source(tmp_path / "src", "src", _unit(rng, 4000, 32), part_size=2000)
    infos = build_index(tmp_path / "src", kind="auto", auto_exact_max_rows=1000)
    assert infos["kind"] == "exact" and SourceIndex.open(tmp_path / "src").kind == "exact"
    rejected = infos["auto_ivf_rejected"]
    assert rejected["nprobe"] > 0.25 * rejected["nlist"] or not rejected["recall_target_met"]
    assert not (tmp_path / "src" / "index" / "image.index").exists()
    # kind="ivf" asked for by name is built whatever the calibration found
    assert build_index(tmp_path / "src", kind="ivf")["kind"] == "ivf"
