"""`starkret align` run as a real command: every path it writes is new or one its own state
file records (never an input, another output of the run, or somebody's file), two runs on
one output never both write, a failed run leaves nothing or a resumable state, and the
report links only http(s) urls."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import starkret
from starkret.align import report as report_module
from starkret.testing import write_source

RUN_TIMEOUT_S = 240
#: Episodes of the slow run in the concurrency tests: more than one output batch (256).
EPISODES = 300
HOSTILE_URLS = [
    "javascript:alert(document.cookie)",
    "JavaScript:alert(1)",
    " javascript:alert(2)",
    "java\tscript:alert(3)",
    "data:text/html,<script>alert(4)</script>",
    "vbscript:msgbox(5)",
    "file:///etc/passwd",
]
WEB_URLS = ["https://img.example/a.jpg", "http://img.example/b.jpg"]


@pytest.fixture(scope="module")
def db_path(tmp_path_factory, tiny_embedder):
    """A cc12m-like source whose url column holds hostile and web urls (no local bytes,
    so the report shows a link or text for every image)."""
    folder = tmp_path_factory.mktemp("db")
    urls = HOSTILE_URLS + WEB_URLS
    vectors = np.random.default_rng(0).standard_normal((len(urls), tiny_embedder.dim))
    write_source(folder / "cc12m", "cc12m", vectors.astype(np.float32), urls=urls)
    return folder


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(Path(starkret.__file__).parents[1])}


def _command(db_path, dialogues, output, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "starkret",
        "align",
        str(db_path),
        str(dialogues),
        "-o",
        str(output),
        "--no-progress",
        "--min-score",
        "-1",
        *map(str, extra),
    ]


def _align(db_path, dialogues, output, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(db_path, dialogues, output, *extra),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=_env(),
    )


def _start(db_path, dialogues, output, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        _command(db_path, dialogues, output, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _one_line_error(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    err = run.stderr.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def _write_moments(path: Path, n: int, *, tail: str = "") -> Path:
    path.write_text(
        "".join(
            json.dumps({"episode_id": f"e{i}", "moment_id": f"m{i}", "description": f"photo {i}"})
            + "\n"
            for i in range(n)
        )
        + tail
    )
    return path


def _episode_ids(output: Path) -> list[str]:
    return [json.loads(line)["episode_id"] for line in output.read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ==== Item 1: every path a run writes is new or recorded as its own ====


@pytest.mark.parametrize(
    ("option", "target", "needle"),
    [
        ("--parquet", "dialogue file", "an input"),
        ("--parquet", "symlink to the dialogue file", "an input"),
        ("--parquet", "hard link to the dialogue file", "an input"),
        ("--parquet", "-o", "(-o)"),
        ("--parquet", "db manifest", "an input folder"),
        ("--parquet", "unrelated file", "is not a starkret align output"),
        ("--report", "-o", "(-o)"),
        ("--report", "image records", "(image records)"),
        ("--report", "db manifest", "an input folder"),
        ("--export-images", "db folder", "an input folder"),
        ("--export-images", "unrelated folder", "is not a starkret align output"),
    ],
)
def test_an_output_option_never_writes_over_an_input_another_output_or_a_strangers_file(
    tmp_path, db_path, option, target, needle
):
    db_path = Path(shutil.copytree(db_path, tmp_path / "db"))  # main overwrote its manifest
    dialogues = _write_moments(tmp_path / "moments.jsonl", 2)
    output = tmp_path / "out.jsonl"
    notes = tmp_path / "notes.parquet"
    notes.write_bytes(b"somebody's table")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "00000.tar").write_bytes(b"somebody's tar")
    path = {
        "dialogue file": dialogues,
        "symlink to the dialogue file": tmp_path / "link.jsonl",
        "hard link to the dialogue file": tmp_path / "hard.jsonl",
        "-o": output,
        "image records": tmp_path / "out.jsonl.images.jsonl",
        "db manifest": db_path / "cc12m" / "starkret.json",
        "db folder": db_path,
        "unrelated file": notes,
        "unrelated folder": mine,
    }[target]
    if target.startswith("symlink"):
        path.symlink_to(dialogues)
    elif target.startswith("hard link"):
        os.link(dialogues, path)
    before_db, before_tmp = _snapshot(db_path), _snapshot(tmp_path)
    run = _align(db_path, dialogues, output, option, path)
    _one_line_error(run, str(path), needle)
    assert _snapshot(db_path) == before_db
    assert _snapshot(tmp_path) == before_tmp  # refused before anything was written
    assert not (tmp_path / "out.jsonl.starkret.lock").exists()


def test_a_rerun_replaces_what_its_output_wrote_and_nothing_else(tmp_path, db_path):
    dialogues = _write_moments(tmp_path / "moments.jsonl", 3)
    output, report, parquet = tmp_path / "out.jsonl", tmp_path / "r.html", tmp_path / "p.parquet"
    exported = tmp_path / "exported"
    extra = ("--report", report, "--parquet", parquet, "--export-images", exported)
    first = _align(db_path, dialogues, output, *extra)
    assert first.returncode == 0, first.stderr
    state = json.loads((tmp_path / "out.jsonl.starkret").read_text())
    assert set(state["paths"]) >= {"out.jsonl", "out.jsonl.images.jsonl", "r.html", "p.parquet"}
    assert "exported" in state["paths"]
    report.write_text("an older report")  # a rerun replaces what the state file records
    again = _align(db_path, dialogues, output, *extra)
    assert again.returncode == 0, again.stderr
    assert report.read_text().startswith("<!doctype html>")
    assert _episode_ids(output) == ["e0", "e1", "e2"]
    # Another output's run did not write r.html: its state file does not record it.
    other = _align(db_path, dialogues, tmp_path / "other.jsonl", "--report", report)
    _one_line_error(other, str(report), "other.jsonl.starkret")
    assert not (tmp_path / "other.jsonl").exists()
    assert not (tmp_path / "other.jsonl.starkret").exists()


# ==== Item 2: one run per output ====


def _stop_once_it_holds_the_output(run: subprocess.Popen, output: Path) -> None:
    """Freeze ``run`` (SIGSTOP) once it has started writing ``output``: its state file
    exists, and it has hundreds of episodes left to align."""
    state = output.with_name(output.name + ".starkret")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not state.exists():
        assert run.poll() is None, f"the first run ended early: {run.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the first run never started writing"
        time.sleep(0.01)
    run.send_signal(signal.SIGSTOP)
    assert run.poll() is None, "the first run finished before it could be paused"


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether process ``pid`` waits for an flock (a ``->`` line of /proc/locks)."""
    with open("/proc/locks") as f:
        return any("->" in line and str(pid) in line.split() for line in f)


