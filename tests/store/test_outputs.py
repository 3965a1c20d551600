"""starkret.store.outputs: a command writes only new paths or paths its state file records,
one run per output, and a run that fails before its first result leaves nothing."""

from __future__ import annotations

import json

import pytest

from starkret.errors import OutputBusyError, OutputExistsError
from starkret.store.outputs import OutputGuard


def _guard(tmp_path, **kw) -> OutputGuard:
    guard = OutputGuard(tmp_path / "out.state", written_by="starkret test", **kw)
    guard.file(tmp_path / "out", "-o", may_be_empty=True)
    guard.file(tmp_path / "report.html", "--report")
    guard.folder(tmp_path / "export", "--export")
    return guard


def test_a_second_guard_on_the_same_output_is_busy_until_the_first_releases(tmp_path):
    with _guard(tmp_path).acquire():
        with pytest.raises(OutputBusyError, match="another starkret test run is writing"):
            _guard(tmp_path).acquire()
        assert (tmp_path / "out.state.lock").exists()
    assert not (tmp_path / "out.state.lock").exists()
    with _guard(tmp_path).acquire():
        pass


def test_declared_paths_are_recorded_and_a_rerun_may_replace_them(tmp_path):
    with _guard(tmp_path).acquire() as guard:
        guard.keep()
        (tmp_path / "out").write_text("line\n")
        (tmp_path / "report.html").write_text("page")
        (tmp_path / "export").mkdir()
        guard.record(tmp_path / "export" / "00000.tar").write_bytes(b"tar")
    state = json.loads((tmp_path / "out.state").read_text())
    assert state["paths"] == ["export", "export/00000.tar", "out", "report.html"]
    with _guard(tmp_path).acquire() as guard:
        guard.record(tmp_path / "export" / "00000.tar")  # ours: may be replaced
        (tmp_path / "export" / "00001.tar").write_bytes(b"somebody's")
        with pytest.raises(OutputExistsError, match=r"00001\.tar exists and is not recorded"):
            guard.record(tmp_path / "export" / "00001.tar")


def test_an_existing_file_or_folder_not_recorded_is_refused(tmp_path):
    (tmp_path / "report.html").write_text("my page")
    with pytest.raises(OutputExistsError, match=r"report\.html exists and is not a starkret"):
        _guard(tmp_path).acquire()
    (tmp_path / "report.html").unlink()
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "mine.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="export exists"):
        _guard(tmp_path).acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # nothing written


def test_a_failure_before_keep_removes_what_the_run_created(tmp_path):
    with pytest.raises(RuntimeError), _guard(tmp_path).acquire():
        (tmp_path / "out").write_text("")
        (tmp_path / "export").mkdir()
        raise RuntimeError("malformed input")
    assert list(tmp_path.iterdir()) == []


def test_a_path_never_written_is_not_recorded_after_the_run(tmp_path):
    with _guard(tmp_path).acquire() as guard:
        guard.keep()
        (tmp_path / "out").write_text("line\n")
    assert json.loads((tmp_path / "out.state").read_text())["paths"] == ["out"]


def test_a_format_1_state_file_still_records_its_output(tmp_path):
    (tmp_path / "out").write_text("line\n")
    state = {"written_by": "starkret test", "format": 1, "output": "out", "images": "x"}
    (tmp_path / "out.state").write_text(json.dumps(state))
    with _guard(tmp_path).acquire():
        pass
    assert "out" in json.loads((tmp_path / "out.state").read_text())["paths"]


def test_a_state_file_of_somebody_else_is_refused(tmp_path):
    (tmp_path / "out.state").write_text("my notes")
    with pytest.raises(OutputExistsError, match="is not a starkret test state file"):
        _guard(tmp_path).acquire()
    assert (tmp_path / "out.state").read_text() == "my notes"
