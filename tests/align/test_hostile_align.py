"""`starkret align` on hostile inputs and outputs: it never destroys a file it did not
write, never truncates more than a cut last line, and every malformed line is one
readable error (exit 2) naming its file and line, never a traceback or an abort."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import starkret
from starkret.align.aligner import MAX_IMAGES_PER_MOMENT
from starkret.align.dialogue import align_file
from starkret.align.formats import FormatError
from starkret.cli import commands as cli
from starkret.index.db import ImageDB
from starkret.testing import write_source

TEXTS = ["a golden retriever on a beach", "a red bicycle", "a bowl of ramen"]


@pytest.fixture(scope="module")
def db_path(tmp_path_factory, tiny_embedder):
    folder = tmp_path_factory.mktemp("db")
    planted = tiny_embedder.encode_texts(TEXTS, dtype="float32")
    noise = np.random.default_rng(0).standard_normal((12, tiny_embedder.dim)).astype(np.float32)
    write_source(folder / "cc12m", "cc12m", np.vstack([planted, noise]))
    return folder


@pytest.fixture(scope="module")
def db(db_path, tiny_embedder):
    return ImageDB.open(db_path, embedder=tiny_embedder)


@pytest.fixture
def run_align(db, monkeypatch, capsys):
    """``starkret align`` in this process (the DB opened once): (exit code, stdout, stderr)."""
    monkeypatch.setattr(ImageDB, "open", classmethod(lambda cls, path, **kw: db))

    def run(*args: str) -> tuple[int, str, str]:
        code = cli.main(["align", "db", *map(str, args), "--no-progress", "--min-score", "-1"])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _moment(i: int, episode: str = "e1", **extra) -> dict:
    return {
        "episode_id": episode,
        "moment_id": f"m{i}",
        "description": TEXTS[i % 3],
        **extra,
    }


def _write_moments(path, moments) -> None:
    path.write_text("".join(json.dumps(m) + "\n" for m in moments))


def _one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert err.strip() and "\n" not in err.strip(), err
    assert "Traceback" not in err


# ==== Item 4: outputs ====


@pytest.mark.parametrize("alias", ["same path", "symlink", "hard link"])
def test_align_refuses_an_output_that_is_the_input(tmp_path, run_align, alias):
    source = tmp_path / "in.jsonl"
    _write_moments(source, [_moment(0), _moment(1)])
    before = source.read_bytes()
    output = source
    if alias == "symlink":
        output = tmp_path / "link.jsonl"
        output.symlink_to(source)
    elif alias == "hard link":
        output = tmp_path / "hard.jsonl"
        os.link(source, output)
    code, _, err = run_align(source, "-o", output)
    _one_line_error(code, err)
    assert "same file" in err and str(source) in err
    assert source.read_bytes() == before


def test_align_refuses_an_existing_file_it_did_not_write(tmp_path, run_align):
    source = tmp_path / "in.jsonl"
    _write_moments(source, [_moment(0)])
    precious = tmp_path / "notes.jsonl"
    precious.write_text('{"my": "data"}\nnot even json\n')
    code, _, err = run_align(source, "-o", precious)
    _one_line_error(code, err)
    assert "is not a starkret align output (no notes.jsonl.starkret" in err
    assert str(precious) in err
    assert precious.read_text() == '{"my": "data"}\nnot even json\n'
    # the same for the image records file beside the output
    images = tmp_path / "out.jsonl.images.jsonl"
    images.write_text("somebody's list\n")
    code, _, err = run_align(source, "-o", tmp_path / "out.jsonl")
    _one_line_error(code, err)
    assert str(images) in err and images.read_text() == "somebody's list\n"
    assert not (tmp_path / "out.jsonl").exists()


def test_align_writes_an_empty_existing_file_and_marks_its_output(tmp_path, run_align):
    source = tmp_path / "in.jsonl"
    _write_moments(source, [_moment(0)])
    output = tmp_path / "out.jsonl"
    output.touch()  # e.g. made by mktemp: nothing to lose
    code, _, err = run_align(source, "-o", output)
    assert code == 0, err
    state = json.loads((tmp_path / "out.jsonl.starkret").read_text())
    assert state["written_by"] == "starkret align"
    assert json.loads(output.read_text())["episode_id"] == "e1"


def test_resume_drops_only_a_damaged_last_line(tmp_path, run_align):
    source = tmp_path / "in.jsonl"
    _write_moments(source, [_moment(0, "e1"), _moment(1, "e2"), _moment(2, "e3")])
    output = tmp_path / "out.jsonl"
    assert run_align(source, "-o", output)[0] == 0
    lines = output.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    for damaged_last in ('{"episode_id": "e3", "alignm', '{"no_episode": 1}\n', "garbage\n"):
        output.write_text("".join(lines[:2]) + damaged_last)
        code, out, err = run_align(source, "-o", output)
        assert code == 0, err
        assert "(2 already done)" in out
        assert output.read_text().splitlines(keepends=True)[:2] == lines[:2]
        assert [json.loads(x)["episode_id"] for x in output.read_text().splitlines()] == [
            "e1",
            "e2",
            "e3",
        ]


def test_resume_refuses_a_damaged_middle_line_and_truncates_nothing(tmp_path, run_align):
    source = tmp_path / "in.jsonl"
    _write_moments(source, [_moment(0, "e1"), _moment(1, "e2"), _moment(2, "e3")])
    output = tmp_path / "out.jsonl"
    assert run_align(source, "-o", output)[0] == 0
    lines = output.read_text().splitlines(keepends=True)
    damaged = lines[0] + "{not json\n" + lines[2]
    output.write_text(damaged)
    code, _, err = run_align(source, "-o", output)
    _one_line_error(code, err)
    assert f"{output}:2" in err
    assert output.read_text() == damaged
    with pytest.raises(FormatError, match=r"out.jsonl:2: .*nothing was changed"):
        align_file(starkret.ImageDB, source, output, aligner=object(), progress=False)
    assert output.read_text() == damaged


def test_resume_drops_a_cut_line_of_the_image_records_instead_of_gluing_to_it(tmp_path, run_align):
    source = tmp_path / "in.jsonl"
    _write_moments(source, [_moment(0, "e1"), _moment(1, "e2")])
    output = tmp_path / "out.jsonl"
    images = tmp_path / "out.jsonl.images.jsonl"
    assert run_align(source, "-o", output)[0] == 0
    first = output.read_text().splitlines(keepends=True)[0]
    records = images.read_text().splitlines(keepends=True)
    # killed while writing episode e2: its output line and its image record are cut
    output.write_text(first)
    images.write_text(records[0] + records[1][:10])
    assert run_align(source, "-o", output)[0] == 0
    assert [json.loads(x)["key"] for x in images.read_text().splitlines()] == [
        json.loads(r)["key"] for r in records
    ]


def test_report_never_overwrites_a_file_it_did_not_write(tmp_path, run_align):
    source = tmp_path / "in.jsonl"
    _write_moments(source, [_moment(0)])
    page = tmp_path / "index.html"
    page.write_text("<html>my homepage</html>")
    code, _, err = run_align(source, "-o", tmp_path / "out.jsonl", "--report", page)
    _one_line_error(code, err)
    assert str(page) in err and page.read_text() == "<html>my homepage</html>"
    assert not (tmp_path / "out.jsonl").exists()  # refused before any work
    code, _, err = run_align(source, "-o", tmp_path / "out.jsonl", "--report", source)
    _one_line_error(code, err)
    assert "same file" in err
    report = tmp_path / "report.html"
    assert run_align(source, "-o", tmp_path / "out.jsonl", "--report", report)[0] == 0
    first = report.read_text()
    assert first.startswith("<!doctype html>")
    # a rerun on the same output replaces the report its state file records ...
    assert run_align(source, "-o", tmp_path / "out.jsonl", "--report", report)[0] == 0
    assert report.read_text().startswith("<!doctype html>")
    # ... another output's run did not write it, so refuses it (issue 24 item 1)
    code, _, err = run_align(source, "-o", tmp_path / "o2.jsonl", "--report", report)
    _one_line_error(code, err)
    assert str(report) in err and "o2.jsonl.starkret" in err


# ==== Item 5: malformed dialogue files ====


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


_STARK_OK = {
    "episode_id": "ok",
    "sessions": [
        {
            "session": 1,
            "dialogue": [
                {"speaker": "A", "utterance": "hi", "sharing_info": {"image_description": "x"}}
            ],
        }
    ],
}
_FLAT_OK = {
    "unique_id": "ok",
    "session1:dialogue": ["hi", "look"],
    "session1:speakers": ["A", "B"],
    "session1:image_descriptions": ["", "a cat"],
}


def _stark(**changes) -> str:
    episode = json.loads(json.dumps(_STARK_OK))
    episode["episode_id"] = "bad"
    session = episode["sessions"][0]
    turn = session["dialogue"][0]
    for key, value in changes.items():
        if key in ("speaker", "utterance", "sharing_info"):
            turn[key] = value
        elif key == "image_description" or key == "image_source":
            turn["sharing_info"][key] = value
        elif key in ("session", "dialogue"):
            session[key] = value
        else:
            episode[key] = value
    return json.dumps(episode)


def _flat(**changes) -> str:
    episode = {**_FLAT_OK, "unique_id": "bad"}
    episode.update({k.replace("__", ":"): v for k, v in changes.items()})
    return json.dumps(episode)


def _plain(**changes) -> str:
    moment = {"episode_id": "e2", "moment_id": "m9", "description": "a cat", **changes}
    return json.dumps({k: v for k, v in moment.items() if v is not ...})


def _raw_plain(field: str, raw: str) -> str:
    """A moment whose ``field`` is the raw JSON text ``raw`` (which json.dumps cannot make)."""
    return (
        '{"episode_id": "e2", "moment_id": "m9", "description": "a cat", "'
        + field
        + '": '
        + raw
        + "}"
    )


def _malformed_files() -> list[tuple[str, str, bytes]]:
    """(name, format, line 2 of the file) for every mutant: line 1 is a good record."""
    cases: list[tuple[str, str, str | bytes]] = []
    for i, k in enumerate(
        [0, -1, 10**9, MAX_IMAGES_PER_MOMENT + 1, 1.5, "2", True, None, [], {}, 10**30]
    ):
        cases.append((f"k-{i}", "plain", _plain(k=k)))
    cases.append(("k-inf", "plain", _raw_plain("k", "1e400")))
    cases.append(("k-nan", "plain", _raw_plain("k", "NaN")))
    cases.append(("k-digits", "plain", _raw_plain("k", "9" * 5000)))
    for i, value in enumerate(["1", 1.5, [], {}, True, None]):
        cases.append((f"session-{i}", "plain", _plain(session=value)))
    for i, value in enumerate([5, None, [], {"a": 1}, True, ["x"]]):
        cases.append((f"description-{i}", "plain", _plain(description=value)))
    for field in ("episode_id", "moment_id"):
        for i, value in enumerate([[], {}, None, 1.5, True]):
            cases.append((f"{field}-{i}", "plain", _plain(**{field: value})))
        cases.append((f"{field}-missing", "plain", _plain(**{field: ...})))
    cases.append(("description-missing", "plain", _plain(description=...)))
    for i, record in enumerate(["[1]", '"text"', "5", "null", "true", "NaN"]):
        cases.append((f"not-object-{i}", "plain", record))
    for i, text in enumerate(
        ['{"episode_id": "e2", ', '{"a": 1,}', "{'a': 1}", '{"a": 1} {"b": 2}', "}"]
    ):
        cases.append((f"invalid-json-{i}", "plain", text))
    cases.append(("deep-line", "plain", _deep(100_000)))
    cases.append(("deep-description", "plain", _raw_plain("description", _deep(50_000))))
    cases.append(("deep-object", "plain", '{"a":' * 20_000 + "1" + "}" * 20_000))
    cases.append(("deep-990", "plain", _raw_plain("session", _deep(985))))
    cases.append(("not-utf8", "plain", _plain().encode()[:-3] + b'\xff\xfe"}'))
    cases.append(("surrogate", "plain", _raw_plain("description", '"\\ud800 cat"')))
    cases.append(("nul", "plain", b"\x00\x00\x00"))

    for i, changes in enumerate(
        [
            {"sessions": "no"},
            {"sessions": [5]},
            {"dialogue": "no"},
            {"dialogue": [5]},
            {"sharing_info": [1]},
            {"image_description": 5},
            {"image_description": ["a", "b"]},
            {"image_description": {"x": 1}},
            {"image_source": 7},
            {"session": "1"},
            {"session": 1.5},
            {"session": None},
            {"episode_id": ["x"]},
            {"episode_id": {"x": 1}},
            {"episode_id": ""},
            {"utterance": ["x"]},
            {"utterance": {"deep": json.loads(_deep(900))}},
        ]
    ):
        cases.append((f"stark-{i}", "stark", _stark(**changes)))
    cases.append(("stark-deep", "stark", '{"episode_id": "x", "sessions": ' + _deep(9999) + "}"))
    for i, changes in enumerate(
        [
            {"session1__dialogue": "no"},
            {"session1__speakers": ["A"]},
            {"session1__image_descriptions": ["", 5]},
            {"session1__image_descriptions": ["", ["a", "b"]]},
            {"session1__image_sources": ["", {"x": 1}]},
            {"session1__dialogue": [{"a": 1}, "x"]},
            {"unique_id": {"x": 1}},
            {"unique_id": 1.5},
            {"session1__image_descriptions": "a cat"},
        ]
    ):
        cases.append((f"flat-{i}", "flat", _flat(**changes)))
    huge_session = {"unique_id": "x", f"session{'9' * 5000}:dialogue": ["a"]}
    cases.append(("flat-session-digits", "flat", json.dumps(huge_session)))

    files = []
    for name, kind, line in cases:
        good = {"plain": _plain(episode_id="e1"), "stark": json.dumps(_STARK_OK)}
        first = good.get(kind, json.dumps(_FLAT_OK))
        data = line if isinstance(line, bytes) else line.encode()
        files.append((name, kind, first.encode() + b"\n" + data + b"\n"))
    # JSON list files: the bad part is on line 3
    good = json.dumps(_STARK_OK).encode()
    for name, bad in [
        ("list-number", b"5"),
        ("list-cut", b'{"episode_id": '),
        ("list-deep", _deep(50_000).encode()),
        ("list-not-utf8", b'"\xc3\x28"'),
        ("list-bad-description", _stark(image_description=3).encode()),
    ]:
        files.append((name, "list", b"[\n" + good + b",\n" + bad + b"\n]\n"))
    return files


MALFORMED = _malformed_files()


def test_there_are_at_least_sixty_malformed_dialogue_files():
    assert len(MALFORMED) >= 60


@pytest.mark.parametrize(("name", "kind", "data"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_every_malformed_dialogue_file_is_one_error_line_naming_file_and_line(
    tmp_path, run_align, name, kind, data
):
    source = tmp_path / f"{name}.jsonl"
    source.write_bytes(data)
    code, _, err = run_align(source, "-o", tmp_path / "out.jsonl")
    _one_line_error(code, err)
    assert str(source) in err
    if kind == "list":
        assert re.search(f"{re.escape(str(source))}:[34]: |episode #1", err), err
    else:
        assert f"{source}:2" in err, err


def test_aligner_api_rejects_a_k_out_of_range(db):
    aligner = starkret.Aligner(db)
    for k in (0, -3, MAX_IMAGES_PER_MOMENT + 1, 10**9, True, 2.0, "2"):
        with pytest.raises(ValueError, match="k must be an integer from 1 to"):
            aligner.align([{"episode_id": "e", "moment_id": "m", "description": "x", "k": k}])
    ok = aligner.align(
        [{"episode_id": "e", "moment_id": "m", "description": "x", "k": np.int64(2)}]
    )
    assert len(ok) == 1


@pytest.mark.parametrize(
    ("what", "line"),
    [
        ("k", _plain(k=1_000_000_000)),
        ("nesting", _raw_plain("description", _deep(200_000))),
    ],
)
def test_align_command_exits_2_without_a_traceback_or_abort(tmp_path, db_path, what, line):
    source = tmp_path / "moments.jsonl"
    source.write_text(_plain(episode_id="e1") + "\n" + line + "\n")
    command = [sys.executable, "-m", "starkret", "align", str(db_path), str(source)]
    run = subprocess.run(
        [*command, "-o", str(tmp_path / "out.jsonl"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=280,
    )
    _one_line_error(run.returncode, run.stderr)
    assert f"{source}:2" in run.stderr
