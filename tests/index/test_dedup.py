"""Whole-DB near-duplicate removal: starkret.dedup, the record, and searches honouring it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import starkret
import starkret._core as _core
from starkret.align.aligner import Aligner
from starkret.align.eval import evaluate
from starkret.cli.commands import main
from starkret.errors import OutputBusyError
from starkret.index.db import ImageDB
from starkret.index.dedup import dedup
from starkret.index.duplicates import RECORD_FILE, read_record
from starkret.store.claims import STATE_DIR, lock_file
from starkret.testing import write_part, write_source

DIM = 32


def _unit(rng, n, dim=DIM):
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _near(rng, x, cosine):
    """A unit vector at ``cosine`` from unit ``x``."""
    noise = rng.standard_normal(x.shape)
    noise -= (noise @ x) * x
    noise /= np.linalg.norm(noise)
    return cosine * x + np.sqrt(1 - cosine**2) * noise


def _pairs(record):
    names = record.sources
    out = set()
    for g in np.unique(record.members_group):
        at = np.flatnonzero(record.members_group == g)
        out.add(
            frozenset(
                (names[int(record.members_source[i])], int(record.members_row[i])) for i in at
            )
        )
    return out


@pytest.fixture
def planted(tmp_path):
    """Two sources; near duplicates within and across them, and a pair just below 0.95."""
    rng = np.random.default_rng(0)
    a, b = _unit(rng, 5000), _unit(rng, 3000)
    b[7] = _near(rng, a[11], 0.99)  # across sources
    a[300] = _near(rng, a[11], 0.985)  # same group, same source
    a[40] = _near(rng, a[41], 0.97)  # a pair within aa
    b[100] = _near(rng, a[500], 0.93)  # below the threshold: not a duplicate
    write_source(tmp_path / "db" / "aa", "aa", a)
    write_source(tmp_path / "db" / "bb", "bb", b)
    return tmp_path / "db", a, b


def test_planted_duplicates_across_sources_are_grouped(planted):
    db_path, _a, _b = planted
    summary = dedup(db_path, 0.95)
    assert {"rows", "groups", "dropped", "seconds"} <= set(summary)
    assert summary["rows"] == 8000 and summary["groups"] == 2 and summary["dropped"] == 3
    record = read_record(db_path)
    assert _pairs(record) == {
        frozenset({("aa", 11), ("aa", 300), ("bb", 7)}),
        frozenset({("aa", 40), ("aa", 41)}),
    }


def test_nothing_below_the_threshold_is_paired(planted):
    db_path, _a, _b = planted
    dedup(db_path, 0.95)
    record = read_record(db_path)
    assert ("bb", 100) not in {m for g in _pairs(record) for m in g}
    # every recorded pair's members score >= threshold with someone in their group
    db = ImageDB.open(db_path, duplicates="keep")
    for group in _pairs(record):
        vecs = [db.vectors(s, [r])[0] for s, r in sorted(group)]
        sims = np.array(vecs) @ np.array(vecs).T
        np.fill_diagonal(sims, -1)
        assert (sims.max(axis=1) >= 0.95).all()


def test_keep_rule_prefers_more_pixels_else_earlier_source_and_row(tmp_path):
    rng = np.random.default_rng(1)
    a, b = _unit(rng, 10), _unit(rng, 10)
    b[3] = _near(rng, a[2], 0.99)
    a[5] = _near(rng, a[4], 0.99)
    for name, vecs in (("aa", a), ("bb", b)):
        (tmp_path / "db" / name).mkdir(parents=True)
        write_source(tmp_path / "db" / name, name, vecs, part_size=10)
    # bb's row 3 is a larger image: it is kept over aa's row 2
    keys = [f"{i:09d}" for i in range(10)]
    urls = [None] * 10
    write_part(tmp_path / "db" / "bb", "bb", 0, keys, b, urls=urls, captions=urls,
               size=(640, 480), shard="p0")  # fmt: skip
    dedup(tmp_path / "db")
    record = read_record(tmp_path / "db")
    kept = {
        (record.sources[int(s)], int(r))
        for s, r, k in zip(
            record.members_source, record.members_row, record.members_kept, strict=True
        )
        if k
    }
    assert kept == {("bb", 3), ("aa", 4)}


def test_rerun_compares_only_new_rows_and_finds_their_duplicates(planted):
    db_path, a, _b = planted
    first = dedup(db_path)
    again = dedup(db_path)
    assert again["unchanged"] and again["compared"] == 0 and again["groups"] == first["groups"]
    # a new part of bb: a copy of aa's row 900 and a third member of the (40, 41) group
    rng = np.random.default_rng(5)
    extra = _unit(rng, 500)
    extra[0] = _near(rng, a[900], 0.99)
    extra[1] = _near(rng, a[41], 0.99)
    keys = [f"x{i:08d}" for i in range(500)]
    write_part(db_path / "bb", "bb", 3, keys, extra, urls=[None] * 500, captions=[None] * 500,
               shard="p3")  # fmt: skip
    manifest = json.loads((db_path / "bb" / "starkret.json").read_text())
    manifest["count"] += 500
    (db_path / "bb" / "starkret.json").write_text(json.dumps(manifest))
    grown = dedup(db_path)
    assert grown["new_rows"] == 500 and not grown["unchanged"]
    assert grown["compared"] < first["compared"]
    record = read_record(db_path)
    assert record.covered == {"aa": 5000, "bb": 3500}
    groups = _pairs(record)
    assert frozenset({("aa", 900), ("bb", 3000)}) in groups
    assert frozenset({("aa", 40), ("aa", 41), ("bb", 3001)}) in groups
    assert frozenset({("aa", 11), ("aa", 300), ("bb", 7)}) in groups
    # the same record as a full run
    full = dedup(db_path, full=True)
    assert _pairs(read_record(db_path)) == groups and full["groups"] == grown["groups"]


def test_a_second_concurrent_dedup_is_refused(planted):
    db_path, *_ = planted
    (db_path / STATE_DIR).mkdir(exist_ok=True)
    held = lock_file(db_path / STATE_DIR / "dedup.lock")
    try:
        with pytest.raises(OutputBusyError, match="another starkret dedup"):
            dedup(db_path)
    finally:
        held.release()
    assert not (db_path / RECORD_FILE).exists()
    dedup(db_path)
    assert (db_path / RECORD_FILE).exists()


_KILLED_RUN = """
import sys, time
import numpy as np
import starkret.index.duplicates as d
real = np.savez
def stalled(f, **arrays):
    f.write(b"PK half a record")
    f.flush()
    open(sys.argv[2], "w").close()
    time.sleep(60)
