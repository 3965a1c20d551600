"""build_index(kind="ivf", calibrate_with=...): the probe count chosen on the user's queries."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from starkret import build_index
from starkret.errors import FormatError, InvalidInputError, NotFoundError
from starkret.index.calibrate import calibration_queries, read_queries
from starkret.index.source import SourceIndex
from starkret.index.text_like import recall_at
from starkret.testing import write_source

DIM = 64  # starkret-tiny's, the model write_source records


def _unit(rng, n, dim=DIM):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _clustered(n, clusters, seed=0):
    rng = np.random.default_rng(seed)
    centres = _unit(rng, clusters)
    v = centres[rng.integers(0, clusters, n)] + 0.6 * _unit(rng, n)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal") / "src"
    vectors = _clustered(6000, 48, seed=3)
    write_source(folder, "src", vectors, part_size=2000)
    return folder, vectors


def _near_row_queries(vectors, n, seed):
    """Held-out-item-like queries: a stored row plus noise (not a row of the source)."""
    rng = np.random.default_rng(seed)
    q = vectors[rng.integers(0, len(vectors), n)] + 0.5 * _unit(rng, n)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_calibrated_on_a_npy_of_user_queries_writes_recall_and_count(source, tmp_path):
    folder, vectors = source
    queries = _near_row_queries(vectors, 150, seed=1)
    path = tmp_path / "queries.npy"
    np.save(path, queries)
    infos = build_index(folder, kind="ivf", calibrate_with=path, target_recall=0.95)
    assert infos["kind"] == "ivf" and infos["calibrated_on"] == "user queries"
    assert infos["calibration_queries"] == 150 and infos["calibration_file"] == str(path)
    assert infos["recall_target_met"] and infos["recall_at_10_calibration"] >= 0.95
    assert all("recall_at_10" in t for t in infos["calibration"])
    assert 0.0 <= infos["recall_at_5_text_like"] <= 1.0  # still measured, for comparison
    saved = json.loads((folder / "index" / "infos.json").read_text())
    assert saved["recall_at_10_calibration"] == infos["recall_at_10_calibration"]
    assert saved["calibration_queries"] == 150 and saved["nprobe"] == infos["nprobe"]
    # the written recall is what searching the built index on those queries gives
    index = SourceIndex.open(folder)
    _, truth = index.search(queries, 10, exact=True)
    _, got = index.search(queries, 10)
    assert recall_at(truth, got, 10) == pytest.approx(infos["recall_at_10_calibration"], abs=1e-4)


def test_a_higher_target_probes_at_least_as_many_cells(source):
    folder, vectors = source
    queries = _near_row_queries(vectors, 120, seed=2)
    low = build_index(folder, kind="ivf", calibrate_with=queries, target_recall=0.5)
    high = build_index(folder, kind="ivf", calibrate_with=queries, target_recall=0.999)
    assert low["recall_at_10_calibration"] >= 0.5
    assert (high["nprobe"], high["candidates"]) >= (low["nprobe"], low["candidates"])
    assert high["recall_at_10_calibration"] >= low["recall_at_10_calibration"]
    assert "calibration_file" not in low  # an array, not a file


def test_text_and_moments_files_are_encoded_with_the_sources_model(source, tmp_path):
    folder, _ = source
    texts = tmp_path / "queries.txt"
    texts.write_text("a red apple on a table\n\n  a bar chart of rainfall \nmy dog on the sofa\n")
    assert read_queries(texts) == [
        "a red apple on a table",
        "a bar chart of rainfall",
        "my dog on the sofa",
    ]
    infos = build_index(folder, kind="ivf", calibrate_with=texts, target_recall=0.9)
    assert infos["calibration_queries"] == 3 and "recall_at_10_calibration" in infos

    moments = tmp_path / "moments.jsonl"
    moments.write_text(
        json.dumps({"moment_id": "m1", "description": "a red apple on a table"})
        + "\n"
        + json.dumps({"moment_id": "m2", "text": "a bar chart of rainfall"})
        + "\n"
    )
    assert read_queries(moments) == ["a red apple on a table", "a bar chart of rainfall"]
    from starkret.ingest.towers import ClipEmbedder

    encoded = ClipEmbedder("starkret-tiny", None).encode_texts(
        ["a red apple on a table"], dtype="float32"
    )
    got = calibration_queries(
        moments,
        dim=DIM,
        encode_texts=lambda t: ClipEmbedder("starkret-tiny", None).encode_texts(t, dtype="float32"),
    )
    np.testing.assert_allclose(got[0], encoded[0] / np.linalg.norm(encoded[0]), atol=1e-6)

    vectors = tmp_path / "vectors.jsonl"
    vectors.write_text("\n".join(json.dumps({"vector": [1.0] * DIM}) for _ in range(4)))
    got = calibration_queries(vectors, dim=DIM)
    assert got.shape == (4, DIM) and np.allclose(np.linalg.norm(got, axis=1), 1)


def test_more_queries_than_the_cap_are_subsampled():
    q = _unit(np.random.default_rng(0), 50)
    got = calibration_queries(q, dim=DIM, max_queries=20)
    assert got.shape == (20, DIM)
    assert {tuple(r) for r in np.round(got, 5)} <= {tuple(r) for r in np.round(q, 5)}


def test_wrong_dim_empty_unreadable_and_wrong_kind_are_clear_errors(source, tmp_path):
    folder, _ = source
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((5, DIM + 1), np.float32))
    with pytest.raises(InvalidInputError, match=r"shape \(n, 64\).*\(5, 65\)"):
        build_index(folder, kind="ivf", calibrate_with=wrong)
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("\n  \n")
    with pytest.raises(InvalidInputError, match="no queries"):
        build_index(folder, kind="ivf", calibrate_with=empty_txt)
    empty_npy = tmp_path / "empty.npy"
    np.save(empty_npy, np.zeros((0, DIM), np.float32))
    with pytest.raises(InvalidInputError, match="no queries"):
        build_index(folder, kind="ivf", calibrate_with=empty_npy)
    with pytest.raises(NotFoundError, match="not found"):
        build_index(folder, kind="ivf", calibrate_with=tmp_path / "missing.npy")
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not an npy file")
    with pytest.raises(FormatError, match=r"not a readable \.npy"):
        build_index(folder, kind="ivf", calibrate_with=garbage)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    with pytest.raises(FormatError, match="not UTF-8"):
        build_index(folder, kind="ivf", calibrate_with=latin)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"description": "ok"}\n{"nothing": 1}\n')
    with pytest.raises(FormatError, match="line 2"):
        build_index(folder, kind="ivf", calibrate_with=bad_json)
    nan = np.full((2, DIM), np.nan, np.float32)
    with pytest.raises(InvalidInputError, match="NaN"):
        build_index(folder, kind="ivf", calibrate_with=nan)
    with pytest.raises(InvalidInputError, match="ivf"):
        build_index(folder, kind="exact", calibrate_with=np.ones((2, DIM), np.float32))
    with pytest.raises(InvalidInputError, match="target_recall"):
        build_index(folder, kind="ivf", target_recall=1.5)


def test_cli_build_index_calibrate_with(source, tmp_path):
    folder, vectors = source

    def starkret(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "starkret", *args], capture_output=True, text=True, timeout=300
        )

    path = tmp_path / "q.npy"
    np.save(path, _near_row_queries(vectors, 60, seed=4))
    done = starkret(
        "build-index", str(folder), "--kind", "ivf", "--calibrate-with", str(path),
        "--target-recall", "0.9", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (summary,) = json.loads(done.stdout)["sources"]
    assert summary["calibration_queries"] == 60 and summary["recall_at_10_calibration"] >= 0.9
    np.save(path, np.ones((3, 7), np.float32))
    refused = starkret(
        "build-index", str(folder), "--kind", "ivf", "--calibrate-with", str(path), "-q"
    )
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "(n, 64)" in refused.stderr and str(path) in refused.stderr


def test_recall_counts_a_tied_duplicate_as_a_hit():
    """Calibration used plain id recall: an index returning one of two identical rows
    was marked wrong, and calibration chased the order of duplicates."""
    truth = np.array([[3, 7]])  # rows 3 and 9 are identical copies
    truth_s = np.array([[0.9, 0.5]], np.float32)
    approx = np.array([[3, 9]])
    approx_s = np.array([[0.9, 0.5]], np.float32)
    assert recall_at(truth, approx, 2) == 0.5
    assert recall_at(truth, approx, 2, truth_scores=truth_s, approx_scores=approx_s) == 1.0
    worse = np.array([[0.9, 0.4]], np.float32)
    assert recall_at(truth, approx, 2, truth_scores=truth_s, approx_scores=worse) == 0.5
