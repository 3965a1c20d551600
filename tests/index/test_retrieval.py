"""build_index, ImageDB and Aligner against brute force and the Python reference."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import starkret
from starkret import Aligner, ImageDB, build_index
from starkret._io import temp_target
from starkret.index.gpu import device_search
from starkret.index.source import SourceIndex
from starkret.index.topk import Exclusions
from starkret.testing import reference_select, write_source

DIM = 32


def _unit(rng, n, dim=DIM):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def db_dir(tmp_path):
    rng = np.random.default_rng(0)
    vectors = {"cc12m": _unit(rng, 700), "chartqa": _unit(rng, 90)}
    write_source(tmp_path / "db" / "cc12m", "cc12m", vectors["cc12m"], part_size=250)
    write_source(tmp_path / "db" / "chartqa", "chartqa", vectors["chartqa"], part_size=40)
    return tmp_path / "db", vectors


def _brute(vectors, queries, k):
    stored = vectors.astype(np.float16).astype(np.float32)
    scores = queries @ stored.T
    order = np.lexsort((np.arange(len(stored))[None, :].repeat(len(queries), 0), -scores))
    return np.take_along_axis(scores, order, 1)[:, :k], order[:, :k]


# ==== ImageDB ====


def test_search_returns_top_k_of_every_source_like_brute_force(db_dir):
    root, vectors = db_dir
    db = ImageDB.open(root)
    assert db.sources == ["cc12m", "chartqa"] and len(db) == 790
    queries = _unit(np.random.default_rng(1), 6)
    hits = db.search(queries, k=5)
    for q, per_query in enumerate(hits):
        assert len(per_query) == 10
        scores = [h.score for h in per_query]
        assert scores == sorted(scores, reverse=True)
        for source in ("cc12m", "chartqa"):
            mine = [h for h in per_query if h.source == source]
            ref_scores, ref_rows = _brute(vectors[source], queries[q : q + 1], 5)
            assert [h.row for h in mine] == ref_rows[0].tolist()
            np.testing.assert_allclose([h.score for h in mine], ref_scores[0], rtol=1e-5, atol=1e-6)
            assert all(h.key == f"{source}/{h.row:09d}" for h in mine)
            assert all(h.url.endswith(f"{h.row:09d}.jpg") for h in mine)


def test_exclusions_by_key_and_source_filter(db_dir):
    root, vectors = db_dir
    db = ImageDB.open(root)
    query = vectors["cc12m"][[17]]
    top = db.search(query, k=3, sources=["cc12m"])[0]
    assert top[0].row == 17 and {h.source for h in top} == {"cc12m"}
    again = db.search(query, k=3, sources=["cc12m"], exclude=[top[0].key])[0]
    assert again[0].row != 17 and [h.row for h in again[:2]] == [h.row for h in top[1:3]]
    per_query = db.search(
        np.vstack([query, query]), k=1, sources=["cc12m"], exclude=[[top[0].key], []]
    )
    assert per_query[0][0].row != 17 and per_query[1][0].row == 17


def test_string_queries_use_the_db_models_text_tower(tmp_path):
    emb = starkret.ClipEmbedder("starkret-tiny", device="cpu")
    rng = np.random.default_rng(2)
    write_source(tmp_path / "db" / "ai2d", "ai2d", _unit(rng, 50, emb.dim))
    db = ImageDB.open(tmp_path / "db")
    hits = db.search(["a diagram of the water cycle"], k=3)
    vector = emb.encode_texts(["a diagram of the water cycle"], dtype="float32")
    assert [h.row for h in hits[0]] == [h.row for h in db.search(vector, k=3)[0]]


def test_refusals(db_dir, tmp_path):
    root, _ = db_dir
    db = ImageDB.open(root)
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        db.search(np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="unknown source"):
        db.search(np.ones((1, DIM), np.float32), sources=["laion"])
    with pytest.raises(ValueError, match="k must be"):
        db.search(np.ones((1, DIM), np.float32), k=0)
    write_source(
        root / "other",
        "other",
        _unit(np.random.default_rng(3), 10),
        pretrained="/ckpt/finetuned.pt",
    )
    with pytest.raises(ValueError, match="pretrained"):
        ImageDB.open(root)
    with pytest.raises(FileNotFoundError):
        ImageDB.open(tmp_path / "empty")


def test_torch_exact_path_equals_the_rust_scan(db_dir):
    root, _ = db_dir
    index = SourceIndex.open(root / "cc12m")
    queries = _unit(np.random.default_rng(4), 5)
    s1, r1 = index.search(queries, 7)
    s2, r2 = device_search(
        queries,
        index.parts.arrays,
        7,
        device="cpu",
        tile_rows=100,
        exclude=[{3}, set(), set(), set(), {int(r1[4, 0])}],
    )
    assert r2[4, 0] != r1[4, 0]
    np.testing.assert_array_equal(r1[:4], r2[:4])
    np.testing.assert_allclose(s1[:4], s2[:4], rtol=1e-5, atol=1e-6)


# ==== Indices ====


def test_exact_index_infos(db_dir):
    root, _ = db_dir
    infos = build_index(root / "chartqa", kind="auto")
    assert infos["kind"] == "exact" and infos["count"] == 90
    assert json.loads((root / "chartqa" / "index" / "infos.json").read_text()) == infos


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fds through /proc")
def test_every_file_build_index_writes_is_fsynced_then_renamed_into_place(db_dir, monkeypatch):
    root, _ = db_dir
    fsynced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        fsynced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        replaced.append(Path(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    build_index(root / "chartqa", kind="ivf")
    index_dir = root / "chartqa" / "index"
    written = sorted(p.name for p in index_dir.iterdir())
    assert {"infos.json", "metadata.arrow", "image.index"} <= set(written)
    assert sorted(p.name for p in replaced) == written
    assert sorted(temp_target(p.name) for p in fsynced if p.parent == index_dir) == written
    assert fsynced.count(index_dir) >= len(written)  # the folder, after each rename
    assert not [p for p in root.rglob(".*") if temp_target(p.name)]


def _fake_af(monkeypatch, build) -> None:
    """``autofaiss.build_index`` replaced by ``build(embeddings, index_path)``."""
    import types

    def build_index(*, embeddings, index_path, **_):
        build(embeddings, index_path)
        return None, {"fake": True}

    monkeypatch.setitem(sys.modules, "autofaiss", types.SimpleNamespace(build_index=build_index))


def test_a_knn_index_appears_under_its_name_only_when_complete(db_dir, monkeypatch):
    faiss = pytest.importorskip("faiss")
    root, vectors = db_dir
    index_dir = root / "chartqa" / "index"

    def flat(embeddings, index_path):
        index = faiss.IndexFlatIP(DIM)
        index.add(vectors["chartqa"].astype(np.float16).astype(np.float32))
        faiss.write_index(index, index_path)
        assert not (index_dir / "knn.index").exists()  # not under its name while written

    _fake_af(monkeypatch, flat)
    infos = build_index(root / "chartqa", kind="autofaiss", recall_queries=20)
    assert infos["kind"] == "autofaiss" and infos["recall_at_10"] == 1.0
    assert (index_dir / "knn.index").is_file()

    _fake_af(monkeypatch, lambda embeddings, index_path: None)  # out of memory
    with pytest.raises(RuntimeError, match="autofaiss built no index"):
        # rebuild: the source has not changed, so a plain build-index has nothing to do
        build_index(root / "chartqa", kind="autofaiss", recall_queries=20, rebuild=True)
    assert (index_dir / "knn.index").is_file()  # the previous one stays
    assert not [p for p in index_dir.iterdir() if temp_target(p.name)]


def test_autofaiss_index_maps_rows_and_reports_recall(tmp_path):
    rng = np.random.default_rng(5)
    # 13 parts: file names sort differently as text (img_emb_10 < img_emb_2) and as numbers
    vectors = _unit(rng, 3000, 48)
    write_source(tmp_path / "src", "redcaps12m", vectors, part_size=240)
    infos = build_index(tmp_path / "src", kind="autofaiss", max_index_memory_usage="100MB")
    assert infos["kind"] == "autofaiss" and 0.9 <= infos["recall_at_10"] <= 1.0
    index = SourceIndex.open(tmp_path / "src")
    probe = rng.integers(0, 3000, 50)
    _, rows = index.search(vectors[probe], 1)
    assert (rows[:, 0] == probe).mean() >= 0.95
    _, rows = index.search(vectors[probe[:2]], 3, exclude={int(probe[0])})
    assert int(probe[0]) not in rows[0].tolist()


def test_build_index_refuses_unfinished_sources(tmp_path):
    write_source(tmp_path / "src", "x", _unit(np.random.default_rng(6), 5))
    manifest = json.loads((tmp_path / "src" / "starkret.json").read_text())
    (tmp_path / "src" / "starkret.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="not completely embedded"):
        build_index(tmp_path / "src")
    with pytest.raises(ValueError, match="kind"):
        build_index(tmp_path / "src", kind="hnsw")


# ==== Aligner ====


def _planted_db(tmp_path):
    """Images 0-5 are distinct; 6 is a near duplicate of 0 (cos ~0.99)."""
    basis = np.eye(DIM, dtype=np.float32)[:6]
    near = 0.99 * basis[0] + 0.14 * np.eye(DIM, dtype=np.float32)[20]
    vectors = np.vstack([basis, near[None, :]])
    write_source(tmp_path / "db" / "cc12m", "cc12m", vectors)
    return ImageDB.open(tmp_path / "db"), vectors


def _query(weights):
    q = np.zeros(DIM, np.float32)
    for axis, w in weights.items():
        q[axis] = w
    return q / np.linalg.norm(q)


def test_aligner_reuse_near_duplicates_threshold_and_status(tmp_path):
    db, _ = _planted_db(tmp_path)
    q = _query({0: 1.0, 1: 0.5, 2: 0.3})
    moments = [{"episode_id": "e1", "moment_id": f"e1-{i}", "vector": q} for i in range(4)]
    moments.append({"episode_id": "e2", "moment_id": "e2-0", "vector": q})
    got = Aligner(db, k_per_source=3, min_score=0.2).align(moments)
    # 0 first; 6 is a near duplicate of 0 (already shared in e1) so 1 comes next, then 2;
    # the fourth moment finds only weak candidates: below threshold
    assert [a.key for a in got] == [
        "cc12m/000000000",
        "cc12m/000000001",
        "cc12m/000000002",
        None,
        "cc12m/000000000",
    ]
    assert [a.status for a in got] == ["ok", "ok", "ok", "below_threshold", "ok"]
    assert len(got[0].candidates["cc12m"]) == 3
    glob = Aligner(db, min_score=0.2, reuse="global").align(moments)
    # every strong image was used by e1: e2 may not take any of them again
    assert (glob[4].key, glob[4].status) == (None, "below_threshold")
    free = Aligner(db, min_score=0.2, reuse="none").align(moments[:2])
    assert free[0].key == free[1].key == "cc12m/000000000"


def test_aligner_exhaustion_refetches_and_multi_image_moments(tmp_path):
    db, _ = _planted_db(tmp_path)
    q = _query({0: 1.0, 1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6, 5: 0.5})
    aligner = Aligner(db, k_per_source=1, overfetch=1, min_score=-1.0)
    moments = [{"episode_id": "e", "moment_id": str(i), "vector": q} for i in range(6)]
    got = aligner.align(moments)
    # one candidate fetched at first: later moments must fetch more to find unused ones
    assert [a.status for a in got] == ["ok"] * 6
    assert len({a.key for a in got}) == 6
    more = aligner.align([*moments, {"episode_id": "e", "moment_id": "x", "vector": q}])
    assert more[-1].status == "exhausted" and more[-1].images == []
    multi = Aligner(db, min_score=0.0).align(
        [{"episode_id": "m", "moment_id": "m1", "vector": q, "k": 3}]
    )
    assert multi[0].status == "ok" and len(multi[0].images) == 3
    assert len({c.key for c in multi[0].images}) == 3


def test_aligner_matches_the_python_reference_on_random_data():
    rng = np.random.default_rng(7)
    moments = []
    for episode in range(12):
        for _ in range(rng.integers(1, 6)):
            n = int(rng.integers(0, 12))
            ids = rng.choice(40, n, replace=False).astype(np.uint64)
            base = _unit(rng, 40)
            vectors = base[ids.astype(int)].copy()
            # plant near duplicates: some candidates copy an earlier one, nudged
            for i in range(1, n):
                if rng.random() < 0.3:
                    j = int(rng.integers(0, i))
                    nudged = vectors[j] + 0.05 * _unit(rng, 1)[0]
                    vectors[i] = nudged / np.linalg.norm(nudged)
            scores = np.sort(rng.uniform(-0.1, 0.9, n).astype(np.float32))[::-1]
            moments.append(
                {
                    "episode": episode,
                    "k": int(rng.integers(1, 3)),
                    "ids": ids,
                    "scores": scores,
                    "vectors": vectors,
                }
            )
    for reuse in ("episode", "global", "none"):
        expected = reference_select(moments, reuse=reuse, threshold=0.94, min_score=0.2)
        offsets = np.concatenate([[0], np.cumsum([len(m["ids"]) for m in moments])])
        picked, counts, outcomes = starkret._core.select_images(
            np.array([m["episode"] for m in moments], np.uint64),
            np.array([m["k"] for m in moments], np.int64),
            offsets.astype(np.int64),
            np.concatenate([m["ids"] for m in moments]).astype(np.uint64),
            np.concatenate([m["scores"] for m in moments]).astype(np.float32),
            np.concatenate([m["vectors"].reshape(-1, DIM) for m in moments]).astype(np.float32),
            reuse=reuse,
            threshold=0.94,
            min_score=0.2,
        )
        start = 0
        for m_idx, (ref_picked, ref_outcome) in enumerate(expected):
            mine = [p - offsets[m_idx] for p in picked[start : start + counts[m_idx]]]
            start += counts[m_idx]
            assert mine == ref_picked, (reuse, m_idx)
            assert ("ok", "below_threshold", "exhausted")[outcomes[m_idx]] == ref_outcome


def test_aligner_output_in_stark_conventions(tmp_path):
    db, _ = _planted_db(tmp_path)
    got = Aligner(db, min_score=0.1).align(
        [{"episode_id": "e", "moment_id": "m", "session": 2, "vector": _query({1: 1.0})}]
    )
    record = got[0].to_dict()
    assert record["module"] == "retrieval" and record["session"] == 2
    image = record["images"][0]
    assert image["key"] == "url:https://img.example/cc12m/000000001.jpg"
    assert image["image_source"] == "cc12m" and image["index"] == "cc12m/000000001"
    assert list(record["db_searched_results"]) == ["cc12m"]


def test_aligner_rejects_bad_moments_and_parameters(tmp_path):
    db, _ = _planted_db(tmp_path)
    with pytest.raises(ValueError, match="reuse"):
        Aligner(db, reuse="session")
    with pytest.raises(ValueError, match="moment_id"):
        Aligner(db).align([{"episode_id": "e", "description": "x"}])
    with pytest.raises(ValueError, match="neither a description nor a vector"):
        Aligner(db).align([{"episode_id": "e", "moment_id": "m"}])
    with pytest.raises(ValueError, match="k must be"):
        Aligner(db).align([{"episode_id": "e", "moment_id": "m", "description": "x", "k": 0}])


# ==== CLI ====


def test_cli_build_index_and_search(db_dir, capsys):
    from starkret.cli import commands as cli

    root, _ = db_dir
    assert cli.main(["build-index", str(root)]) == 0
    out = capsys.readouterr().out
    assert "cc12m: exact index over 700 images" in out
    emb = starkret.ClipEmbedder("starkret-tiny", device="cpu")
    rng = np.random.default_rng(8)
    write_source(root.parent / "tinydb" / "cc12m", "cc12m", _unit(rng, 30, emb.dim))
    assert cli.main(["search", str(root.parent / "tinydb"), "a dog on a beach", "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "a dog on a beach" and len(table) == 3 and "cc12m/" in table[1]
    assert cli.main(["search", str(root.parent / "tinydb"), "a cat", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)["results"]
    assert parsed[0]["query"] == "a cat" and len(parsed[0]["hits"]) == 5
    assert cli.main(["search", str(root.parent / "nothing"), "x"]) == 2
    assert "no embedded sources" in capsys.readouterr().err


def test_autofaiss_that_cannot_fit_the_budget_is_a_clear_error(tmp_path, monkeypatch):
    import starkret.index.build

    write_source(tmp_path / "src", "x", _unit(np.random.default_rng(9), 400, 16))
    # autofaiss refuses a memory budget larger than the memory it may use
    monkeypatch.setattr(starkret.index.build, "_available_memory", lambda: "1G")
    with pytest.raises(RuntimeError, match="autofaiss built no index"):
        build_index(tmp_path / "src", kind="autofaiss", max_index_memory_usage="16GB")


def test_autofaiss_plans_with_available_not_free_memory(tmp_path):
    # A machine with 21 GB available but 2 GB free (the rest is page cache) must plan with 21 GB.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       24000000 kB\nMemFree:         2097152 kB\n"
        "MemAvailable:   22020096 kB\nBuffers:           1000 kB\n"
    )
    assert starkret.index.build._available_memory(str(meminfo)) == "21G"
    assert starkret.index.build._available_memory(str(tmp_path / "missing")) == "16G"


def test_a_faiss_index_search_leaves_out_excluded_rows_like_the_exact_scan(db_dir):
    # the autofaiss path filters after the search: a flat faiss index must then agree
    # with the exact scan, exclusions included
    import faiss

    from starkret.index.source import _faiss_search

    root, _ = db_dir
    index = SourceIndex.open(root / "cc12m")
    flat = faiss.IndexFlatIP(index.parts.dim)
    flat.add(index.parts.rows(np.arange(index.count)))
    index._faiss = flat
    index.infos = {**index.infos, "faiss_order": list(range(len(index.parts.arrays)))}
    queries = _unit(np.random.default_rng(8), 4)
    _, top = index.search(queries, 3, exact=True)
    for exclude in ({int(top[0, 0]), int(top[1, 1])}, [{int(r)} for r in top[:, 0]]):
        exclusions = Exclusions.parse(exclude, len(queries))
        s1, r1 = index.search(queries, 6, exclude=exclusions, exact=True)
        s2, r2 = _faiss_search(index, queries, 6, exclusions)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
