"""Every fenced Python and shell example of README.md and docs/*.md runs, offline.

The examples are written to run inside the folder ``make demo`` leaves (``demo-output/``:
generated cc12m-like shards and a chartqa-like image folder under ``sources/``, the DB
embedded with the bundled starkret-mini under ``db/``) with the repository's
``examples/`` beside it (``../examples/...``). The test builds that folder once with
``scripts/demo.py``, then gives every page a fresh copy of it:

* ``bash``, ``sh`` and ``shell`` blocks run one by one with ``bash -e`` in that copy, in
  page order, with ``starkret``, ``embed-shards`` and ``python`` on the PATH meaning this
  interpreter's starkret;
* then the page's ``python`` blocks run in order in one namespace (one process), in the
  same copy, so they may use what the page's shell blocks wrote.

A block that cannot run here (GPU, network, a Ray cluster, ``make demo`` itself) says so:
its info string has ``no-run`` (```` ```bash no-run ````) or the line before it is an
``<!-- no-run -->`` comment. Those are counted and printed, and kept few. Other info
strings (``console``, ``text``, none) are output or layouts, not examples.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell")
RUNNABLE = ("python", *SHELLS)
NO_RUN = "no-run"
#: Most blocks of all pages together that may be marked no-run.
MAX_NO_RUN = 12
BLOCK_TIMEOUT_S = 120
DEMO_TIMEOUT_S = 300

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)(?P<info>[^`]*)$")
_NO_RUN_COMMENT = re.compile(r"^\s*<!--\s*no-run\b.*-->\s*$")


@dataclass
class Block:
    """One fenced code block of a page."""

    page: str
    line: int  # the line of its opening fence, 1-based
    lang: str
    code: str
    run: bool


def extract_blocks(text: str, page: str = "<page>") -> list[Block]:
    """The fenced blocks of a markdown ``text`` whose language is one we run, in order.

    ``run`` is False for a block marked ``no-run`` (info string or an ``<!-- no-run -->``
    comment on the last non-blank line before it). Indented fences (inside list items)
    lose their indentation.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    previous = ""
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        words = opening["info"].split()
        start = i
        body = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and not lines[i].strip().strip("`")
        ):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        lang = words[0].lower() if words else ""
        if lang in RUNNABLE:
            marked = NO_RUN in words[1:] or bool(_NO_RUN_COMMENT.match(previous))
            blocks.append(Block(page, start + 1, lang, "\n".join(body) + "\n", not marked))
        previous = ""
    return blocks


def test_extract_blocks_reads_languages_markers_and_indentation():
    text = textwrap.dedent(
        """\
        # Title
        ```python
        x = 1
        ```
        - a list item:
          ```bash
          echo hi
          ```
        <!-- no-run: needs a GPU -->

        ```sh
        nvidia-smi
        ```
        ```bash no-run
        make demo
        ```
        ```console
        $ starkret doctor
        ```
        ```text
        a layout
        ```
        """
    )
    blocks = extract_blocks(text, "t.md")
    assert [(b.lang, b.line, b.run, b.code) for b in blocks] == [
        ("python", 2, True, "x = 1\n"),
        ("bash", 6, True, "echo hi\n"),
        ("sh", 11, False, "nvidia-smi\n"),
        ("bash", 14, False, "make demo\n"),
    ]


# ==== The demo's folder, once per session ====


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """What ``make demo`` leaves: ``demo-output/`` (sources, DB, aligned output)."""
    base = tmp_path_factory.mktemp("docs-demo")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        env=_env(None),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base / "demo-output"


def _env(bin_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    # The examples run beside the test suite on small machines: one torch thread each.
    env.setdefault("OMP_NUM_THREADS", "1")
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def _commands(bin_dir: Path) -> None:
    """``starkret``, ``embed-shards`` and ``python`` as this interpreter runs them."""
    bin_dir.mkdir()
    py = sys.executable
    scripts = {
        "starkret": f'exec "{py}" -m starkret "$@"',
        "embed-shards": (
            f'exec "{py}" -c "import sys; from starkret.cli.commands import embed_shards_main;'
            f' sys.exit(embed_shards_main())" "$@"'
        ),
        "python": f'exec "{py}" "$@"',
        "python3": f'exec "{py}" "$@"',
    }
    for name, line in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{line}\n")
        path.chmod(0o755)


# ==== Running a page ====

_PYTHON_RUNNER = """
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
namespace = {"__name__": "__docs__"}
for block in blocks:
    where = f"{block['page']}:{block['line']}"
    print(f"---- {where}", flush=True)
    try:
        exec(compile(block["code"], where, "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the python block at {where}", flush=True)
        sys.exit(1)
"""


def _run_page(page: Path, demo: Path, work: Path) -> tuple[int, list[Block]]:
    blocks = extract_blocks(page.read_text(), str(page.relative_to(ROOT)))
    skipped = [b for b in blocks if not b.run]
    runnable = [b for b in blocks if b.run]
    if not runnable:
        return 0, skipped
    folder = work / "demo-output"
    shutil.copytree(demo, folder, symlinks=True)
    shutil.copytree(ROOT / "examples", work / "examples")
    _commands(work / "bin")
    env = _env(work / "bin")
    for block in (b for b in runnable if b.lang in SHELLS):
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block.code],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )
        assert proc.returncode == 0, (
            f"the {block.lang} block at {block.page}:{block.line} exited {proc.returncode}\n"
            f"{block.code}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
        )
    python = [b.__dict__ for b in runnable if b.lang == "python"]
    if python:
        proc = subprocess.run(
            [sys.executable, "-c", _PYTHON_RUNNER],
            input=json.dumps(python),
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S * 2,
        )
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return len(runnable), skipped


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page, demo_folder, tmp_path, capsys):
    ran, skipped = _run_page(page, demo_folder, tmp_path)
    with capsys.disabled():
        where = ", ".join(f"{b.lang} at line {b.line}" for b in skipped) or "none"
        print(f"\n{page.relative_to(ROOT)}: {ran} example(s) ran, {len(skipped)} no-run: {where}")


def test_no_run_blocks_are_few(capsys):
    skipped = [
        b for page in PAGES for b in extract_blocks(page.read_text(), page.name) if not b.run
    ]
    with capsys.disabled():
        where = ", ".join(f"{b.page}:{b.line}" for b in skipped)
        print(f"\nno-run blocks: {len(skipped)} ({where})")
    assert len(skipped) <= MAX_NO_RUN, "most examples must run: mark only GPU, network, Ray"


def test_every_page_exists_and_the_readme_is_a_front_page():
    names = {p.name for p in PAGES}
    for name in ("ingest", "index", "align", "serve", "models", "development", "architecture"):
        assert f"{name}.md" in names
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
