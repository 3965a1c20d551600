"""The int8 first pass of exact search: results bit-identical to the float32 scan."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import starkret._core as core
from starkret import ImageDB, build_index
from starkret.index.q8 import FIRST_PASS, Q8Copy, q8_folder, topk_q8_parts
from starkret.index.source import SourceIndex
from starkret.index.topk import topk_parts
from starkret.store.layout import part_file
from starkret.testing import write_source

PATHS = ["auto", "scalar"] + (["avx2"] if core.simd_level() in ("avx2+fma", "avx512") else [])


def _copies(parts):
    return [core.q8_quantize(p.view(np.uint16) if p.dtype == np.float16 else p) for p in parts]


def _assert_same(queries, parts, k, exclude=None, paths=PATHS):
    want_s, want_i = topk_parts(queries, parts, k, exclude=exclude, threads=2)
    copies = _copies(parts)
    for path in paths:
        got = topk_q8_parts(queries, parts, copies, k, exclude=exclude, threads=2, first_pass=path)
        np.testing.assert_array_equal(got.ids, want_i, err_msg=path)
        np.testing.assert_array_equal(got.scores.view(np.uint32), want_s.view(np.uint32))
        assert got.reranked.shape == (len(queries),)


def _unit(x):
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0, 1, n)


@st.composite
def hard_cases(draw):
    """Rows built to defeat a loose bound: duplicates, clusters tighter than the int8
    step, zero rows, rows far from unit length, queries equal to rows (near-ties at
    the k-th place), float16 or float32 parts."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    d = draw(st.sampled_from([1, 3, 16, 33, 96]))
    n = draw(st.integers(1, 400))
    base = _unit(rng.standard_normal((max(n // 4, 1), d)).astype(np.float32))
    pick = rng.integers(0, len(base), n)
    rows = base[pick] + rng.choice([0, 1e-5, 1e-3], n)[:, None] * rng.standard_normal((n, d))
    rows[rng.random(n) < 0.05] = 0
    rows *= rng.choice([1.0, 1.0, 0.01, 7.0], n)[:, None]
    rows = rows.astype(np.float32)
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    rows = rows.astype(dtype)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    parts = [np.ascontiguousarray(p) for p in np.split(rows, cuts)]
    q = draw(st.integers(1, 20))
    queries = np.concatenate(
        [rows[rng.integers(0, n, q // 2)].astype(np.float32), rng.standard_normal((q - q // 2, d))]
    ).astype(np.float32)
    k = draw(st.sampled_from([1, 2, 10, n, n + 3]))
    return queries, parts, k, rng


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hard_cases())
def test_int8_first_pass_equals_float32_scan_on_hard_rows(case):
    queries, parts, k, _ = case
    _assert_same(queries, parts, k)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hard_cases())
def test_int8_first_pass_equals_float32_scan_with_exclusions(case):
    queries, parts, k, rng = case
    n = sum(len(p) for p in parts)
    shared = rng.choice(n, min(n, 5), replace=False)
    _assert_same(queries, parts, k, exclude=set(shared.tolist()))
    per_query = [rng.choice(n, rng.integers(0, n + 1), replace=False) for _ in queries]
    _assert_same(queries, parts, k, exclude=per_query)


def test_ties_at_the_kth_place_rank_lower_rows_first():
    rng = np.random.default_rng(3)
    row = _unit(rng.standard_normal((1, 64))).astype(np.float16)
    rows = np.repeat(row, 300, axis=0)  # 300 rows with one score
    rows[::7] = _unit(rng.standard_normal((len(rows[::7]), 64))).astype(np.float16)
    _assert_same(row.astype(np.float32), [rows[:100], rows[100:]], k=10)


def test_a_large_batch_uses_every_tile_shape():
    rng = np.random.default_rng(4)
    rows = _unit(rng.standard_normal((3000, 96))).astype(np.float16)
    queries = _unit(rng.standard_normal((77, 96))).astype(np.float32)
    _assert_same(queries, [rows[:1234], rows[1234:]], k=10)


def test_a_copy_of_another_part_is_refused():
    rows = np.ones((40, 8), np.float16)
    with pytest.raises(ValueError, match="stale or damaged"):
        topk_q8_parts(np.ones((1, 8)), [rows], [_copies([rows[:20]])[0]], k=1)


# ==== build-index and the sources' search ====


def _source(tmp_path, n=900, d=32, part_size=250, seed=0):
    vectors = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    folder = tmp_path / "db" / "cc12m"
    write_source(folder, "cc12m", vectors, part_size=part_size)
    return folder, vectors


def test_build_index_writes_an_int8_copy_per_part(tmp_path):
    folder, _ = _source(tmp_path)
    infos = build_index(folder, kind="exact")
    assert infos["first_pass"] == FIRST_PASS
    assert [p["rows"] for p in infos["q8"]["parts"]] == [250, 250, 250, 150]
    assert infos["q8"]["written"] == 4
    assert 0 < infos["q8"]["bytes_per_million_rows"] < 32 * 2 * 1e6  # below float16
    for i in range(4):
        assert part_file(folder / "index", "q8", i).is_file()
    assert not [p for p in q8_folder(folder).iterdir() if p.suffix != ".npy"]  # no temporaries
    # a second build writes nothing new
    assert build_index(folder, kind="exact")["q8"]["written"] == 0


def test_sources_search_through_the_copy_with_the_float32_results(tmp_path):
    folder, _ = _source(tmp_path)
    build_index(folder, kind="exact")
    index = SourceIndex.open(folder)
    assert index.q8 is not None
    queries = np.random.default_rng(5).standard_normal((12, 32)).astype(np.float32)
    got = index.search(queries, 7, exclude=[[1, 2]] * 12)
    assert index.q8.last_reranked is not None and len(index.q8.last_reranked) == 12
    want = topk_parts(queries, index.parts.arrays, 7, exclude=[[1, 2]] * 12)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0].view(np.uint32), want[0].view(np.uint32))
    db = ImageDB.open(tmp_path / "db")
    plain = topk_parts(queries, index.parts.arrays, 3)[1]
    assert db.search_arrays(queries, k=3).rows.tolist() == plain.tolist()


def test_an_index_built_before_still_searches_and_says_how_to_upgrade(tmp_path, caplog):
    folder, _ = _source(tmp_path)
    infos = build_index(folder, kind="exact")
    # the infos of an index built before the int8 copy existed
    old = {k: v for k, v in infos.items() if k not in ("first_pass", "q8")}
    (folder / "index" / "infos.json").write_text(json.dumps(old))
    for path in q8_folder(folder).iterdir():
        path.unlink()
    with caplog.at_level(logging.INFO, logger="starkret"):
        index = SourceIndex.open(folder)
        SourceIndex.open(folder)
    assert index.q8 is None
    upgrade = [r for r in caplog.records if "starkret build-index" in r.getMessage()]
    assert len(upgrade) == 1  # once per source
    queries = np.eye(32, dtype=np.float32)[:3]
    want = topk_parts(queries, index.parts.arrays, 4)
    np.testing.assert_array_equal(index.search(queries, 4)[1], want[1])
    assert build_index(folder)["first_pass"] == FIRST_PASS
    assert SourceIndex.open(folder).q8 is not None


def test_a_part_changed_after_the_build_is_not_searched_through_a_stale_copy(tmp_path):
    folder, _ = _source(tmp_path)
    build_index(folder, kind="exact")
    path = part_file(folder, "img_emb", 1)
    rows = np.load(path)
    np.save(path, -rows)
    index = SourceIndex.open(folder)
    assert index.q8 is None
    assert (
        Q8Copy.open(
            folder, json.loads((folder / "index" / "infos.json").read_text()), index.parts.arrays
        )
        is None
    )
    infos = build_index(folder, kind="exact")
    assert infos["q8"]["written"] == 1  # only the changed part
    assert SourceIndex.open(folder).q8 is not None


def test_a_failed_write_leaves_no_copy_and_no_temporary(tmp_path, monkeypatch):
    folder, _ = _source(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        build_index(folder, kind="exact")
    assert list(q8_folder(folder).iterdir()) == []


def test_a_part_rewritten_with_the_same_row_count_is_searched_in_float32(tmp_path, caplog):
    folder, _ = _source(tmp_path)
    build_index(folder, kind="exact")
    path = part_file(folder, "img_emb", 1)
    rows = np.load(path)
    n = len(rows)
    # every row changes but the three a part's fingerprint used to sample
    changed = -rows
    changed[[0, n // 2, n - 1]] = rows[[0, n // 2, n - 1]]
    np.save(path, changed)
    with caplog.at_level(logging.INFO, logger="starkret"):
        index = SourceIndex.open(folder)
    assert index.q8 is None
    assert any(
        "part 1 changed" in r.getMessage() and "starkret build-index" in r.getMessage()
        for r in caplog.records
    )
    queries = np.random.default_rng(6).standard_normal((5, 32)).astype(np.float32)
    got = index.search(queries, 6)
    want = topk_parts(queries, index.parts.arrays, 6)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0].view(np.uint32), want[0].view(np.uint32))
    assert build_index(folder, kind="exact")["q8"]["written"] == 1
    assert SourceIndex.open(folder).q8 is not None


def test_a_copy_recorded_with_the_older_part_check_is_not_used(tmp_path, caplog):
    folder, _ = _source(tmp_path)
    infos = build_index(folder, kind="exact")
    for record in infos["q8"]["parts"]:
        del record["bytes"]
    (folder / "index" / "infos.json").write_text(json.dumps(infos))
    with caplog.at_level(logging.INFO, logger="starkret"):
        assert SourceIndex.open(folder).q8 is None
    assert any("older check" in r.getMessage() for r in caplog.records)
    assert build_index(folder, kind="exact")["q8"]["written"] == 4
