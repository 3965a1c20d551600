"""build_index on a source that gained parts: only the new rows are added (issue 23)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from starkret import ImageDB, build_index
from starkret.errors import OutputBusyError
from starkret.index.build import BUILD_LOCK
from starkret.index.source import _faiss_ids_to_rows
from starkret.store.claims import STATE_DIR, lock_file
from starkret.store.keyindex import HASHES_FILE, ROWS_FILE
from starkret.testing import write_manifest, write_part, write_source

DIM = 32
PART = 200
RUN_TIMEOUT_S = 120


def _unit(rng, n, dim=DIM):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _clustered(rng, n, centres, spread=0.35):
    """Unit rows around ``centres`` (drawn in turn)."""
    v = centres[np.arange(n) % len(centres)] + spread * _unit(rng, n, centres.shape[1])
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _keys(start, n):
    return [f"{i:09d}" for i in range(start, start + n)]


def _grow(folder: Path, vectors: np.ndarray, first: int) -> None:
    """Append ``vectors`` as parts ``first``, ``first+1``, ... (what ``embed`` does when
    given more inputs) and update the manifest's count."""
    start = first * PART
    for i, lo in enumerate(range(0, len(vectors), PART)):
        rows = vectors[lo : lo + PART]
        keys = _keys(start + lo, len(rows))
        urls = [f"https://img.example/src/{k}.jpg" for k in keys]
        write_part(
            folder,
            "src",
            first + i,
            keys,
            rows,
            urls=urls,
            captions=[None] * len(rows),
            shard=f"part{first + i}",
        )
    total = start + len(vectors)
    write_manifest(folder, "src", DIM, total, model="starkret-tiny", pretrained=None)


def _source(tmp_path, vectors, name="grown") -> Path:
    folder = tmp_path / name
    write_source(folder, "src", vectors, part_size=PART)
    return folder


def _infos(folder: Path) -> dict:
    return json.loads((folder / "index" / "infos.json").read_text())


def _search(folder: Path, queries: np.ndarray, k: int = 10):
    db = ImageDB.open(folder)
    hits = db.search(queries, k=k)
    return [[(h.key, round(h.score, 6), h.row, h.url) for h in q] for q in hits]


# ==== exact ====


def test_an_exact_source_after_adding_answers_like_one_built_from_scratch(tmp_path):
    rng = np.random.default_rng(0)
    vectors = _unit(rng, 1400)
    grown = _source(tmp_path, vectors[:1000])
    first = build_index(grown, kind="exact")
    assert first["added"] == 1000 and first["parts"] == 5 and first["rebuilt"] is None

    _grow(grown, vectors[1000:], first=5)
    infos = build_index(grown, kind="exact")
    assert (infos["added"], infos["count"], infos["parts"]) == (400, 1400, 7)
    assert infos["rebuilt"] is None
    assert infos["metadata_segments"] == ["metadata.p00005.arrow"]
    assert infos["metadata_rows"] == infos["key_index_rows"] == 1400
    assert infos["q8"]["written"] == 2  # int8 copies of the two new parts only

    scratch = _source(tmp_path, vectors, name="scratch")
    build_index(scratch, kind="exact")
    queries = _unit(np.random.default_rng(1), 20)
    assert _search(grown, queries) == _search(scratch, queries)
    # the merged key index is the one a build from scratch writes
    for name in (HASHES_FILE, ROWS_FILE):
        np.testing.assert_array_equal(np.load(grown / name), np.load(scratch / name))
    db = ImageDB.open(grown)
    assert db.locate("src/000001399") == ("src", 1399)
    assert db.locate("url:https://img.example/src/000001200.jpg") == ("src", 1200)
    assert db.metadata("src").take([3, 1203])["key"] == ["src/000000003", "src/000001203"]


def test_an_up_to_date_index_is_left_as_it_is(tmp_path):
    folder = _source(tmp_path, _unit(np.random.default_rng(0), 600))
    build_index(folder, kind="exact")
    before = (folder / "index" / "infos.json").stat().st_mtime_ns
    infos = build_index(folder, kind="exact")
    assert infos["added"] == 0 and infos["count"] == 600
    assert (folder / "index" / "infos.json").stat().st_mtime_ns == before


# ==== ivf and faiss indices ====


def test_an_ivf_index_gets_new_rows_without_retraining(tmp_path):
    import faiss

    rng = np.random.default_rng(2)
    vectors = _unit(rng, 3000)
    folder = _source(tmp_path, vectors[:2600])
    built = build_index(folder, kind="ivf")
    assert built["centroid_similarity"]["rows"] > 0
    index_file = folder / "index" / built["index_file"]
    before = faiss.read_index(str(index_file))
    centroids = faiss.extract_index_ivf(before).quantizer.reconstruct_n(0, built["nlist"])

    _grow(folder, vectors[2600:], first=13)
    infos = build_index(folder, kind="ivf")
    assert (infos["added"], infos["count"]) == (400, 3000)
    for key in ("nlist", "nprobe", "candidates", "build_seconds", "factory"):
        assert infos[key] == built[key]  # calibration and training kept
    after = faiss.read_index(str(index_file))
    assert after.ntotal == 3000
    np.testing.assert_array_equal(
        faiss.extract_index_ivf(after).quantizer.reconstruct_n(0, built["nlist"]), centroids
    )
    assert infos["drift"]["drifted"] is False
    # the new rows are found: each one's own vector ranks it first
    hits = _search(folder, vectors[2600:2640], k=1)
    assert [q[0][2] for q in hits] == list(range(2600, 2640))


