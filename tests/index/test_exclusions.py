"""Exclusions shared by every query (a DB's recorded near duplicates) together with
per-query ones (a conversation's shown images): same results as the per-query union,
without a per-query copy of the shared rows, and without millions of extra candidates
asked from faiss."""

from __future__ import annotations

import numpy as np
import pytest

import starkret._core as _core
from starkret.index.db import ImageDB
from starkret.index.duplicates import Duplicates, Record, write_record
from starkret.index.exact import Parts
from starkret.index.ivf import IvfIndex
from starkret.index.q8 import topk_q8_parts
from starkret.index.source import SourceIndex, _faiss_search
from starkret.index.topk import Exclusions, topk_parts
from starkret.testing import write_source

faiss = pytest.importorskip("faiss")

DIM = 16
N = 3500
PART = 1000
Q = 6


def _unit(rng, n, dim=DIM):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(23)
    vectors = _unit(rng, N)
    queries = _unit(rng, Q)
    # as Duplicates.exclusions gives it: one object for every search
    dropped = Exclusions(shared=rng.choice(N, 2500, replace=False))
    # per query: a few rows, some of them also dropped, one query with none
    per_query = [rng.choice(N, int(rng.integers(0, 4)), replace=False) for _ in range(Q)]
    per_query[1] = np.array([], np.int64)
    per_query[2] = np.concatenate([per_query[2], dropped.shared[:2]])
    return vectors, queries, dropped, per_query


def _both(dropped, per_query):
    """What ImageDB searches with: the recorded duplicates unioned with the caller's."""
    return dropped.union(Exclusions.parse(per_query, len(per_query)), Q)


def _old_union(dropped, per_query):
    """The form the union used to take: every query's array holding every dropped row."""
    return Exclusions(per_query=tuple(np.union1d(dropped.shared, e) for e in per_query))


