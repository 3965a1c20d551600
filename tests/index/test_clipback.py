"""Outputs other tools read: autofaiss's CLI and clip-retrieval on an embedded source."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starkret.ingest.embed import embed
from starkret.store.layout import part_files, part_name, part_number
from starkret.testing import synthetic_photo, write_source

BIN = Path(sys.executable).parent


def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        PIL.Image.fromarray(synthetic_photo(64 + i, 48, seed=i)).save(root / f"im{i:03d}.png")
    return root


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
        assert names == [p.name for p in part_files(thirteen_parts, sub)]
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
    vectors = np.concatenate([np.load(p) for p in part_files(thirteen_parts, "img_emb")])
    meta = pa.concat_tables([pq.read_table(p) for p in part_files(thirteen_parts, "metadata")])
    assert index.ntotal == len(vectors) == meta.num_rows == 13
    _, ids = index.search(vectors.astype(np.float32), 1)
    assert ids[:, 0].tolist() == list(range(13))
    assert meta.column("sample_key").to_pylist() == [f"im{i:03d}.png" for i in range(13)]


def test_folder_from_before_padding_is_renamed_on_resume_and_still_read(tmp_path, tiny_embedder):
    from starkret import ImageDB

    imgs = _folder(tmp_path / "imgs", 12)
    out = tmp_path / "db" / "ai2d"
    embed(imgs, out, source_name="ai2d", embedder=tiny_embedder, chunk_size=1, progress=False)
    before = pa.concat_tables([pq.read_table(p) for p in part_files(out, "metadata")])
    for sub in ("img_emb", "metadata", "failures"):  # what starkret wrote before the padding
        for path in (out / sub).iterdir():
            path.rename(path.with_name(part_name(sub, part_number(path), padded=False)))
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
    after = pa.concat_tables([pq.read_table(p) for p in part_files(out, "metadata")])
    assert after.column("key").to_pylist() == before.column("key").to_pylist()


_CLIP_BACK_PROBE = """
import json, sys, types, importlib
import numpy as np
root, folder, vectors = sys.argv[1], sys.argv[2], sys.argv[3]
if root:  # clip-retrieval's own module, without its package __init__ (which loads every model)
    package = types.ModuleType("clip_retrieval")
    package.__path__ = [root + "/clip_retrieval"]
    sys.modules["clip_retrieval"] = package
    clip_back = importlib.import_module("clip_retrieval.clip_back")
    index = clip_back.load_index(folder + "/image.index", True)
    provider, _ = clip_back.load_metadata_provider(
        folder, False, False, index, ["url", "image_path", "caption"], False
    )
