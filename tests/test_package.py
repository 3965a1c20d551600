"""The package imports, reports its versions, and its CLI answers."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import starkret
from starkret import _core
from starkret.cli import commands as cli
from starkret.cli import doctor


def test_package_and_core_import_with_matching_versions():
    assert starkret.__version__ == starkret.core_version == _core.__version__


def test_core_reports_a_simd_level_and_threads():
    assert _core.simd_level() in {"avx512", "avx2+fma", "sse4.1", "sse2", "sve", "neon", "scalar"}
    assert _core.available_threads() >= 1


def _packages() -> list:
    """starkret and every package below it, imported."""
    names = [i.name for i in pkgutil.walk_packages(starkret.__path__, "starkret.") if i.ispkg]
    return [starkret, *map(importlib.import_module, names)]


def test_no_exported_name_shadows_a_module():
    """``package.module`` is the module for every submodule: no name a package's
    ``__init__`` binds hides one (``from p.m import m`` would, once p.m is imported)."""
    checked = 0
    for package in _packages():
        for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
            short = info.name.rsplit(".", 1)[1]
            if short == "__main__":  # importing it runs the CLI
                continue
            before = package.__dict__.get(short)
            module = importlib.import_module(info.name)
            assert before is None or before is module, f"{package.__name__}.{short}: {before!r}"
            assert getattr(package, short) is module, f"{package.__name__}.{short}"
            checked += 1
    assert checked > 40


def test_the_resize_budget_is_where_the_readme_says():
    # The README once named starkret.preprocess.MAX_RESIZED_PIXELS: starkret.preprocess is
    # the function, so that raised AttributeError.
    from starkret.ingest import preprocess

    assert preprocess.MAX_RESIZED_PIXELS == 1 << 26


def test_version_flag_prints_the_version():
    out = subprocess.run(
        [sys.executable, "-m", "starkret", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.strip() == f"starkret {starkret.__version__}"


def test_doctor_reports_every_component_and_exits_zero(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("starkret", "rust core", "torch", "open_clip", "faiss", "autofaiss", "tiny model"):
        assert name in out
    assert "SIMD" in out and "CUDA" in out
    assert out.strip().endswith("starkret is ready")


def test_doctor_turns_a_broken_component_into_a_failed_line():
    def broken() -> str:
        raise ImportError("no module named 'faiss'")

    check = doctor._guard("faiss", True, broken)
    assert not check.ok
    assert "FAIL" in check.line() and "no module named" in check.line()


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "doctor" in capsys.readouterr().out


def test_bench_runner_prints_a_ratio_table(capsys):
    assert cli.main(["bench", "--", "--quick", "--only", "embedder"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: cpu")
    assert "encode_images" in out and "ratio" in out


def test_readme_demo_runs_offline(tmp_path):
    demo = Path(__file__).resolve().parents[1] / "scripts" / "demo.py"
    run = subprocess.run(
        [sys.executable, str(demo)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert "SMALL CLIP" in run.stdout and "ViT-L-14-336-quickgelu --pretrained openai" in run.stdout
    assert "embedded 119 images, failed 1 (truncated 1)" in run.stdout
    assert "skipped as done 3" in run.stdout
    # starkret-mini finds the planted images: the right one first, a foreign one nowhere.
    lines = run.stdout.splitlines()
    first_hit = lines[lines.index("search   'three large red stars on a yellow background':") + 1]
    assert "cc12m/000000003" in first_hit
    assert "below_threshold -" in next(line for line in lines if "golden retriever" in line)
    eval_line = next(line for line in lines if line.startswith("eval "))
    assert float(eval_line.split()[2]) >= 50  # R@1 in %, chance is 0.6
    assert (tmp_path / "demo-output" / "db" / "chartqa" / "starkret.json").exists()
    # The keys the demo prints are the ones aligned.jsonl stores (images_key: url:UUID for
    # cc12m, a UUID for chartqa); it used to print url:URL keys the file does not hold.
    stored = set()
    for line in (tmp_path / "demo-output" / "aligned.jsonl").read_text().splitlines():
        episode = json.loads(line)
        for name, keys in episode.items():
            if name.endswith(":images_key"):
                stored.update(k for k in keys if isinstance(k, str) and k)
    printed = [line.split()[2] for line in lines if line.startswith("  stark-demo-")]
    printed = [key for key in printed if key != "-"]
    assert len(printed) == 9 and set(printed) <= stored, (printed, stored)
