"""`starkret build-index` on a grown source: `added` in its line and its --json, --rebuild,
and a second run on one source refused in one line (issue 23)."""

from __future__ import annotations

import json

import numpy as np

from starkret.cli import commands as cli
from starkret.index.build import BUILD_LOCK
from starkret.store.claims import STATE_DIR, lock_file
from starkret.testing import write_manifest, write_part, write_source

DIM = 16


def _unit(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli.main(["build-index", *args, "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out)["sources"][0]


def test_build_index_reports_added_rows_and_rebuilds_when_asked(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "src"
    write_source(folder, "src", _unit(rng, 300), part_size=100)
    first = _json(capsys, str(folder), "--kind", "exact")
    assert (first["added"], first["count"], first["rebuilt"]) == (300, 300, None)

    keys = [f"{i:09d}" for i in range(300, 350)]
    write_part(
        folder, "src", 3, keys, _unit(rng, 50), urls=[None] * 50, captions=[None] * 50, shard="p3"
    )
    write_manifest(folder, "src", DIM, 350, model="starkret-tiny", pretrained=None)
    capsys.readouterr()
    assert cli.main(["build-index", str(folder), "--kind", "exact"]) == 0
    assert "added 50 images to its exact index, now 350" in capsys.readouterr().out

    again = _json(capsys, str(folder), "--kind", "exact")
    assert (again["added"], again["count"]) == (0, 350)
    rebuilt = _json(capsys, str(folder), "--kind", "exact", "--rebuild")
    assert rebuilt["added"] == 350 and "rebuild" in rebuilt["rebuilt"]


def test_a_build_index_while_another_runs_fails_in_one_line(tmp_path, capsys):
    folder = tmp_path / "src"
    write_source(folder, "src", _unit(np.random.default_rng(1), 100), part_size=100)
    (folder / STATE_DIR).mkdir()
    with lock_file(folder / STATE_DIR / BUILD_LOCK):
        assert cli.main(["build-index", str(folder), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another build-index is running" in err[0]
