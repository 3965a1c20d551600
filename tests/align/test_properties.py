"""Property tests (hypothesis): top-k and the aligner's choice against plain references.

Values are small integers (or multiples of 1/4), so every dot product is exact in
float16, float32 and float64 and the references rank exactly as the Rust code must,
ties included. Example counts are bounded so the whole file stays a few seconds.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import starkret
from starkret.testing import reference_select

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def brute_topk(queries, database, k, exclude):
    """Scores in float64, rank by score descending then id ascending, pad with -inf / -1."""
    scores = np.asarray(queries, np.float64) @ np.asarray(database, np.float64).T
    n = scores.shape[1]
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    for i, row in enumerate(scores):
        ids = [j for j in np.lexsort((np.arange(n), -row)) if j not in exclude[i]][:k]
        out_s[i, : len(ids)] = row[ids]
        out_i[i, : len(ids)] = ids
    return out_s, out_i


@st.composite
def searches(draw):
    n = draw(st.integers(0, 40))
    d = draw(st.integers(1, 12))
    q = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    small = st.integers(-4, 4)
    db = np.array(draw(st.lists(small, min_size=n * d, max_size=n * d)), dtype).reshape(n, d)
    queries = np.array(draw(st.lists(small, min_size=q * d, max_size=q * d)), np.float32)
    queries = queries.reshape(q, d)
    k = draw(st.integers(1, n + 5))
    ids = st.integers(-3, n + 3)
    kind = draw(st.sampled_from(["none", "global", "per_query"]))
    if kind == "none":
        exclude, per_query = None, [set()] * q
    elif kind == "global":
        exclude = draw(st.sets(ids, max_size=n + 2))
        per_query = [exclude] * q
    else:
        exclude = [draw(st.sets(ids, max_size=n + 2)) for _ in range(q)]
        per_query = exclude
    return queries, db, k, exclude, per_query


@PROPERTY
@given(searches(), st.sampled_from([1, 2]))
def test_topk_equals_numpy_brute_force(search, threads):
    queries, db, k, exclude, per_query = search
    scores, ids = starkret.topk(queries, db, k, exclude=exclude, threads=threads)
    want_s, want_i = brute_topk(queries, db, k, per_query)
    np.testing.assert_array_equal(ids, want_i)
    np.testing.assert_array_equal(scores, want_s)
    assert scores.dtype == np.float32 and ids.dtype == np.int64


@PROPERTY
@given(searches(), st.lists(st.integers(0, 40), max_size=4), st.integers(1, 50))
def test_merge_of_split_searches_equals_the_whole(search, cuts, k):
    queries, db, _, _, _ = search
    bounds = [0, *sorted(c for c in cuts if c <= len(db)), len(db)]
    parts = []
    for start, stop in itertools.pairwise(bounds):
        scores, ids = starkret.topk(queries, db[start:stop], k)
        parts.append((scores, np.where(ids >= 0, ids + start, -1)))
    merged = starkret.merge_topk(parts, k)
    want_s, want_i = brute_topk(queries, db, k, [set()] * len(queries))
    np.testing.assert_array_equal(merged[1], want_i)
    np.testing.assert_array_equal(merged[0], want_s)


@st.composite
def alignments(draw):
    d = draw(st.integers(1, 6))
    quarter = st.integers(-4, 4).map(lambda v: v / 4)
    moments = []
    for _ in range(draw(st.integers(0, 8))):
        n = draw(st.integers(0, 7))
        vectors = draw(st.lists(quarter, min_size=n * d, max_size=n * d))
        moments.append(
            {
                # small pools of episodes and ids, so repeats and reuse happen
                "episode": draw(st.integers(0, 2)),
                "k": draw(st.integers(0, 3)),
                "ids": np.array(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))),
                "scores": np.array(draw(st.lists(quarter, min_size=n, max_size=n)), np.float32),
                "vectors": np.array(vectors, np.float32).reshape(n, d),
            }
        )
    params = {
        "reuse": draw(st.sampled_from(["episode", "global", "none"])),
        "threshold": draw(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0])),
        "min_score": draw(st.sampled_from([-2.0, -0.5, 0.0, 0.5])),
        "used": draw(st.lists(st.integers(0, 5), max_size=3)),
        # images episodes showed before (a conversation's earlier turns)
        "shown": {
            e: [
                (draw(st.integers(0, 7)), np.array(v, np.float32))
                for v in draw(st.lists(st.lists(quarter, min_size=d, max_size=d), max_size=3))
            ]
            for e in draw(st.sets(st.integers(0, 3), max_size=2))
        },
    }
    return d, moments, params


def rust_select(d, moments, params):
    offsets = np.cumsum([0] + [len(m["ids"]) for m in moments]).astype(np.int64)
    shown = [(e, cid, v) for e, images in params.get("shown", {}).items() for cid, v in images]
    picked, counts, outcomes = starkret._core.select_images(
        np.array([m["episode"] for m in moments], np.uint64),
        np.array([m["k"] for m in moments], np.int64),
        offsets,
        np.concatenate([[], *(m["ids"] for m in moments)]).astype(np.uint64),
        np.concatenate([[], *(m["scores"] for m in moments)]).astype(np.float32),
        np.concatenate([np.zeros((0, d)), *(m["vectors"] for m in moments)]).astype(np.float32),
        reuse=params["reuse"],
        threshold=params["threshold"],
        min_score=params["min_score"],
        used=np.array(params["used"], np.uint64),
        shown_episodes=np.array([e for e, _, _ in shown], np.uint64),
        shown_ids=np.array([cid for _, cid, _ in shown], np.uint64),
        shown_vectors=np.array([v for _, _, v in shown], np.float32).reshape(len(shown), d),
    )
    out, start = [], 0
    for m, count in enumerate(counts):
        mine = [int(p - offsets[m]) for p in picked[start : start + count]]
        out.append((mine, ("ok", "below_threshold", "exhausted")[outcomes[m]]))
        start += count
    return out


@PROPERTY
@given(alignments())
def test_aligner_choice_equals_the_python_reference(case):
    # with images shown before the moments too (what serve's /align passes)
    d, moments, params = case
    assert rust_select(d, moments, params) == reference_select(moments, **params)


@pytest.mark.parametrize(
    ("offsets", "ks", "match"),
    [
        ([-1, 2], [1], "offsets"),  # used to be read as 0
        ([0, 3], [1], "offsets"),
        ([2, 1], [1], "offsets"),
        ([0, 2], [-1], "ks"),  # used to be read as 0
    ],
)
def test_select_images_refuses_offsets_and_ks_that_describe_no_moments(offsets, ks, match):
    with pytest.raises(ValueError, match=match):
        starkret._core.select_images(
            np.zeros(1, np.uint64),
            np.array(ks, np.int64),
            np.array(offsets, np.int64),
            np.arange(2, dtype=np.uint64),
            np.ones(2, np.float32),
            np.eye(2, dtype=np.float32),
            reuse="episode",
            threshold=0.9,
            min_score=0.0,
        )


@pytest.mark.parametrize(
    ("shown", "match"),
    [
        ({"shown_ids": np.zeros(1, np.uint64)}, "together"),
        (
            {
                "shown_episodes": np.zeros(2, np.uint64),
                "shown_ids": np.zeros(1, np.uint64),
                "shown_vectors": np.eye(2, dtype=np.float32)[:1],
            },
            "one row per shown image",
        ),
        (
            {
                "shown_episodes": np.zeros(1, np.uint64),
                "shown_ids": np.zeros(1, np.uint64),
                "shown_vectors": np.ones((1, 3), np.float32),
            },
            "one row per shown image",
        ),
    ],
)
def test_select_images_refuses_shown_images_that_do_not_fit(shown, match):
    with pytest.raises(ValueError, match=match):
        starkret._core.select_images(
            np.zeros(1, np.uint64),
            np.ones(1, np.int64),
            np.array([0, 2], np.int64),
            np.arange(2, dtype=np.uint64),
            np.ones(2, np.float32),
            np.eye(2, dtype=np.float32),
            reuse="episode",
            threshold=0.9,
            min_score=0.0,
            **shown,
        )