else:  # what it does, for machines without clip-retrieval: name-ordered parquet, faiss ids
    import faiss, pandas as pd
    from pathlib import Path
    index = faiss.read_index(folder + "/image.index", faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    files = sorted(Path(folder, "metadata").glob("*.parquet"))
    frame = pd.concat(pd.read_parquet(p) for p in files)
    class provider:
        get = staticmethod(lambda ids, cols: [frame.iloc[int(i)][cols].to_dict()
                                              for i in ids])
_, ids = index.search(np.load(vectors).astype("float32"), 1)
print(json.dumps(provider.get(ids[:, 0], ["url", "image_path", "caption"]), default=str))
"""


@pytest.mark.parametrize("real", [True, False], ids=["clip-retrieval", "its-loading-rules"])
def test_clip_back_loads_an_autofaiss_indexed_source(real, thirteen_parts, tmp_path):
    """`clip back`'s loader (clip_back.load_index + load_metadata_provider) on a source
    folder after `starkret clip-back`: the metadata row of each faiss id is its image."""
    import shutil

    from starkret.cli import commands as cli
    from starkret.index.build import build_index

    root = os.environ.get("STARKRET_CLIP_RETRIEVAL_PATH", "")
    if real and not (root and Path(root, "clip_retrieval", "clip_back.py").is_file()):
        pytest.skip(
            "set STARKRET_CLIP_RETRIEVAL_PATH to a `pip install --target` of clip-retrieval"
        )
    folder = tmp_path / "chartqa"
    shutil.copytree(thirteen_parts, folder)
    with pytest.raises(ValueError, match="no faiss index"):
        from starkret.index.clipback import link_for_clip_back

        link_for_clip_back(folder)
    build_index(folder, kind="autofaiss", max_index_memory_usage="1G", recall_queries=13)
    assert cli.main(["clip-back", str(folder)]) == 0
    vectors = np.concatenate([np.load(p) for p in part_files(folder, "img_emb")])
    np.save(tmp_path / "q.npy", vectors)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            _CLIP_BACK_PROBE,
            root if real else "",
            str(folder),
            str(tmp_path / "q.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
        },
    )
    assert run.returncode == 0, run.stderr[-2000:]
    metas = json.loads(run.stdout.strip().splitlines()[-1])
    assert [Path(m["image_path"]).name for m in metas] == [f"im{i:03d}.png" for i in range(13)]
    assert all(Path(m["image_path"]).is_absolute() for m in metas)  # a folder's files


def test_an_index_autofaiss_built_in_the_folder_is_adopted_after_checks(thirteen_parts, tmp_path):
    import shutil

    from starkret import ImageDB
    from starkret.cli import commands as cli

    if not (BIN / "autofaiss").exists():
        pytest.skip("the autofaiss CLI is not installed")
    folder = tmp_path / "db" / "chartqa"
    shutil.copytree(thirteen_parts, folder)
    (folder / "index").mkdir(exist_ok=True)
    run = subprocess.run(
        [
            str(BIN / "autofaiss"),
            "build_index",
            f"--embeddings={folder / 'img_emb'}",
            f"--index_path={folder / 'index' / 'knn.index'}",
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
    assert ImageDB.open(tmp_path / "db").search(np.zeros((1, 64), np.float32), k=1)  # exact
    assert cli.main(["clip-back", "--adopt", str(folder)]) == 0
    assert (folder / "image.index").is_symlink()
    db = ImageDB.open(tmp_path / "db")
    query = np.load(folder / "img_emb" / "img_emb_00011.npy").astype(np.float32)
    [[hit]] = db.search(query, k=1)
    assert hit.key == "chartqa/im011.png"
    assert json.loads((folder / "index" / "infos.json").read_text())["kind"] == "autofaiss"


def test_a_foreign_index_that_does_not_fit_is_refused_with_the_reason(thirteen_parts, tmp_path):
    import shutil

    import faiss

    from starkret.index.clipback import adopt_index

    folder = tmp_path / "chartqa"
    shutil.copytree(thirteen_parts, folder)
    wrong = faiss.IndexFlatIP(64)
    wrong.add(np.ones((5, 64), np.float32))
    faiss.write_index(wrong, str(folder / "image.index"))
    with pytest.raises(ValueError, match="holds 5 vectors, the source 13"):
        adopt_index(folder)


def test_approximate_kind_without_the_extra_asks_for_it_by_name(tmp_path, monkeypatch, capsys):
    """No autofaiss installed (the default install): one line naming the extra."""
    from starkret.cli import commands as cli
    from starkret.index.build import build_index

    write_source(tmp_path / "db" / "cc12m", "cc12m", np.eye(8, dtype=np.float32))
    monkeypatch.setitem(sys.modules, "autofaiss", None)  # import autofaiss -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'starkret\[autofaiss\]'"):
        build_index(tmp_path / "db" / "cc12m", kind="autofaiss")
    assert cli.main(["build-index", str(tmp_path / "db"), "--kind", "autofaiss", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "starkret[autofaiss]" in err


def test_clip_back_asks_for_the_ivf_index_the_default_install_builds(thirteen_parts, tmp_path):
    """An exact source has no faiss index: clip-back names `build-index --kind ivf` (no
    extra needed; it used to name `--kind autofaiss`, which needs one), and after it the
    source is loadable."""
    import shutil

    folder = tmp_path / "chartqa"
    shutil.copytree(thirteen_parts, folder)

    def starkret(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "starkret", *args], capture_output=True, text=True, timeout=300
        )

    assert starkret("build-index", str(folder), "--kind", "exact", "-q").returncode == 0
    refused = starkret("clip-back", str(folder))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"starkret build-index {folder} --kind ivf" in refused.stderr
    assert starkret("build-index", str(folder), "--kind", "ivf", "-q").returncode == 0
    linked = starkret("clip-back", str(folder))
    assert linked.returncode == 0, linked.stderr
    assert os.readlink(folder / "image.index") == os.path.join("index", "image.index")