d.np.savez = stalled
from starkret.index.dedup import dedup
dedup(sys.argv[1])
"""


def test_a_killed_full_dedup_keeps_the_old_record(planted, tmp_path):
    db_path, *_ = planted
    dedup(db_path)
    before = (db_path / RECORD_FILE).read_bytes()
    flag = tmp_path / "writing"
    script = _KILLED_RUN.replace("dedup(sys.argv[1])", "dedup(sys.argv[1], full=True)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(db_path), str(flag)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, "the run ended before writing"
            assert time.monotonic() < deadline, "the run never reached the write"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert (db_path / RECORD_FILE).read_bytes() == before  # never half-written
    assert list(db_path.glob(f".{RECORD_FILE}.tmp-*"))  # the killed run's temporary
    summary = dedup(db_path, full=True)  # the lock died with the process
    assert summary["groups"] == 2
    assert not list(db_path.glob(f".{RECORD_FILE}.tmp-*"))


def test_imagedb_and_aligner_leave_recorded_duplicates_out_unless_kept(planted):
    db_path, a, _b = planted
    dedup(db_path)
    query = a[11:12].astype(np.float32)
    dropped = ImageDB.open(db_path)
    hits = dropped.search(query, k=3)[0]
    assert ("aa", 11) in {(h.source, h.row) for h in hits}
    assert not {("aa", 300), ("bb", 7)} & {(h.source, h.row) for h in hits}
    kept = ImageDB.open(db_path, duplicates="keep")
    rows = {(h.source, h.row) for h in kept.search(query, k=3)[0]}
    assert {("aa", 300), ("bb", 7)} <= rows
    moment = [{"episode_id": "e", "session": 1, "moment_id": "m", "vector": query[0]}]
    chosen = Aligner(dropped, k_per_source=3, min_score=0.0).align(moment)[0]
    shown = {c.key for cs in chosen.candidates.values() for c in cs}
    assert not {"aa/000000300", "bb/000000007"} & shown
    chosen = Aligner(kept, k_per_source=3, min_score=0.0).align(moment)[0]
    shown = {c.key for cs in chosen.candidates.values() for c in cs}
    assert {"aa/000000300", "bb/000000007"} <= shown


def test_eval_counts_the_kept_image_for_a_dropped_ground_truth(planted):
    db_path, a, b = planted
    dedup(db_path)
    db = ImageDB.open(db_path)
    pairs = [{"description": "x", "image_key": "bb/000000007"}]
    # query = the dropped image's own vector; its kept copy (aa/11) stands in for it
    db.encode = lambda texts: b[7:8].astype(np.float32)  # type: ignore[method-assign]
    assert evaluate(db, pairs).recall_at_1 == 100.0
    keep = ImageDB.open(db_path, duplicates="keep")
    keep.encode = lambda texts: a[11:12].astype(np.float32)  # type: ignore[method-assign]
    assert evaluate(keep, pairs).recall_at_1 == 0.0  # aa/11 and aa/300 beat it


def test_rust_compare_matches_numpy_exhaustive():
    rng = np.random.default_rng(3)
    x = _unit(rng, 700, 24).astype(np.float16)
    for i in range(0, 60, 3):
        x[i + 1] = _near(rng, x[i].astype(np.float64) / np.linalg.norm(x[i]), 0.97)
    bits = x.view(np.uint16)
    one = np.zeros((700, 1), np.int32)
    a, b, _s, compared = _core.neardup_pairs([bits], one, np.ones(700, np.uint8), 0.95)
    f = x.astype(np.float32)
    sims = f @ f.T
    want = {(i, j) for i, j in zip(*np.nonzero(np.triu(sims >= 0.95, 1)), strict=True)}
    got = set(zip(a.tolist(), b.tolist(), strict=True))
    # scores within float32 rounding of the threshold may land either side
    near = {(i, j) for i, j in want ^ got if abs(sims[i, j] - 0.95) > 1e-5}
    assert not near and len(got) >= 20
    assert compared == 700 * 699 // 2
    # clustered: each row in its nearest of 8 centroids and those within a margin
    cents = _unit(rng, 8, 24).astype(np.float32)
    assigned = _core.neardup_nearest_centroids([bits], cents, 4, 0.3)
    a2, b2, _, _ = _core.neardup_pairs([bits], assigned, np.ones(700, np.uint8), 0.95)
    assert set(zip(a2.tolist(), b2.tolist(), strict=True)) == got


def test_cli_dedup_json_text_and_report(planted, tmp_path, capsys):
    db_path, *_ = planted
    assert main(["dedup", str(db_path), "--json", "-q"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["groups"] == 2 and body["dropped"] == 3
    report = tmp_path / "groups.html"
    assert main(["dedup", str(db_path), "--report", str(report), "-q"]) == 0
    out = capsys.readouterr().out
    assert "2 groups" in out and "keep" in out and "bb/000000007" in out
    assert "aa/000000300" in report.read_text()
    # a file the user owns is never overwritten
    mine = tmp_path / "mine.html"
    mine.write_text("my notes")
    assert main(["dedup", str(db_path), "--report", str(mine), "-q"]) == 2
    assert mine.read_text() == "my notes"


def test_public_api_name():
    assert starkret.dedup is dedup
    assert "dedup" in starkret.__all__


def test_record_is_beside_the_sources(planted):
    db_path, *_ = planted
    summary = dedup(db_path)
    assert Path(summary["record"]) == db_path / RECORD_FILE


def test_a_running_db_picks_up_a_new_record_on_refresh(planted):
    """serve's ImageDB read the record once: a dedup run while it served took effect only
    after a restart. refresh() (run by serve before each batch) now reads it again."""
    db_path, a, _b = planted
    query = a[11:12].astype(np.float32)
    db = ImageDB.open(db_path)
    before = {(h.source, h.row) for h in db.search(query, k=3)[0]}
    assert {("aa", 300), ("bb", 7)} <= before  # no record yet
    dedup(db_path)
    db.refresh()
    after = {(h.source, h.row) for h in db.search(query, k=3)[0]}
    assert ("aa", 11) in after and not {("aa", 300), ("bb", 7)} & after
    (db_path / RECORD_FILE).unlink()  # a removed record: everything is searched again
    db.refresh()
    assert {("aa", 300), ("bb", 7)} <= {(h.source, h.row) for h in db.search(query, k=3)[0]}