def test_new_rows_far_from_the_cells_are_reported_as_drift(tmp_path, caplog):
    rng = np.random.default_rng(3)
    centres = _unit(rng, 8)
    folder = _source(tmp_path, _clustered(rng, 2400, centres, spread=0.3))
    build_index(folder, kind="ivf")
    _grow(folder, _unit(rng, 400), first=12)  # spread over the sphere, away from the cells
    with caplog.at_level(logging.WARNING, logger="starkret"):
        infos = build_index(folder, kind="ivf")
    assert infos["added"] == 400 and infos["drift"]["drifted"] is True
    assert "--rebuild" in caplog.text
    rebuilt = build_index(folder, kind="ivf", rebuild=True)
    assert rebuilt["rebuilt"] == "asked for (rebuild=True)" and rebuilt["added"] == 2800
    assert "drift" not in rebuilt


def test_faiss_ids_beyond_an_older_order_map_to_the_added_parts():
    # a reader that read faiss_order just before an add published its infos
    offsets = np.array([0, 10, 20, 25, 30])
    order = np.array([1, 0])  # two parts indexed in name order, then two added
    ids = np.array([[0, 10, 20, 26, -1]])
    np.testing.assert_array_equal(_faiss_ids_to_rows(ids, order, offsets), [[10, 0, 20, 26, -1]])


