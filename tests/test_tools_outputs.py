"""Outputs other tools read: autofaiss's CLI and clip-retrieval on an embedded source."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starkret.pipeline import embed
from starkret.testing import synthetic_photo

BIN = Path(sys.executable).parent


def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        PIL.Image.fromarray(synthetic_photo(64 + i, 48, seed=i)).save(root / f"im{i:03d}.png")
    return root


def _numeric(out: Path, sub: str) -> list[Path]:
    return sorted((out / sub).glob(f"{sub}_*.*"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


@pytest.fixture(scope="module")
def thirteen_parts(tmp_path_factory, tiny_embedder):
    tmp = tmp_path_factory.mktemp("parts")
    out = tmp / "db" / "chartqa"
    embed(
        _folder(tmp / "imgs", 13),
        out,
        source_name="chartqa",
        embedder=tiny_embedder,
        chunk_size=1,
        progress=False,
    )
    return out


def test_part_files_are_zero_padded_so_name_order_is_part_order(thirteen_parts):
    for sub in ("img_emb", "metadata", "failures"):
        names = sorted(os.listdir(thirteen_parts / sub))
        assert names == [p.name for p in _numeric(thirteen_parts, sub)]
        assert names[0] in ("img_emb_00000.npy", "metadata_00000.parquet", "failures_00000.parquet")


def test_real_autofaiss_cli_ids_are_metadata_rows(thirteen_parts, tmp_path):
    """`autofaiss build_index` reads img_emb/ in name order; its ids must be starkret's rows."""
    faiss = pytest.importorskip("faiss")
    if not (BIN / "autofaiss").exists():
        pytest.skip("the autofaiss CLI is not installed")
    run = subprocess.run(
        [
            str(BIN / "autofaiss"),
            "build_index",
            f"--embeddings={thirteen_parts / 'img_emb'}",
            f"--index_path={tmp_path / 'knn.index'}",
            f"--index_infos_path={tmp_path / 'infos.json'}",
            "--metric_type=ip",
            "--max_index_memory_usage=1G",
            "--current_memory_available=2G",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    index = faiss.read_index(str(tmp_path / "knn.index"))
    vectors = np.concatenate([np.load(p) for p in _numeric(thirteen_parts, "img_emb")])
    meta = pa.concat_tables([pq.read_table(p) for p in _numeric(thirteen_parts, "metadata")])
    assert index.ntotal == len(vectors) == meta.num_rows == 13
    _, ids = index.search(vectors.astype(np.float32), 1)
    assert ids[:, 0].tolist() == list(range(13))
    assert meta.column("sample_key").to_pylist() == [f"im{i:03d}.png" for i in range(13)]


def test_folder_from_before_padding_is_renamed_on_resume_and_still_read(tmp_path, tiny_embedder):
    from starkret import ImageDB

    imgs = _folder(tmp_path / "imgs", 12)
    out = tmp_path / "db" / "ai2d"
    embed(imgs, out, source_name="ai2d", embedder=tiny_embedder, chunk_size=1, progress=False)
    before = pa.concat_tables([pq.read_table(p) for p in _numeric(out, "metadata")])
    for sub in ("img_emb", "metadata", "failures"):  # what starkret wrote before the padding
        for path in (out / sub).iterdir():
            stem, number = path.stem.rsplit("_", 1)
            path.rename(path.with_name(f"{stem}_{int(number)}{path.suffix}"))
    db = ImageDB.open(tmp_path / "db")  # old names are read in part order
    query = np.load(out / "img_emb" / "img_emb_10.npy").astype(np.float32)
    assert db.search(query, k=1)[0][0].key == "ai2d/im010.png"
    (out / "metadata" / "metadata_11.parquet").unlink()  # and one part left unfinished
    report = embed(
        imgs, out, source_name="ai2d", embedder=tiny_embedder, chunk_size=1, progress=False
    )
    assert (report.parts_done, report.parts_skipped, report.embedded) == (1, 11, 1)
    for sub in ("img_emb", "metadata", "failures"):
        assert sorted(os.listdir(out / sub)) == [
            f"{sub}_{i:05d}{'.npy' if sub == 'img_emb' else '.parquet'}" for i in range(12)
        ]
    after = pa.concat_tables([pq.read_table(p) for p in _numeric(out, "metadata")])
    assert after.column("key").to_pylist() == before.column("key").to_pylist()
