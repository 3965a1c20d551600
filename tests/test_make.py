"""The README's commands do what it says, and install only what it says: `make demo`
no browser, `make test` no fuzzing toolchain, `make fuzz` the fuzzing; CI runs exactly
the README's test commands (plus the autofaiss venv)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(target: str) -> str:
    """The commands `make TARGET` runs, without running them."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    run = subprocess.run(
        ["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def _readme_commands() -> list[str]:
    """The `make ...` lines of the README's first shell block (the commands it promises)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash no-run\n(.*?)```", readme, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("make")]


def test_the_demo_installs_no_browser():
    commands = _dry_run("demo")
    assert "browser.sh" not in commands and "chromium" not in commands
    assert "chromium" not in (ROOT / "scripts" / "bootstrap.sh").read_text()


def test_make_test_installs_the_browser_but_builds_no_fuzzing_toolchain():
    commands = _dry_run("test")
    assert "scripts/browser.sh" in commands and "scripts/test.sh" in commands
    assert "fuzz" not in commands
    script = (ROOT / "scripts" / "test.sh").read_text().splitlines()
    fuzzing = re.compile(r"fuzz\.sh|cargo (\+nightly )?fuzz")
    assert not [line for line in script if fuzzing.search(line) and not line.startswith("#")]


def test_make_fuzz_runs_every_target_briefly_by_default():
    assert "FUZZ_RUNS=brief FUZZ_SEED=1 bash scripts/fuzz.sh" in _dry_run("fuzz")


def test_ci_runs_exactly_the_readmes_test_commands():
    # the README's two commands; fuzzing is its own target, which the README names and CI runs
    assert _readme_commands() == ["make demo", "make test"]
    readme = (ROOT / "README.md").read_text()
    assert "`make fuzz`" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line.startswith("make")] == [
        "make test",
        "make fuzz",
    ]
