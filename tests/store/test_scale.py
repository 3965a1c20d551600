"""Retrieval at scale: one search over all parts, metadata and key lookups on disk, the
aligner on arrays. Checked against numpy brute force, a dict and the Python reference."""

from __future__ import annotations

import json
import logging
import tracemalloc

import numpy as np
import pytest

import starkret
import starkret.align.aligner
import starkret.store.metadata
from starkret import Aligner, ImageDB, build_index
from starkret.index.source import SourceIndex
from starkret.testing import reference_select, write_source

DIM = 16


def _unit(rng, n, dim=DIM):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _integers(shape, seed, dtype=np.float32):
    return np.random.default_rng(seed).integers(-8, 8, shape).astype(dtype)


def _brute(queries, db, k, exclude=None):
    """Top-k by (score desc, row asc) with exact integer arithmetic."""
    scores = queries.astype(np.float64) @ db.astype(np.float64).T
    if exclude is not None:
        for q, rows in enumerate(exclude):
            scores[q, list(rows)] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), scores.shape), -scores), axis=-1)
    ids = order[:, :k]
    return np.where(np.isfinite(np.take_along_axis(scores, ids, 1)), ids, -1)


# ==== One search over every part ====


def test_one_search_over_parts_equals_numpy_brute_force_on_the_concatenation():
    sizes = [130, 0, 7, 300, 64]
    parts = [_integers((n, DIM), seed=i) for i, n in enumerate(sizes)]
    parts[1] = parts[1].astype(np.float16)  # mixed dtypes, an empty part
    parts[3] = parts[3].astype(np.float16)  # integers in [-8, 8) are exact in float16
    whole = np.concatenate([p.astype(np.float32) for p in parts])
    queries = _integers((9, DIM), seed=99)
    for threads in (1, 2):
        _, ids = starkret.topk_parts(queries, parts, 6, threads=threads)
        np.testing.assert_array_equal(ids, _brute(queries, whole, 6))
    # exclusions are global rows: some cross part boundaries
    banned = {0, 129, 137, 138, 436, 500}
    _, ids = starkret.topk_parts(queries, parts, 6, exclude=banned)
    np.testing.assert_array_equal(ids, _brute(queries, whole, 6, [banned] * 9))
    per_query = [set(range(q * 40, q * 40 + 60)) for q in range(9)]
    _, ids = starkret.topk_parts(queries, parts, 6, exclude=per_query)
    np.testing.assert_array_equal(ids, _brute(queries, whole, 6, per_query))


def test_source_search_is_one_call_over_all_parts(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    vectors = _unit(rng, 500)
    write_source(tmp_path / "s", "s", vectors, part_size=37)
    index = SourceIndex.open(tmp_path / "s")
    calls = []
    real = starkret._core.topk_search_parts
    monkeypatch.setattr(
        starkret._core,
        "topk_search_parts",
        lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw),
    )
    queries = _unit(rng, 4)
    _, rows = index.search(queries, 5)
    assert calls == [14]  # 500 rows in parts of 37: 14 parts, one call
    stored = vectors.astype(np.float16).astype(np.float32)
    exact = queries @ stored.T
    np.testing.assert_array_equal(rows, np.argsort(-exact, axis=1, kind="stable")[:, :5])


def test_every_search_entry_point_reads_exclusions_the_same_way():
    db = _integers((50, DIM), seed=3)
    queries = _integers((2, DIM), seed=4)
    forms = [{1, 2}, [1, 2], (1, 2), np.array([1, 2]), [[1, 2], {1, 2}], np.array([[1, 2], [2, 1]])]
    want = _brute(queries, db, 4, [{1, 2}, {1, 2}])
    for form in forms:
        np.testing.assert_array_equal(starkret.topk(queries, db, 4, exclude=form)[1], want)
    with pytest.raises(TypeError, match="mixes"):
        starkret.topk(queries, db, 4, exclude=[1, {2}])
    with pytest.raises(ValueError, match="per-query"):
        starkret.topk(queries, db, 4, exclude=[{1}, {2}, {3}])


# ==== Metadata and key lookups on disk ====


def _keyed_source(tmp_path, n=300, part_size=70):
    rng = np.random.default_rng(5)
    keys = [f"{i:05d}" for i in range(n)]
    urls: list[str | None] = [f"https://img.example/{i % 250}.jpg" for i in range(n)]  # repeats
    urls[3] = None
    urls[4] = ""
    write_source(
        tmp_path / "db" / "src",
        "src",
        _unit(rng, n),
        keys=keys,
        urls=urls,
        captions=[f"caption {i}" for i in range(n)],
        part_size=part_size,
    )
    return tmp_path / "db", keys, urls


