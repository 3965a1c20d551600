"""starkret.topk / merge_topk against a numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest

import starkret


def _integers(shape: tuple[int, int], seed: int, dtype=np.float32) -> np.ndarray:
    # Small integers: every dot product is exact in float32 and float16 holds every
    # value, so the brute force ranks exactly as the kernel must.
    return np.random.default_rng(seed).integers(-8, 8, shape).astype(dtype)


def _brute(queries, database, k, exclude=None):
    """Reference: float64 scores, rank by score descending then id ascending, pad."""
    q = np.asarray(queries, np.float64)
    scores = q @ np.asarray(database, np.float64).T
    n = scores.shape[1]
    out_s = np.full((q.shape[0], k), -np.inf, np.float32)
    out_i = np.full((q.shape[0], k), -1, np.int64)
    for i, row in enumerate(scores):
        skip = exclude[i] if exclude is not None else set()
        ids = [j for j in np.lexsort((np.arange(n), -row)) if j not in skip][:k]
        out_s[i, : len(ids)] = row[ids]
        out_i[i, : len(ids)] = ids
    return out_s, out_i


def _assert_matches(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=0)
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("d", [1, 7, 33, 768])
@pytest.mark.parametrize("q", [1, 5, 17])
def test_matches_numpy_brute_force(dtype, d, q):
    db = _integers((600, d), seed=d, dtype=dtype)
    queries = _integers((q, d), seed=1000 + q)
    _assert_matches(starkret.topk(queries, db, 10), _brute(queries, db, 10))


def test_random_float_data_ranks_like_numpy():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((3000, 96)).astype(np.float16)
    queries = rng.standard_normal((20, 96)).astype(np.float32)
    scores, ids = starkret.topk(queries, db, 5)
    reference = queries @ db.astype(np.float32).T
    np.testing.assert_allclose(scores, np.take_along_axis(reference, ids, 1), rtol=1e-5)
    np.testing.assert_array_equal(ids, np.argsort(-reference, axis=1, kind="stable")[:, :5])


def test_k_one_returns_the_best_row():
    db = _integers((50, 9), seed=1)
    queries = _integers((4, 9), seed=2)
    _assert_matches(starkret.topk(queries, db, 1), _brute(queries, db, 1))


def test_k_beyond_the_rows_pads_with_minus_inf_and_minus_one():
    db = _integers((3, 4), seed=3)
    scores, ids = starkret.topk(_integers((2, 4), seed=4), db, k=5)
    assert scores.shape == ids.shape == (2, 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2]


def test_float16_queries_are_accepted():
    db = _integers((40, 8), seed=5)
    queries = _integers((3, 8), seed=6, dtype=np.float16)
    _assert_matches(starkret.topk(queries, db, 4), _brute(queries, db, 4))


def test_global_exclusion_still_returns_k_results():
    db = _integers((200, 16), seed=7)
    queries = _integers((3, 16), seed=8)
    first = starkret.topk(queries, db, 5)[1]
    banned = set(first[:, :2].ravel().tolist()) | {10_000, -5}
    got = starkret.topk(queries, db, 5, exclude=banned)
    _assert_matches(got, _brute(queries, db, 5, exclude=[banned] * 3))
    assert (got[1] >= 0).all()


def test_per_query_exclusion():
    db = _integers((200, 16), seed=9)
    queries = _integers((3, 16), seed=10)
    first = starkret.topk(queries, db, 3)[1]
    per_query = [set(first[0].tolist()), [], np.array([first[2, 0]])]
    got = starkret.topk(queries, db, 3, exclude=per_query)
    want = _brute(queries, db, 3, exclude=[per_query[0], set(), {int(first[2, 0])}])
    _assert_matches(got, want)


def test_excluding_everything_returns_only_padding():
    db = _integers((30, 4), seed=11)
    queries = _integers((2, 4), seed=12)
    scores, ids = starkret.topk(queries, db, 3, exclude=range(30))
    assert (ids == -1).all() and np.isneginf(scores).all()
    _, ids = starkret.topk(queries, db, 3, exclude=[range(30), {0}])
    assert (ids[0] == -1).all() and (ids[1] >= 1).all()


def test_per_query_exclusion_needs_one_collection_per_query():
    db = _integers((30, 4), seed=13)
    with pytest.raises(ValueError, match="per-query"):
        starkret.topk(_integers((3, 4), seed=14), db, 2, exclude=[{1}, {2}])


def test_ties_rank_lower_ids_first():
    row = _integers((1, 12), seed=15)
    db = np.repeat(row, 1000, axis=0)
    db[500] = -db[500]
    scores, ids = starkret.topk(row, db, 4)
    assert ids.tolist() == [[0, 1, 2, 3]]
    assert len(set(scores[0].tolist())) == 1


def test_empty_database_gives_padding():
    db = np.zeros((0, 8), np.float16)
    scores, ids = starkret.topk(_integers((2, 8), seed=16), db, 3)
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_empty_query_batch():
    scores, ids = starkret.topk(np.zeros((0, 8), np.float32), _integers((5, 8), seed=17), 3)
    assert scores.shape == ids.shape == (0, 3)


def test_memory_mapped_and_path_databases(tmp_path):
    db = _integers((500, 40), seed=18, dtype=np.float16)
    path = tmp_path / "img_emb_0.npy"
    np.save(path, db)
    queries = _integers((6, 40), seed=19)
    want = _brute(queries, db, 7)
    _assert_matches(starkret.topk(queries, np.load(path, mmap_mode="r"), 7), want)
    _assert_matches(starkret.topk(queries, path, 7), want)
    _assert_matches(starkret.topk(queries, str(path), 7), want)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_one_thread_and_two_threads_agree_exactly(dtype):
    rng = np.random.default_rng(20)
    db = rng.standard_normal((20_000, 65)).astype(dtype)
    db[7000:7100] = db[3]  # ties across thread shares
    queries = rng.standard_normal((9, 65)).astype(np.float32)
    queries[0] = db[3]
    one = starkret.topk(queries, db, 50, threads=1)
    two = starkret.topk(queries, db, 50, threads=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


def test_merge_of_parts_equals_the_whole_search():
    rng = np.random.default_rng(21)
    db = rng.standard_normal((5000, 24)).astype(np.float16)
    db[4000:4050] = db[10]
    queries = rng.standard_normal((7, 24)).astype(np.float32)
    queries[0] = db[10]
    whole = starkret.topk(queries, db, 20)
    parts = []
    for start in (0, 1234, 3999):
        stop = {0: 1234, 1234: 3999, 3999: 5000}[start]
        scores, ids = starkret.topk(queries, db[start:stop], 20)
        parts.append((scores, np.where(ids >= 0, ids + start, -1)))
    merged = starkret.merge_topk(parts, 20)
    np.testing.assert_array_equal(merged[0], whole[0])
    np.testing.assert_array_equal(merged[1], whole[1])


def test_merge_drops_padding_and_pads_short_results():
    a = (np.array([[0.5, -np.inf]], np.float32), np.array([[3, -1]]))
    b = (np.array([[0.5]], np.float32), np.array([[1]]))
    scores, ids = starkret.merge_topk([a, b], 4)
    assert ids.tolist() == [[1, 3, -1, -1]]
    assert scores[0, :2].tolist() == [0.5, 0.5] and np.isneginf(scores[0, 2:]).all()


def test_merge_rejects_mismatched_parts():
    a = (np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="numbers of queries"):
        starkret.merge_topk([a, (np.zeros((1, 3), np.float32), np.zeros((1, 3), np.int64))], 2)
    with pytest.raises(ValueError, match="equal shape"):
        starkret.merge_topk([(np.zeros((2, 3), np.float32), np.zeros((2, 2), np.int64))], 2)
    with pytest.raises(ValueError, match="at least 1"):
        starkret.merge_topk([a], 0)


def test_wrong_dimension_is_a_value_error():
    with pytest.raises(ValueError, match="dimension 5 but the database rows have 4"):
        starkret.topk(np.zeros((1, 5), np.float32), np.zeros((3, 4), np.float32), 1)


def test_one_dimensional_inputs_are_value_errors():
    with pytest.raises(ValueError, match="database must be 2-D"):
        starkret.topk(np.zeros((1, 4), np.float32), np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="queries must be 2-D"):
        starkret.topk(np.zeros(4, np.float32), np.zeros((3, 4), np.float32), 1)


def test_non_contiguous_database_is_refused_not_copied():
    db = np.zeros((8, 6), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        starkret.topk(np.zeros((1, 3), np.float32), db[:, ::2], 1)
    with pytest.raises(ValueError, match="C-contiguous"):
        starkret.topk(np.zeros((1, 6), np.float32), np.asfortranarray(db), 1)


def test_non_contiguous_queries_are_made_contiguous():
    db = _integers((40, 5), seed=22)
    wide = _integers((3, 10), seed=23)
    _assert_matches(starkret.topk(wide[:, ::2], db, 3), _brute(wide[:, ::2], db, 3))


@pytest.mark.parametrize("k", [0, -1])
def test_k_below_one_is_a_value_error(k):
    with pytest.raises(ValueError, match="k must be at least 1"):
        starkret.topk(np.zeros((1, 4), np.float32), np.zeros((3, 4), np.float32), k)


def test_bad_dtypes_are_type_errors():
    queries = np.zeros((1, 4), np.float32)
    with pytest.raises(TypeError, match="float16 or float32, got float64"):
        starkret.topk(queries, np.zeros((3, 4)), 1)
    with pytest.raises(TypeError, match="float16 or float32, got int32"):
        starkret.topk(queries, np.zeros((3, 4), np.int32), 1)
    with pytest.raises(TypeError, match="queries must be floating point"):
        starkret.topk(np.zeros((1, 4), np.int64), np.zeros((3, 4), np.float32), 1)
    with pytest.raises(TypeError, match="numpy array or the path"):
        starkret.topk(queries, [[0.0] * 4], 1)
    with pytest.raises(TypeError, match="integer row ids"):
        starkret.topk(queries, np.zeros((3, 4), np.float32), 1, exclude=[0.5])


def test_k_too_large_to_allocate_is_a_value_error():
    with pytest.raises(ValueError, match="do not fit in memory"):
        starkret.topk(np.zeros((4, 4), np.float32), np.zeros((3, 4), np.float32), 2**62)


# ==== Exclusions: the one form searches take ====


def test_exclusions_parse_every_form_once_and_keep_an_exclusions_as_it_is():
    from starkret.index.topk import Exclusions

    shared = Exclusions.parse({5, 2}, 3)
    assert shared.per_query is None and shared.shared.tolist() == [2, 5]
    assert Exclusions.parse(shared, 3) is shared
    per_query = Exclusions.parse(np.array([[1, 2], [3, 4]]), 2)
    assert [e.tolist() for e in per_query.per_query] == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="2 per-query collections for 3 queries"):
        Exclusions.parse(per_query, 3)
    with pytest.raises(TypeError, match="mixes"):
        Exclusions.parse([1, {2}], 2)


def test_exclusion_mask_and_pairs_agree_with_a_set_per_query():
    from starkret.index.topk import Exclusions

    rng = np.random.default_rng(3)
    rows = rng.integers(-1, 50, size=(6, 9))
    lists = [rng.integers(0, 60, int(rng.integers(0, 8))) for _ in range(6)]
    for exclude in (Exclusions.parse(lists, 6), Exclusions.parse(lists[1], 6)):
        sets = [set(exclude.of_query(q).tolist()) for q in range(6)]
        want = np.array([[r >= 0 and r in sets[q] for r in row] for q, row in enumerate(rows)])
        np.testing.assert_array_equal(exclude.mask(rows) & (rows >= 0), want)
        queries, banned = exclude.pairs(6)
        assert np.all(np.diff(banned) >= 0)
        assert set(zip(queries.tolist(), banned.tolist(), strict=True)) == {
            (q, r) for q in range(6) for r in sets[q]
        }
    assert Exclusions.parse([], 6).pairs(6) is None


def test_key_exclusions_become_the_rows_of_every_source():
    from starkret.index.topk import Exclusions

    lookups = {
        "a": lambda keys: {k: np.array([i, i + 10]) for i, k in enumerate(keys) if k != "z"},
        "b": lambda keys: {},
    }
    shared = Exclusions.of_keys(["x", "z"], 2, lookups)
    assert shared["a"].shared.tolist() == [0, 10] and len(shared["b"].shared) == 0
    per_query = Exclusions.of_keys([["x"], []], 2, lookups)
    assert [e.tolist() for e in per_query["a"].per_query] == [[0, 10], []]
    union = per_query["a"].union(Exclusions(shared=np.array([3])), 2)
    # the shared row stays shared (never copied into each query's array)
    assert [union.of_query(q).tolist() for q in range(2)] == [[0, 3, 10], [3]]
    assert union.shared.tolist() == [3]
    assert [e.tolist() for e in union.per_query] == [[0, 10], []]