def _assert_same(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def _ivf_flat(vectors, order=None):
    """An IVF index whose search is exact (every cell probed)."""
    index = faiss.index_factory(DIM, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors if order is None else vectors[order])
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", 8)
    return index


class _Spy:
    """Stands in for a faiss index and records how many hits each search asks for."""

    def __init__(self, index):
        self.index, self.asked = index, []

    def search(self, x, k, **kwargs):
        self.asked.append(int(k))
        return self.index.search(x, k, **kwargs)


# ==== the form itself ====


def test_a_large_shared_set_is_not_copied_into_each_query():
    dropped = Exclusions(shared=np.arange(0, 400_000, 2))
    caller = Exclusions.parse([[1, 3], [], [5]] * 40, 120)
    both = dropped.union(caller, 120)
    # the dropped rows stay one shared array (the same one: not re-sorted, not copied)
    assert both.shared is dropped.shared
    assert sum(len(e) for e in both.per_query) == 120
    assert [len(e) for e in both.per_query[:3]] == [2, 0, 1]
    assert both.largest_per_query() == 2
    assert both.core_options()["exclude"] is dropped.shared
    assert len(both.pairs(120, shared=False)[1]) == 120
    # a second union (the next batch) reuses it again
    assert dropped.union(caller, 120).shared is dropped.shared
    # and excludes what the per-query union excluded
    rows = np.array([[0, 1, 2, 3, 4, 5, 7, -1]] * 120)
    extra = [{1, 3}, set(), {5}] * 40
    want = np.array(
        [[r >= 0 and (r % 2 == 0 or r in extra[q]) for r in row] for q, row in enumerate(rows)]
    )
    np.testing.assert_array_equal(both.mask(rows), want)


def test_shared_rows_are_sorted_once_and_read_only():
    shared = Exclusions(shared=np.array([9, 2, 2, 5])).shared
    assert shared.tolist() == [2, 5, 9] and not shared.flags.writeable
    assert Exclusions(shared=shared).shared is shared
    mine = np.array([1, 4, 8])
    copy = Exclusions(shared=mine).shared
    mine[0] = 100  # the caller's array changing later changes nothing
    assert copy.tolist() == [1, 4, 8]
    merged = Exclusions(shared=shared).union(Exclusions(shared=np.array([4, 5])), 2)
    assert merged.shared.tolist() == [2, 4, 5, 9]
    assert Exclusions(shared=merged.shared).shared is merged.shared


def test_duplicates_give_one_cached_exclusions_per_source():
    record = Record(
        info={"format": 1, "sources": [{"name": "aa", "covered": 10}]},
        members_source=np.zeros(4, np.int16),
        members_row=np.array([7, 3, 8, 1]),
        members_group=np.array([0, 0, 1, 1]),
        members_kept=np.array([True, False, True, False]),
        centroids=np.zeros(0),
        assigned=np.zeros(0),
    )
    dups = Duplicates(record, {"aa": 10})
    first = dups.exclusions("aa")
    assert first is dups.exclusions("aa")
    assert first.shared.tolist() == [1, 3] and dups.dropped("aa") is first.shared
    assert dups.exclusions("bb") is None


# ==== every search path: both forms together == the per-query union ====


def test_exact_and_int8_scans_take_both_forms_together(data):
    vectors, queries, dropped, per_query = data
    db = vectors.astype(np.float16)
    both, old = _both(dropped, per_query), _old_union(dropped, per_query)
    k = 1100  # beyond the rows left for some queries: padding compared too
    want = topk_parts(queries, [db], k, exclude=old)
    assert (want[1] == -1).any()
    _assert_same(topk_parts(queries, [db], k, exclude=both), want)
    codes = _core.q8_quantize(db.view(np.uint16))
    for first_pass in ("auto", "scalar", "float32"):
        got = topk_q8_parts(queries, [db], [codes], k, exclude=both, first_pass=first_pass)
        _assert_same((got.scores, got.ids), want)


def test_device_scan_masks_shared_rows_once_for_all_queries(data):
    pytest.importorskip("torch")
    from starkret.index.gpu import DeviceSearcher

    vectors, queries, dropped, per_query = data
    parts = [vectors[:PART].astype(np.float16), vectors[PART:].astype(np.float16)]
    searcher = DeviceSearcher(parts, device="cpu", tile_rows=700, query_chunk=4)
    both = _both(dropped, per_query)
    want = searcher.search(queries, 30, exclude=_old_union(dropped, per_query))
    _assert_same(searcher.search(queries, 30, exclude=both), want)
    uploaded = searcher._shared[1]
    _assert_same(searcher.search(queries, 30, exclude=_both(dropped, per_query)), want)
    assert searcher._shared[1] is uploaded  # the shared set went to the device once
    # only the per-query pairs are tiled per query
    assert len(both.pairs(Q, shared=False)[1]) <= sum(len(e) for e in per_query)


def test_ivf_leaves_shared_rows_out_inside_faiss_and_asks_only_per_query_extra(data):
    vectors, queries, dropped, per_query = data
    parts = Parts([vectors.astype(np.float16)], np.array([0, N]))
    ivf = IvfIndex(_ivf_flat(vectors), parts, {"nprobe": 8, "candidates": 20})
    spy = ivf.index = _Spy(ivf.index)
    both = _both(dropped, per_query)
    got = ivf.search(queries, 10, exclude=both)
    want = topk_parts(queries, [vectors.astype(np.float16)], 10, exclude=both)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    assert (got[1] >= 0).all()
    # 20 candidates + the most rows one query excludes itself, not + 2500 dropped
    assert spy.asked == [20 + max(map(len, per_query))]
    params = ivf.selector.params(both.shared)
    ivf.search(queries, 10, exclude=_both(dropped, per_query))
    assert ivf.selector.params(both.shared) is params  # built once per shared set


def test_an_index_without_selectors_still_filters_everything_after(data):
    from starkret.index.ivf import SharedSelector, rerank

    vectors, queries, dropped, per_query = data
    parts = Parts([vectors.astype(np.float16)], np.array([0, N]))
    refine = faiss.IndexRefineFlat(faiss.IndexFlatIP(DIM))
    refine.add(vectors)
    selector = SharedSelector(refine)
    both = _both(dropped, per_query)
    _, ids = selector.search(refine, queries, 10, both)
    assert not selector.supported and ids.shape[1] == 10 + both.largest()
    got = rerank(parts, queries, ids, 10, both)
    want = topk_parts(queries, [vectors.astype(np.float16)], 10, exclude=both)
    np.testing.assert_array_equal(got[1], want[1])


def test_faiss_index_of_the_stand_in_kind_maps_shared_rows_to_faiss_ids(
    data, tmp_path, monkeypatch
):
    vectors, queries, dropped, per_query = data
    write_source(tmp_path / "aa", "aa", vectors, part_size=PART)
    index = SourceIndex.open(tmp_path / "aa")
    order = [2, 0, 3, 1]  # faiss read the parts in another order
    offsets = index.parts.offsets
    faiss_rows = np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in order])
    index._faiss = _ivf_flat(index.parts.rows(np.arange(N)), faiss_rows)
    index.infos = {**index.infos, "kind": "autofaiss", "faiss_order": order}
    asked = []
    search = type(index._faiss).search
    monkeypatch.setattr(
        type(index._faiss),
        "search",
        lambda self, x, k, **kw: asked.append(int(k)) or search(self, x, k, **kw),
    )
    both, old = _both(dropped, per_query), _old_union(dropped, per_query)
    want = index.search(queries, 10, exclude=old, exact=True)
    got = _faiss_search(index, queries, 10, both)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert asked == [10 + max(map(len, per_query))]


def test_imagedb_leaves_recorded_duplicates_and_per_query_rows_out(data, tmp_path):
    vectors, queries, dropped, per_query = data
    write_source(tmp_path / "db" / "aa", "aa", vectors, part_size=PART)
    kept = np.setdiff1d(np.arange(N), dropped.shared)  # each dropped row in a kept row's group
    write_record(
        tmp_path / "db",
        Record(
            info={"format": 1, "sources": [{"name": "aa", "covered": N}]},
            members_source=np.zeros(N, np.int16),
            members_row=np.concatenate([kept, dropped.shared]),
            members_group=np.concatenate(
                [np.arange(len(kept)), np.arange(len(dropped.shared)) % len(kept)]
            ),
            members_kept=np.arange(N) < len(kept),
            centroids=np.zeros((0, DIM), np.float32),
            assigned=np.zeros(0, np.int32),
        ),
    )
    db = ImageDB.open(tmp_path / "db")
    rows = {"aa": Exclusions.parse(per_query, Q)}
    got = db.search_arrays(queries, 8, exclude_rows=rows)
    want = topk_parts(queries, index_parts(db), 8, exclude=_old_union(dropped, per_query))
    np.testing.assert_array_equal(got.rows, want[1])
    assert db.duplicates.exclusions("aa") is db.duplicates.exclusions("aa")


def index_parts(db):
    return db._sources["aa"].index.parts.arrays
