"""`starkret align --report` shows every local image, whatever input it was embedded from,
and `--export-images` exports them: both read through the one reader of image bytes."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import starkret
from starkret.testing.inputs import embed_every_input_kind


@pytest.fixture(scope="module")
def every_kind_db(tmp_path_factory, tiny_embedder):
    """A DB with one source per input kind, and each source's images by DB key."""
    return embed_every_input_kind(tmp_path_factory.mktemp("kinds"), tiny_embedder)


@pytest.fixture(scope="module")
def aligned(every_kind_db, tmp_path_factory):
    """One real ``starkret align --report --export-images`` run over the DB: one episode
    with as many moments as images, no score floor and reuse per episode, so every
    image is chosen once (and so is on the page and in the export)."""
    db, images = every_kind_db
    out = tmp_path_factory.mktemp("aligned")
    total = sum(len(v) for v in images.values())
    moments = out / "moments.jsonl"
    moments.write_text(
        "".join(
            json.dumps({"episode_id": "e1", "moment_id": f"m{i}", "description": f"photo {i}"})
            + "\n"
            for i in range(total)
        )
    )
    command = [sys.executable, "-m", "starkret", "align", str(db), str(moments)]
    command += ["-o", str(out / "out.jsonl"), "--report", str(out / "report.html")]
    command += ["--export-images", str(out / "stark-image"), "--min-score", "-1"]
    command += ["--near-duplicate-threshold", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(starkret.__file__).parents[1])}
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    (out / "stderr.txt").write_text(run.stderr)
    return out


def test_align_report_shows_a_thumbnail_for_every_input_kind(every_kind_db, aligned):
    _, images = every_kind_db
    text = (aligned / "report.html").read_text()
    assert "no preview" not in text
    assert text.count("<figure") == text.count("<img ")  # every candidate has its thumbnail
    thumbnails = re.findall(r'<img src="data:image/jpeg;base64,[^"]+" title="([^"]+)"', text)
    shown = {html.unescape(key) for key in thumbnails}
    for source, keys in images.items():
        assert set(keys) <= shown, (source, sorted(set(keys) - shown))


def test_export_images_writes_the_original_bytes_for_every_input_kind(every_kind_db, aligned):
    _, images = every_kind_db
    stderr = (aligned / "stderr.txt").read_text()
    assert "not exported" not in stderr, stderr[-3000:]
    expected = {key: data for keys in images.values() for key, data in keys.items()}
    records = [
        json.loads(line)
        for line in (aligned / "out.jsonl.images.jsonl").read_text().splitlines()
        if line.strip()
    ]
    db_key = {r["index"]: r["db_key"] for r in records}
    assert set(db_key.values()) == set(expected)
    exported = {}
    for shard in sorted((aligned / "stark-image").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                uuid, ext = member.name.split(".", 1)
                if ext != "json":
                    exported[db_key[uuid]] = (ext, tar.extractfile(member).read())
    assert set(exported) == set(expected)
    for key, (ext, data) in exported.items():
        assert data == expected[key], key
        assert ext == ("jpg" if data[:3] == b"\xff\xd8\xff" else "png"), key