def _dict_lookup(keys, urls):
    table = {f"src/{k}": i for i, k in reversed(list(enumerate(keys)))}  # first row wins
    for i, url in enumerate(urls):
        if url:
            table.setdefault(f"url:{url}", i)
    return table


@pytest.mark.parametrize("built", [True, False])
def test_key_lookups_equal_a_dict(tmp_path, caplog, monkeypatch, built):
    import starkret.store.metadata

    monkeypatch.setattr(starkret.store.metadata, "WARN_UNINDEXED_ROWS", 0)
    root, keys, urls = _keyed_source(tmp_path)
    if built:
        build_index(root / "src")
    with caplog.at_level(logging.WARNING, logger="starkret"):
        db = ImageDB.open(root)
        table = _dict_lookup(keys, urls)
        wanted = [*table, "src/99999", "url:https://img.example/none.jpg", "url:", "url:None", ""]
        for key in wanted:
            assert db.locate(key) == (("src", table[key]) if key in table else None), key
    warned = "build-index" in caplog.text
    assert warned != built
    hits = db.search(_unit(np.random.default_rng(6), 3), k=4)
    for per_query in hits:
        for h in per_query:
            assert h.key == f"src/{keys[h.row]}" and h.url == urls[h.row]
            assert h.caption == f"caption {h.row}" and h.id == ((h.row // 70) << 32) | (h.row % 70)


def test_a_hash_collision_never_returns_a_wrong_row(tmp_path, monkeypatch):
    import starkret.store.keyindex as keyindex

    root, keys, urls = _keyed_source(tmp_path, n=120)

    class Colliding:
        """Every key hashes to the same value: each lookup sees every row as a candidate."""

        @staticmethod
        def key_hashes(keys, prefix=""):
            return np.zeros(len(keys), np.uint64)

        @staticmethod
        def string_hashes(offsets, data, prefix=""):
            return np.zeros(len(offsets) - 1, np.uint64)

    monkeypatch.setattr(keyindex, "_core", Colliding)
    build_index(root / "src")
    db = ImageDB.open(root)
    table = _dict_lookup(keys, urls)
    for key in [*list(table)[::7], "src/nope", "url:https://img.example/nope.jpg"]:
        assert db.locate(key) == (("src", table[key]) if key in table else None), key


def test_opening_a_large_db_loads_no_metadata(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    n = 200_000
    rng = np.random.default_rng(7)
    write_source(tmp_path / "db" / "big", "big", _unit(rng, n, 4), part_size=50_000)
    write_source(tmp_path / "db" / "old", "old", _unit(rng, 1000, 4), part_size=300)
    build_index(tmp_path / "db" / "big")  # "old" keeps the layout of older versions

    def refuse(*args, **kwargs):
        raise AssertionError("metadata read while opening")

    with monkeypatch.context() as m:
        m.setattr(pq, "read_table", refuse)
        m.setattr(pq, "ParquetFile", refuse)
        tracemalloc.start()
        db = ImageDB.open(tmp_path / "db")
        assert db.locate("big/000123456") == ("big", 123456)
        assert db.locate("url:https://img.example/big/000199999.jpg") == ("big", 199999)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # a key list alone would be ~15 MB of str objects; the key index is memory-mapped
    assert peak < 2_000_000, peak
    hits = db.search(_unit(rng, 1, 4), k=2, exclude=["big/000000001"])
    assert len(hits[0]) == 4 and all(h.key != "big/000000001" for h in hits[0])
    assert db.locate("old/000000999") == ("old", 999)


def test_index_files_of_another_row_count_are_not_used(tmp_path, caplog, monkeypatch):
    import starkret.store.metadata

    monkeypatch.setattr(starkret.store.metadata, "WARN_UNINDEXED_ROWS", 0)
    rng = np.random.default_rng(8)
    write_source(tmp_path / "db" / "s", "s", _unit(rng, 50), part_size=20)
    build_index(tmp_path / "db" / "s")
    # re-embedded with more rows after build-index: the index files are stale
    write_source(tmp_path / "db" / "s", "s", _unit(rng, 80), part_size=20)
    with caplog.at_level(logging.WARNING, logger="starkret"):
        db = ImageDB.open(tmp_path / "db")
        assert db.locate("s/000000079") == ("s", 79)
    assert "build-index" in caplog.text
    infos = json.loads((tmp_path / "db" / "s" / "index" / "infos.json").read_text())
    assert infos["metadata_rows"] == infos["key_index_rows"] == 50


# ==== The aligner on arrays ====


def _reference_alignments(db_vectors, moments, queries, *, k_per_source, min_score, reuse):
    """Brute force: every row of every source ranked, then the reference choice."""
    names = sorted(db_vectors)
    ranked = []
    for q in queries:
        cands = []
        for s, name in enumerate(names):
            # scores of the Rust kernel (numpy sums in another order: near-ties could flip)
            stored = db_vectors[name].astype(np.float16)
            scores, rows = starkret.topk(q[None, :], stored, len(stored))
            cands += [
                (-float(sc), name, int(r), s) for sc, r in zip(scores[0], rows[0], strict=True)
            ]
        ranked.append(sorted(cands))
    episodes = {m["episode_id"]: None for m in moments}
    ep_number = {e: i for i, e in enumerate(episodes)}
    order = sorted(range(len(moments)), key=lambda i: ep_number[moments[i]["episode_id"]])
    spec = []
    for i in order:
        cands = ranked[i]
        spec.append(
            {
                "episode": ep_number[moments[i]["episode_id"]],
                "k": moments[i].get("k", 1),
                "ids": [(s << 40) | row for _, _, row, s in cands],
                "scores": [-c[0] for c in cands],
                "vectors": [
                    db_vectors[name][row].astype(np.float16).astype(np.float32)
                    for _, name, row, _ in cands
                ],
            }
        )
    chosen = reference_select(spec, reuse=reuse, threshold=0.94, min_score=min_score)
    out = [None] * len(moments)
    for i, (picked, outcome) in zip(order, chosen, strict=True):
        keys = [f"{ranked[i][p][1]}/{ranked[i][p][2]:09d}" for p in picked]
        shown = {
            name: [f"{name}/{c[2]:09d}" for c in ranked[i] if c[1] == name][:k_per_source]
            for name in names
        }
        out[i] = (keys, outcome, shown)
    return out


@pytest.mark.parametrize(("reuse", "prefix"), [("episode", 8), ("global", 1), ("none", 2)])
def test_aligner_end_to_end_equals_the_python_reference(tmp_path, monkeypatch, reuse, prefix):
    import starkret.align.choice

    # the choice reads vectors for a prefix of each list first: short prefixes must
    # grow until the choice is the one over the full lists
    monkeypatch.setattr(starkret.align.choice, "SELECT_PREFIX", prefix)
    rng = np.random.default_rng(9)
    topics = _unit(rng, 6)
    vectors = {}
    for name, n in (("cc12m", 90), ("ai2d", 40)):
        near = topics[rng.integers(0, 6, n)] + 0.35 * _unit(rng, n)
        vectors[name] = near / np.linalg.norm(near, axis=1, keepdims=True)
        vectors[name][5] = vectors[name][4]  # byte-identical duplicates across rows
        write_source(tmp_path / "db" / name, name, vectors[name], part_size=25)
    moments, queries = [], []
    for e in range(7):
        for j in range(int(rng.integers(1, 6))):
            # most moments are about a topic; some about nothing in the DB
            q = topics[int(rng.integers(0, 6))] + 0.3 * _unit(rng, 1)[0]
            if rng.random() < 0.25:
                q = _unit(rng, 1)[0]
            queries.append(q / np.linalg.norm(q))
            k = int(rng.integers(1, 3))
            moments.append({"episode_id": f"e{e}", "moment_id": f"{e}-{j}", "vector": q, "k": k})
    db = ImageDB.open(tmp_path / "db")
    # several chunks; every row fetched, so the reference may rank every row too
    aligner = Aligner(
        db, k_per_source=3, min_score=0.82, reuse=reuse, overfetch=30, chunk_moments=4
    )
    got = aligner.align(moments)
    want = _reference_alignments(
        vectors,
        moments,
        np.array(queries, np.float32),
        k_per_source=3,
        min_score=0.82,
        reuse=reuse,
    )
    assert any(w[1] != "ok" for w in want) and any(w[1] == "ok" for w in want)
    for a, (keys, outcome, shown) in zip(got, want, strict=True):
        assert [c.key for c in a.images] == keys
        assert a.status == outcome
        assert {s: [c.key for c in cands] for s, cands in a.candidates.items()} == shown