def _finish(run: subprocess.Popen) -> tuple[int, str, str]:
    run.send_signal(signal.SIGCONT)
    out, err = run.communicate(timeout=RUN_TIMEOUT_S)
    return run.returncode, out, err


def _assert_every_episode_once(output: Path) -> None:
    ids = _episode_ids(output)
    assert sorted(ids) == sorted(f"e{i}" for i in range(EPISODES)), (len(ids), len(set(ids)))
    records = output.with_name(output.name + ".images.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in records]
    assert len(keys) == len(set(keys)) == EPISODES


def test_a_second_run_on_the_same_output_refuses_at_once(tmp_path, db_path):
    dialogues = _write_moments(tmp_path / "moments.jsonl", EPISODES)
    output = tmp_path / "out.jsonl"
    first = _start(db_path, dialogues, output)
    try:
        _stop_once_it_holds_the_output(first, output)
        second = _align(db_path, dialogues, output)
        _one_line_error(second, "another starkret align run is writing", str(output), "--wait")
        code, _, err = _finish(first)
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
        first.wait(timeout=RUN_TIMEOUT_S)
    assert code == 0, err
    _assert_every_episode_once(output)
    assert not (tmp_path / "out.jsonl.starkret.lock").exists()


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks")
def test_a_second_run_with_wait_waits_then_finds_everything_done(tmp_path, db_path):
    dialogues = _write_moments(tmp_path / "moments.jsonl", EPISODES)
    output = tmp_path / "out.jsonl"
    first = _start(db_path, dialogues, output)
    second = None
    try:
        _stop_once_it_holds_the_output(first, output)
        second = _start(db_path, dialogues, output, "--wait", "--json")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not _blocked_on_a_lock(second.pid):
            assert second.poll() is None, second.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the second run never waited for the lock"
            time.sleep(0.01)
        code, _, err = _finish(first)
        assert code == 0, err
        out, err = second.communicate(timeout=RUN_TIMEOUT_S)
        assert second.returncode == 0, err
    finally:
        for run in (first, second):
            if run is not None:
                run.send_signal(signal.SIGCONT)
                run.kill()
                run.wait(timeout=RUN_TIMEOUT_S)
    summary = json.loads(out)
    assert (summary["episodes"], summary["skipped_episodes"]) == (0, EPISODES)
    _assert_every_episode_once(output)


def test_a_killed_run_releases_its_output_and_a_rerun_resumes_exactly(tmp_path, db_path):
    dialogues = _write_moments(tmp_path / "moments.jsonl", EPISODES)
    output = tmp_path / "out.jsonl"
    first = _start(db_path, dialogues, output)
    try:
        _stop_once_it_holds_the_output(first, output)
    finally:
        first.kill()  # SIGKILL: nothing runs in it any more
        first.communicate(timeout=RUN_TIMEOUT_S)
    again = _align(db_path, dialogues, output)
    assert again.returncode == 0, again.stderr
    _assert_every_episode_once(output)


# ==== Issue 20 item 5: a failed run leaves nothing, or a resumable state ====


def test_a_run_failing_before_any_result_leaves_nothing(tmp_path, db_path):
    bad = '{"episode_id": "e9", "moment_id": 3.5, "description": "x"}\n'
    dialogues = _write_moments(tmp_path / "moments.jsonl", 2, tail=bad)
    before = _snapshot(tmp_path)
    extra = ("--report", tmp_path / "r.html", "--export-images", tmp_path / "exported")
    run = _align(db_path, dialogues, tmp_path / "out.jsonl", *extra)
    _one_line_error(run, f"{dialogues}:3")
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moments.jsonl"]


def test_a_run_failing_midway_keeps_its_results_says_so_and_resumes(tmp_path, db_path):
    bad = '{"episode_id": "e9", "moment_id": 3.5, "description": "x"}\n'
    dialogues = _write_moments(tmp_path / "moments.jsonl", EPISODES, tail=bad)
    output = tmp_path / "out.jsonl"
    run = _align(db_path, dialogues, output, "--report", tmp_path / "r.html")
    _one_line_error(run, f"{dialogues}:{EPISODES + 1}", "run the same command again to resume")
    written = _episode_ids(output)
    assert written and len(written) < EPISODES  # one batch of episodes done
    state = json.loads((tmp_path / "out.jsonl.starkret").read_text())
    assert "r.html" not in state["paths"]  # never written: not recorded as ours
    _write_moments(dialogues, EPISODES)  # the input fixed
    again = _align(db_path, dialogues, output, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["skipped_episodes"] == len(written)
    _assert_every_episode_once(output)


# ==== Item 11: the report links only http(s) urls ====


def test_report_links_only_http_and_https_urls(tmp_path, db_path):
    # One episode with a moment per image, reuse per episode: every image is chosen once,
    # so every url of the source is on the page.
    n = len(HOSTILE_URLS) + len(WEB_URLS)
    dialogues = tmp_path / "moments.jsonl"
    dialogues.write_text(
        "".join(
            json.dumps({"episode_id": "e0", "moment_id": f"m{i}", "description": f"photo {i}"})
            + "\n"
            for i in range(n)
        )
    )
    report = tmp_path / "r.html"
    extra = ("--report", report, "--near-duplicate-threshold", "1")
    run = _align(db_path, dialogues, tmp_path / "out.jsonl", *extra)
    assert run.returncode == 0, run.stderr
    page = report.read_text()
    targets = [html.unescape(t) for t in re.findall(r'(?:href|src|action)="([^"]*)"', page)]
    for target in targets:
        assert target.startswith(("http://", "https://", "data:image/jpeg;base64,")), target
    assert {t for t in targets if t.startswith("http")} == set(WEB_URLS)
    assert "<script" not in page.lower()
    shown = html.unescape(page)
    for url in HOSTILE_URLS:
        assert url in shown  # shown as text, escaped


@pytest.mark.parametrize(
    ("url", "link"),
    [
        ("https://img.example/x.jpg", True),
        ("HTTP://img.example/x.jpg", True),
        ("javascript:alert(1)", False),
        ("JAVASCRIPT:alert(1)", False),
        (" javascript:alert(1)", False),
        ("\x01javascript:alert(1)", False),
        ("java\nscript:alert(1)", False),
        ("https://x\t.example", False),
        ("data:text/html,x", False),
        ("//evil.example/x", False),
        ("img/x.jpg", False),
    ],
)
def test_only_http_urls_are_web_links(url, link):
    assert report_module._is_web_link(url) is link
