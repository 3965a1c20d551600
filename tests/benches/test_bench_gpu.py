"""benches/gpu.sh and benches/bench_gpu.py: the GPU benchmark, run in its CPU smoke mode.

No GPU in CI: the smoke mode runs the same code with starkret-tiny on the CPU, so the
script is known to work (and to write every column docs/development.md describes) before a GPU slot.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benches" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(markdown: str, first_title: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table whose header starts with ``first_title``: titles and rows."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_title} |"))
    titles = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return titles, rows


def test_gpu_sh_smoke_writes_both_tables_with_every_column(tmp_path, bench_gpu):
    out = tmp_path / "out"
    env = dict(os.environ)
    env.update(
        OUT=str(out),
        PYTHON=sys.executable,
        STARKRET_WHEELS=str(tmp_path / "no-wheels"),  # use the starkret under test
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benches" / "gpu.sh"), "--smoke", "--budget", "240"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("gpu.md", "gpu.json", "gpu-tests.txt", "gpu-log.txt"):
        assert (out / name).is_file(), name
    markdown = (out / "gpu.md").read_text()

    titles, rows = _table(markdown, "setting")
    assert titles == [title for _, title in bench_gpu.MODEL_COLUMNS]
    default = [r for r in rows if r[0] == "eager-fp32 (default)"]
    assert [r[1] for r in default] == ["8", "16"]
    for row in default:
        assert len(row) == len(titles)
        assert row[-1] == "ok"
        assert float(row[2].replace(",", "")) > 0  # img/s
        assert float(row[7]) >= 0.9999  # fp32 against the fp32 reference
    # every setting asked for has a row: measured, or a reason it was not
    for label in bench_gpu.SMOKE_SETTINGS:
        assert any(r[0] == label and r[-1] for r in rows), label

    titles, rows = _table(markdown, "run")
    assert titles == [title for _, title in bench_gpu.PIPELINE_COLUMNS]
    assert len(rows) == 3  # decode only, starkret.embed, the embed-shards CLI
    for row in rows:
        assert len(row) == len(titles)
        assert row[1] == "48", row  # every synthetic image embedded (or decoded)
        assert row[-1] == "ok", row
    assert "## Goals (issue 12)" in markdown

    data = json.loads((out / "gpu.json").read_text())
    assert data["model"] == "starkret-tiny"
    assert {r["run"].split(" ")[0] for r in data["pipeline"]} == {
        "decode",
        "starkret.embed",
        "embed-shards",
    }
    assert not [s for s in data["steps"] if s["status"].startswith("error")], data["steps"]
    log = (out / "gpu-log.txt").read_text()
    assert "== benchmark" in log and "== GPU tests" in log


def test_a_spent_budget_skips_every_step_with_its_reason(tmp_path, bench_gpu):
    assert bench_gpu.main(["--smoke", "--budget", "0", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu.json").read_text())
    skipped = [s for s in data["steps"] if s["status"].startswith("skipped: needs ~")]
    names = {s["step"] for s in skipped}
    assert {"generate shards", "fp32 reference", "model default"} <= names
    assert {f"model {label}" for label in bench_gpu.SMOKE_SETTINGS} <= names
    assert data["model_only"] == [] and data["pipeline"] == []
    markdown = (tmp_path / "gpu.md").read_text()
    assert "left of the 0 s budget" in markdown
    assert "nothing measured" in markdown


def test_vit_l_336_image_tower_costs_382_gflop_as_counted_by_torch(bench_gpu):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from starkret.ingest.towers import DEFAULT_MODEL, _open_clip

    analytic = bench_gpu.model_flops_per_image(DEFAULT_MODEL)
    assert 381e9 < analytic < 383e9  # issue 12: ~382 GFLOP per image
    # torch's own count of the real model (on the meta device: no memory, no compute)
    model = _open_clip().create_model(DEFAULT_MODEL, pretrained=None, device="meta")
    with FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros((1, 3, 336, 336), device="meta"))
    assert counter.get_total_flops() == pytest.approx(analytic, rel=1e-3)


def test_flops_of_a_resnet_tower_are_torchs_count(bench_gpu):
    # was: "FLOPs are counted for ViT towers only" once starkret-mini became a ResNet
    flops = bench_gpu.model_flops_per_image("starkret-mini")
    assert flops == bench_gpu.counted_flops_per_image("starkret-mini")
    assert 70e6 < flops < 95e6  # docs/models.md: 81 MFLOP an image at 96 px


@pytest.mark.parametrize("model", ["starkret-tiny"])
def test_analytic_flops_match_torch_count_for_small_towers(bench_gpu, model):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from starkret.ingest.towers import _open_clip

    built = _open_clip().create_model(model, pretrained=None, device="meta")
    size = built.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with FlopCounterMode(display=False) as counter:
        built.encode_image(torch.zeros((1, 3, size, size), device="meta"))
    assert counter.get_total_flops() == pytest.approx(
        bench_gpu.model_flops_per_image(model), rel=1e-3
    )


def test_starkret_and_its_embed_path_import_without_faiss_or_webdataset():
    # The GPU machine has neither and scripts/gpu_wheels.sh carries neither: importing them
    # at module level anywhere on the embed path would break benches/gpu.sh there.
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("faiss", "webdataset", "autofaiss", "ray"):
            raise ImportError("not on the GPU machine: " + name)
sys.meta_path.insert(0, Block())
import starkret, starkret.ingest.embed, starkret.cli.commands
import starkret.ingest.preprocess, starkret.ingest.towers
from starkret.cli.commands import embed_shards_main
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_peak_is_the_datasheet_dense_figure_of_the_gpu(bench_gpu):
    assert bench_gpu.datasheet_peak("NVIDIA H200")[0] == pytest.approx(989.4)
    assert bench_gpu.datasheet_peak("NVIDIA H100 80GB HBM3")[0] == pytest.approx(989.4)
    assert bench_gpu.datasheet_peak("NVIDIA H100 PCIe")[0] == pytest.approx(756.0)
    peak, why = bench_gpu.datasheet_peak("Some Future GPU")
    assert peak is None and "--peak-tflops" in why
