"""starkret.errors: one hierarchy for user errors, raised by the API and the Rust core,
mapped by the CLI to one line and exit 2 (anything else is a bug and keeps its traceback)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import starkret
from starkret import errors
from starkret.cli import commands
from starkret.testing import write_source

DIM = 8


def _unit(rows: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def db_dir(tmp_path) -> Path:
    write_source(tmp_path / "db" / "cc12m", "cc12m", _unit(20))
    return tmp_path / "db"


# ==== The hierarchy ====


def _public_exception_classes() -> dict[str, type]:
    """Every public exception class defined anywhere in the starkret package."""
    found = {}
    for info in pkgutil.walk_packages(starkret.__path__, "starkret."):
        if info.name.endswith("__main__"):  # importing it runs the CLI
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional dependency (ray, fastapi) is not installed
            continue
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__.startswith("starkret")
                and not name.startswith("_")
            ):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def test_every_public_exception_derives_from_starkret_error_and_is_exported():
    classes = _public_exception_classes()
    assert len(classes) >= 10
    for qualname, cls in classes.items():
        assert issubclass(cls, starkret.StarkretError), qualname
        assert getattr(starkret, cls.__name__) is cls, qualname
        assert cls.__name__ in starkret.__all__, qualname
        assert cls.__doc__ and len(cls.__doc__.split()) >= 8, qualname  # says when


def test_the_old_names_are_the_same_classes_with_their_old_bases():
    from starkret.align.formats import FormatError
    from starkret.ingest.localworkers import WorkersFailed
    from starkret.serve.schema import RequestError
    from starkret.store.claims import FolderLockError

    assert FormatError is starkret.FormatError and issubclass(FormatError, ValueError)
    assert WorkersFailed is starkret.WorkersFailed and issubclass(WorkersFailed, RuntimeError)
    assert RequestError is starkret.RequestError and issubclass(RequestError, ValueError)
    assert RequestError(404, "no such image").status == 404
    assert FolderLockError is starkret.FolderLockError and issubclass(FolderLockError, OSError)
    # Callers catching the built-in classes keep working.
    assert issubclass(starkret.InvalidInputError, ValueError)
    assert issubclass(starkret.InvalidTypeError, TypeError)
    assert issubclass(starkret.NotFoundError, FileNotFoundError)
    assert issubclass(starkret.MissingIndexError, FileNotFoundError)
    assert issubclass(starkret.MissingIndexError, ValueError)
    assert issubclass(starkret.MissingDependencyError, ImportError)


def test_errors_is_a_leaf_module():
    tree = ast.parse(Path(errors.__file__).read_text())
    imported = [
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in getattr(node, "names", [])
    ]
    assert not [m for m in imported if m.startswith("starkret")]


# ==== The public API raises them ====


def test_opening_a_missing_db_folder_is_not_found(tmp_path):
    with pytest.raises(starkret.NotFoundError, match="does not exist"):
        starkret.ImageDB.open(tmp_path / "nothing")


def test_opening_a_folder_without_embedded_sources_is_a_missing_index(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(starkret.MissingIndexError, match="no embedded sources"):
        starkret.ImageDB.open(tmp_path / "empty")


def test_sources_of_different_dimensions_are_incompatible(tmp_path):
    write_source(tmp_path / "db" / "a", "a", _unit(5, dim=8))
    write_source(tmp_path / "db" / "b", "b", _unit(5, dim=16))
    with pytest.raises(starkret.IncompatibleSourcesError, match="cannot be searched together"):
        starkret.ImageDB.open(tmp_path / "db")


def test_build_index_on_a_folder_without_embeddings_is_a_missing_index(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(starkret.MissingIndexError, match=str(tmp_path / "src")):
        starkret.build_index(tmp_path / "src")


def test_search_of_an_unknown_source_is_invalid_input(db_dir):
    db = starkret.ImageDB.open(db_dir)
    with pytest.raises(starkret.InvalidInputError, match="unknown source 'nope'"):
        db.search(_unit(1), k=2, sources=["nope"])
    with pytest.raises(starkret.InvalidTypeError):
        db.search("a single string", k=2)


def test_malformed_dialogue_and_moment_lines_are_format_errors(db_dir, tmp_path):
    dialogue = tmp_path / "d.jsonl"
    dialogue.write_text('{"episode_id": "e1", "sessions": []}\n{not json\n')
    with pytest.raises(starkret.FormatError, match=r"d\.jsonl:2: invalid JSON"):
        list(starkret.formats.read_episodes(dialogue))
    moments = tmp_path / "m.jsonl"
    moments.write_text(
        '{"episode_id": "e1", "moment_id": "m1", "description": "a dog"}\n'
        '{"episode_id": "e1", "moment_id": "m2"}\n'
    )
    from starkret.align.dialogue import align_file

    db = starkret.ImageDB.open(db_dir)
    with pytest.raises(starkret.FormatError, match=r"m\.jsonl:2: moment lacks description"):
        align_file(db, moments, tmp_path / "out.jsonl")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda q, db: starkret.topk(q, db, k=0), starkret.InvalidInputError),
        (lambda q, db: starkret.topk(q, db, k="3"), starkret.InvalidTypeError),
        (lambda q, db: starkret.topk(q[:, :4], db, k=1), starkret.InvalidInputError),
        (lambda q, db: starkret.topk(q, db, k=1, exclude=3), starkret.InvalidTypeError),
        (lambda q, db: starkret.preprocess([b"x"], mode="turbo"), starkret.InvalidInputError),
        (lambda q, db: starkret.preprocess(b"x"), starkret.InvalidTypeError),
        (lambda q, db: starkret.Aligner(None, reuse="sometimes"), starkret.InvalidInputError),
    ],
)
def test_bad_arguments_are_invalid_input(call, error):
    queries, database = _unit(2), _unit(10).astype(np.float16)
    with pytest.raises(error):
        call(queries, database)


def test_an_embed_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(starkret.OutputExistsError, match="is not a folder"):
        starkret.embed(tmp_path / "in", tmp_path / "out", source_name="x")
    assert (tmp_path / "out").read_text() == "mine"


def test_a_damaged_table_input_is_invalid_input_naming_it(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"PAR1 but not parquet")
    with pytest.raises(starkret.InvalidInputError, match=r"t\.parquet: not a readable table"):
        starkret.embed(tmp_path / "t.parquet", tmp_path / "out", source_name="x")


# ==== Errors from the Rust core ====


def test_rust_rejections_are_starkret_errors_with_the_rust_message(tmp_path):
    with pytest.raises(starkret.NotFoundError, match=r"nope\.tar"):
        starkret.read_shards(tmp_path / "nope.tar")
    with pytest.raises(starkret.InvalidInputError, match=r"unbalanced '\{'"):
        starkret.read_shards(str(tmp_path / "{00..01.tar"))
    # k passes the Python checks; the Rust core refuses the result's size.
    with pytest.raises(starkret.InvalidInputError, match="do not fit in memory"):
        starkret.topk(_unit(2), _unit(10).astype(np.float16), k=2**62)
    from starkret import _core

    with pytest.raises(starkret.InvalidInputError, match="differ in shape"):
        _core.merge_topk(np.zeros((2, 3), np.float32), np.zeros((2, 2), np.int64), 3)
    with pytest.raises(starkret.InvalidTypeError, match="part 0 must be"):
        _core.topk_search_parts(np.zeros((1, 2), np.float32), [np.zeros((2, 2))], 1)


# ==== The CLI ====


def test_cli_prints_one_line_and_exits_2_for_a_starkret_error(tmp_path, capsys):
    assert commands.main(["build-index", str(tmp_path / "nothing"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("starkret build-index: error: no embedded sources under ")


@pytest.mark.parametrize("bug", [TypeError, ValueError, ImportError])
def test_cli_keeps_the_traceback_of_an_internal_error(db_dir, capsys, monkeypatch, bug):
    def broken(*args, **kwargs):
        raise bug("an internal mistake")

    monkeypatch.setattr("starkret.index.build.build_index", broken)
    with pytest.raises(bug, match="an internal mistake"):
        commands.main(["build-index", str(db_dir), "-q"])
    assert "error:" not in capsys.readouterr().err


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_python_m_starkret_exits_2_with_one_line(tmp_path):
    done = _run("-m", "starkret", "search", str(tmp_path / "nothing"), "a dog")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"starkret search: error: no embedded sources under {tmp_path / 'nothing'}: "
        "it does not exist"
    ]
    assert done.stdout == ""


def test_an_internal_error_in_a_real_process_exits_1_with_its_traceback(db_dir):
    script = (
        "import sys, starkret.index.build as b\n"
        "def broken(*a, **k): raise ValueError('an internal mistake')\n"
        "b.build_index = broken\n"
        "from starkret.cli.commands import main\n"
        f"sys.exit(main(['build-index', {json.dumps(str(db_dir))}, '-q']))\n"
    )
    done = _run("-c", script)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("ValueError: an internal mistake")


def test_serve_without_its_extra_is_one_line_but_a_broken_import_is_a_bug(
    db_dir, capsys, monkeypatch
):
    monkeypatch.delitem(sys.modules, "starkret.serve.app", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    assert commands.main(["serve", str(db_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'starkret[serve]'" in err
    monkeypatch.setitem(sys.modules, "starkret.serve.app", None)  # our own module broken
    with pytest.raises(ModuleNotFoundError, match=r"starkret\.serve\.app"):
        commands.main(["serve", str(db_dir)])
