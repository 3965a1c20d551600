"""`--json`: the whole stdout of every command that has it is one JSON object (so `| jq`
works); progress bars, log lines and notes go to stderr. Real subprocess runs, without
`-q`, so everything a run can print is printed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from starkret.cli import commands as cli
from starkret.testing import synthetic_photo

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _json_of(*args: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "starkret", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    body = json.loads(run.stdout)  # the whole of stdout, nothing before or after
    assert isinstance(body, dict), run.stdout[:300]
    return body


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    """A DB of one local source embedded with `starkret embed-shards ... --json`."""
    root = tmp_path_factory.mktemp("json")
    images = root / "images"
    images.mkdir()
    for i in range(6):
        PIL.Image.fromarray(synthetic_photo(48, 40, seed=i)).save(images / f"{i}.png")
    body = _json_of(
        "embed-shards",
        str(images),
        "-o",
        str(root / "db" / "chartqa"),
        "--source",
        "chartqa",
        "--model",
        "starkret-tiny",
        "--threads",
        "1",
        "--json",
    )
    assert body["embedded"] == 6
    return root / "db"


def test_every_command_with_json_is_tested_here():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    with_json = {
        name
        for name, sub in commands.choices.items()
        if any("--json" in a.option_strings for a in sub._actions)
    }
    assert with_json == {
        "embed",
        "embed-shards",
        "build-index",
        "search",
        "align",
        "eval",
        "dedup",
    }


def test_dedup_json(db, tmp_path):
    import shutil

    copy = shutil.copytree(db, tmp_path / "db")  # the tiny model's images are near duplicates
    body = _json_of("dedup", str(copy), "--threads", "1", "--json")
    assert body["rows"] == 6 and {"groups", "dropped", "seconds"} <= set(body)


def test_build_index_json(db):
    body = _json_of("build-index", str(db), "--threads", "1", "--json")
    assert [s["count"] for s in body["sources"]] == [6]


def test_search_json_is_one_object(db):
    body = _json_of("search", str(db), "a chart", "a photo", "-k", "2", "--json")
    assert [r["query"] for r in body["results"]] == ["a chart", "a photo"]
    assert all(len(r["hits"]) == 2 for r in body["results"])


def test_align_json_holds_the_paths_it_wrote_and_nothing_follows_it(db, tmp_path):
    out = tmp_path / "aligned.jsonl"
    body = _json_of(
        "align",
        str(db),
        str(EXAMPLES / "stark_dialogues.jsonl"),
        "-o",
        str(out),
        "--min-score",
        "-1",  # starkret-tiny's random scores: choose anyway
        "--report",
        str(tmp_path / "r.html"),
        "--parquet",
        str(tmp_path / "aligned.parquet"),
        "--export-images",
        str(tmp_path / "stark-image"),
        "--json",
    )
    assert body["moments"] == 10 and body["chosen"] > 0
    assert body["output"] == str(out)
    assert body["images"] == str(out) + ".images.jsonl"
    assert body["report"] == str(tmp_path / "r.html")  # was a `report: ...` line after it
    assert body["parquet"] == str(tmp_path / "aligned.parquet")
    assert body["export_images"] == str(tmp_path / "stark-image")
    assert body["exported_images"] > 0 and body["not_exported"] == 0
    for key in ("output", "images", "report", "parquet"):
        assert Path(body[key]).is_file(), key


def test_eval_json(db, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"description": "a chart", "image_key": "chartqa/0.png"}) + "\n")
    assert _json_of("eval", str(db), str(pairs), "--json")["count"] == 1