def _fake_knn_builder(monkeypatch, folder: Path) -> None:
    """``autofaiss.build_index`` replaced by an IVF4,Flat faiss index of the parts in name
    order (autofaiss itself pins numpy<2 and is not installed here)."""
    import faiss

    def build(*, embeddings, index_path, **_):
        files = sorted(Path(embeddings).glob("*.npy"), key=lambda p: p.name)
        rows = np.concatenate([np.load(p) for p in files]).astype(np.float32)
        index = faiss.index_factory(DIM, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(rows)
        index.add(rows)
        faiss.write_index(index, index_path)
        return None, {"fake": True}

    monkeypatch.setitem(sys.modules, "autofaiss", types.SimpleNamespace(build_index=build))


def test_a_knn_index_is_added_to_and_keeps_its_ids_in_step(tmp_path, monkeypatch):
    import faiss

    rng = np.random.default_rng(4)
    vectors = _unit(rng, 1000)
    folder = _source(tmp_path, vectors[:800])
    _fake_knn_builder(monkeypatch, folder)
    build_index(folder, kind="autofaiss", recall_queries=20)
    monkeypatch.delitem(sys.modules, "autofaiss")  # an add never calls autofaiss
    _grow(folder, vectors[800:], first=4)
    infos = build_index(folder, kind="autofaiss", recall_queries=20)
    assert (infos["added"], infos["faiss_order"]) == (200, [0, 1, 2, 3, 4])
    assert infos["drift"]["drifted"] is False  # measured against the build's figure
    assert faiss.read_index(str(folder / "index" / "knn.index")).ntotal == 1000
    hits = _search(folder, vectors[800:830], k=1)
    assert [q[0][2] for q in hits] == list(range(800, 830))


# ==== when an add becomes a rebuild ====


def test_an_index_without_a_coverage_record_is_rebuilt_with_a_log_line(tmp_path, caplog):
    folder = _source(tmp_path, _unit(np.random.default_rng(5), 600))
    build_index(folder, kind="exact")
    infos = _infos(folder)
    for key in ("parts", "parts_digest"):
        del infos[key]  # as an older starkret wrote it
    (folder / "index" / "infos.json").write_text(json.dumps(infos))
    _grow(folder, _unit(np.random.default_rng(6), 200), first=3)
    with caplog.at_level(logging.WARNING, logger="starkret"):
        infos = build_index(folder, kind="exact")
    assert infos["added"] == 800 and "before starkret recorded" in infos["rebuilt"]
    assert "rebuilding the index from scratch" in caplog.text


@pytest.mark.parametrize("change", ["replaced", "removed"])
def test_a_replaced_or_removed_part_means_a_rebuild(tmp_path, change):
    rng = np.random.default_rng(7)
    folder = _source(tmp_path, _unit(rng, 800))
    build_index(folder, kind="exact")
    if change == "replaced":
        keys = _keys(200, PART)
        write_part(
            folder,
            "src",
            1,
            keys,
            _unit(rng, PART),
            urls=[None] * PART,
            captions=[None] * PART,
            shard="again",
        )
    else:
        for sub, suffix in (("img_emb", "npy"), ("metadata", "parquet")):
            (folder / sub / f"{sub}_00003.{suffix}").unlink()
    infos = build_index(folder, kind="exact")
    assert change in infos["rebuilt"] and infos["added"] == infos["count"]
    assert infos["metadata_rows"] == infos["count"]


def test_a_changed_kind_means_a_rebuild(tmp_path):
    folder = _source(tmp_path, _unit(np.random.default_rng(8), 600))
    build_index(folder, kind="exact")
    infos = build_index(folder, kind="ivf")
    assert infos["kind"] == "ivf" and "kind changes" in infos["rebuilt"]


# ==== safety ====


def test_a_second_build_on_the_same_source_is_refused(tmp_path):
    folder = _source(tmp_path, _unit(np.random.default_rng(9), 400))
    (folder / STATE_DIR).mkdir(exist_ok=True)
    with (
        lock_file(folder / STATE_DIR / BUILD_LOCK),  # a build in progress
        pytest.raises(OutputBusyError, match="another build-index is running"),
    ):
        build_index(folder, kind="exact")
    build_index(folder, kind="exact")  # free again once it is done


_KILLED_ADD = textwrap.dedent(
    """
    import os, signal, sys
    import starkret.index.build as build
    import starkret.store.keyindex as keyindex

    stage = sys.argv[2]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if stage == "before-infos":  # every index file written, infos.json not yet
        build.atomic_write_text = die
    elif stage == "before-keys":  # the metadata segment written, the key index not yet
        build.grow.extend_key_index = die
    else:  # a rebuild: metadata.arrow rewritten, the key index not yet
        build.write_key_index = die
    build.build_index(sys.argv[1], kind=sys.argv[3], rebuild=stage == "rebuild")
    """
)


@pytest.mark.parametrize("kind", ["exact", "ivf"])
@pytest.mark.parametrize("stage", ["before-keys", "before-infos"])
def test_an_add_killed_midway_is_finished_by_a_rerun(tmp_path, kind, stage):
    rng = np.random.default_rng(10)
    vectors = _unit(rng, 2800)
    folder = _source(tmp_path, vectors[:2400])
    build_index(folder, kind=kind)
    old = _infos(folder)
    _grow(folder, vectors[2400:], first=12)
    _kill_midway(folder, stage, kind)
    assert _infos(folder) == old  # readers still see the old index, whole
    assert ImageDB.open(folder).locate("src/000000005") == ("src", 5)

    infos = build_index(folder, kind=kind)
    assert (infos["added"], infos["count"], infos["rebuilt"]) == (400, 2800, None)
    assert infos["metadata_rows"] == infos["key_index_rows"] == 2800
    scratch = _source(tmp_path, vectors, name="scratch")
    build_index(scratch, kind="exact")
    for name in (HASHES_FILE, ROWS_FILE):  # no key entry twice
        np.testing.assert_array_equal(np.load(folder / name), np.load(scratch / name))
    if kind == "ivf":
        import faiss

        assert faiss.read_index(str(folder / "index" / infos["index_file"])).ntotal == 2800
        hits = _search(folder, vectors[2400:2420], k=1)
        assert [q[0][2] for q in hits] == list(range(2400, 2420))
    else:
        queries = _unit(np.random.default_rng(11), 10)
        assert _search(folder, queries) == _search(scratch, queries)
    assert not [p for p in (folder / "index").iterdir() if p.name.startswith(".")]


def _kill_midway(folder: Path, stage: str, kind: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_ADD, str(folder), stage, kind],
        env=env,
        capture_output=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]


def test_a_rebuild_killed_midway_is_not_mistaken_for_an_add(tmp_path):
    rng = np.random.default_rng(13)
    vectors = _unit(rng, 1000)
    folder = _source(tmp_path, vectors[:600])
    build_index(folder, kind="exact")
    _grow(folder, vectors[600:800], first=3)
    build_index(folder, kind="exact")  # an add: a metadata segment
    _grow(folder, vectors[800:], first=4)
    _kill_midway(folder, "rebuild", "exact")  # metadata.arrow now holds all 1000 rows
    infos = build_index(folder, kind="exact")
    assert "interrupted" in infos["rebuilt"] and infos["count"] == 1000
    db = ImageDB.open(folder)
    assert db.metadata("src").take([999, 650])["key"] == ["src/000000999", "src/000000650"]


def test_a_rebuild_removes_the_metadata_segments_of_adds(tmp_path):
    rng = np.random.default_rng(12)
    folder = _source(tmp_path, _unit(rng, 600))
    build_index(folder, kind="exact")
    _grow(folder, _unit(rng, 200), first=3)
    assert build_index(folder, kind="exact")["metadata_segments"]
    infos = build_index(folder, kind="exact", rebuild=True)
    assert "metadata_segments" not in infos
    assert sorted(p.name for p in (folder / "index").glob("metadata*")) == ["metadata.arrow"]
    shutil.rmtree(folder / "index")
    assert build_index(folder, kind="exact")["added"] == 800
