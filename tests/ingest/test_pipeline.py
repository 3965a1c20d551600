"""starkret.embed / embed-shards: layout, equality with open_clip, resume, refusals, sources."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import starkret
from starkret.ingest.embed import embed
from starkret.ingest.preprocess import OPENAI_MEAN, OPENAI_STD, _finish, reference_crop
from starkret.store.layout import part_file, part_files, part_number
from starkret.testing import encode, run_img2dataset, serve_directory, synthetic_photo

#: The console script installed beside this interpreter.
EMBED_SHARDS = str(Path(sys.executable).parent / "embed-shards")


def _shards(folder: Path, n_shards: int, per_shard: int, *, broken: set[str] = frozenset()):
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image = encode(synthetic_photo(200 + 9 * i, 180, seed=100 * s + i), "JPEG")
                if key in broken:
                    image = image[: len(image) // 3]
                images[key] = image
                meta = json.dumps({"url": f"https://img.example/{key}.jpg", "key": key})
                for ext, data in (
                    ("jpg", image),
                    ("txt", f"caption {key}".encode()),
                    ("json", meta.encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return images


def _read(out: Path):
    parts = [part_number(p) for p in part_files(out, "metadata")]
    emb = [np.load(part_file(out, "img_emb", i)) for i in parts]
    meta = [pq.read_table(part_file(out, "metadata", i)) for i in parts]
    return np.concatenate(emb), pa.concat_tables(meta).to_pydict()


@pytest.fixture(scope="module")
def tiny():
    return starkret.ClipEmbedder("starkret-tiny", device="cpu")


def test_layout_metadata_and_embeddings_match_open_clip(tmp_path, tiny):
    images = _shards(tmp_path / "cc", 2, 5, broken={"000010002"})
    report = embed(
        str(tmp_path / "cc" / "{00000..00001}.tar"),
        tmp_path / "out",
        source_name="cc12m",
        embedder=tiny,
        batch_size=3,
        progress=False,
    )
    out = tmp_path / "out"
    assert (report.embedded, report.failed, report.parts_done) == (9, 1, 2)
    assert report.failure_reasons == {"truncated": 1}
    assert sorted(os.listdir(out / "img_emb")) == ["img_emb_00000.npy", "img_emb_00001.npy"]
    emb, meta = _read(out)
    assert emb.dtype == np.float16 and emb.shape == (9, tiny.dim)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=2e-3)
    keys = [k for k in images if k != "000010002"]
    assert meta["sample_key"] == keys
    assert meta["key"] == [f"cc12m/{k}" for k in keys]
    assert meta["caption"] == [f"caption {k}" for k in keys]
    assert meta["url"] == [f"https://img.example/{k}.jpg" for k in keys]
    assert meta["shard"] == ["00000.tar"] * 5 + ["00001.tar"] * 4
    assert len(set(meta["id"])) == 9
    fails = pq.read_table(out / "failures" / "failures_00001.parquet").to_pydict()
    assert fails["key"] == ["000010002"] and fails["reason"][0].startswith("truncated")

    # Reference: open_clip's model on PIL + torchvision preprocessing, in float32.
    pixels = np.stack(
        [_finish(reference_crop(images[k]), "float32", OPENAI_MEAN, OPENAI_STD) for k in keys]
    )
    with torch.no_grad():
        ref = tiny.model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
    cos = np.sum(ref * emb.astype(np.float32), axis=1) / np.linalg.norm(
        emb.astype(np.float32), axis=1
    )
    assert cos.min() >= 0.9999, cos.min()

    manifest = json.loads((out / "starkret.json").read_text())
    assert manifest["model"] == "starkret-tiny" and manifest["dim"] == tiny.dim
    assert manifest["count"] == 9 and manifest["failed"] == 1 and manifest["complete"]
    assert manifest["source"] == "cc12m" and manifest["preprocess_mode"] == "exact"


def test_rerun_skips_finished_parts_and_redoes_unfinished(tmp_path, tiny):
    _shards(tmp_path / "cc", 3, 4)
    args = dict(source_name="cc12m", embedder=tiny, progress=False)
    embed(str(tmp_path / "cc" / "*.tar"), tmp_path / "out", **args)
    before, meta_before = _read(tmp_path / "out")
    # Simulate a run killed inside part 1: its metadata (the done marker) is missing,
    # a half-written temporary file is left behind.
    (tmp_path / "out" / "metadata" / "metadata_00001.parquet").unlink()
    (tmp_path / "out" / "img_emb" / ".img_emb_00001.npy.tmp-999").write_bytes(b"half")
    report = embed(str(tmp_path / "cc" / "*.tar"), tmp_path / "out", **args)
    assert (report.parts_skipped, report.parts_done, report.embedded) == (2, 1, 4)
    after, meta_after = _read(tmp_path / "out")
    np.testing.assert_array_equal(before, after)
    assert meta_before == meta_after
    assert not list((tmp_path / "out").glob("*/.*tmp*"))


def test_kill_9_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    _shards(tmp_path / "cc", 6, 12)
    cmd = [
        sys.executable,
        "-m",
        "starkret",
        "embed",
        str(tmp_path / "cc" / "*.tar"),
        "-o",
        str(tmp_path / "out"),
        "--source",
        "cc12m",
        "--model",
        "starkret-tiny",
        "--batch-size",
        "1",
        "--threads",
        "1",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marker = tmp_path / "out" / "metadata" / "metadata_00001.parquet"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((tmp_path / "out" / "metadata").glob("*.parquet")))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"skipped as done {done_before}" in result.stdout
    emb, meta = _read(tmp_path / "out")
    assert len(meta["sample_key"]) == len(set(meta["sample_key"])) == 72
    assert emb.shape[0] == 72


def test_a_different_model_or_mode_is_refused(tmp_path, tiny):
    _shards(tmp_path / "cc", 1, 2)
    embed(
        str(tmp_path / "cc" / "*.tar"),
        tmp_path / "out",
        source_name="cc12m",
        embedder=tiny,
        progress=False,
    )
    ckpt = tmp_path / "other.pt"
    torch.save(starkret.ClipEmbedder("starkret-tiny", seed=5).model.state_dict(), ckpt)
    other = starkret.ClipEmbedder("starkret-tiny", pretrained=str(ckpt), device="cpu")
    with pytest.raises(ValueError, match="pretrained"):
        embed(
            str(tmp_path / "cc" / "*.tar"),
            tmp_path / "out",
            source_name="cc12m",
            embedder=other,
            progress=False,
        )
    with pytest.raises(ValueError, match="preprocess_mode"):
        embed(
            str(tmp_path / "cc" / "*.tar"),
            tmp_path / "out",
            source_name="cc12m",
            embedder=tiny,
            mode="fast",
            progress=False,
        )
    with pytest.raises(ValueError, match="inputs differ"):
        _shards(tmp_path / "other", 1, 2)
        embed(
            str(tmp_path / "other" / "*.tar"),
            tmp_path / "out",
            source_name="cc12m",
            embedder=tiny,
            progress=False,
        )
    report = embed(
        str(tmp_path / "cc" / "*.tar"),
        tmp_path / "out",
        source_name="cc12m",
        embedder=other,
        overwrite=True,
        progress=False,
    )
    assert report.embedded == 2


def test_image_folder_with_sidecar_captions_and_bad_files(tmp_path, tiny):
    root = tmp_path / "chartqa" / "train" / "png"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        PIL.Image.fromarray(synthetic_photo(120, 80, seed=i)).save(root / "sub" / f"c{i}.png")
    (root / "sub" / "c1.txt").write_text("bar chart of rainfall")
    (root / "zz.jpg").write_bytes(b"<html>not found</html>")
    report = embed(
        root, tmp_path / "out", source_name="chartqa", embedder=tiny, chunk_size=2, progress=False
    )
    assert (report.embedded, report.failed, report.parts_done) == (5, 1, 3)
    _, meta = _read(tmp_path / "out")
    assert meta["sample_key"] == [f"sub/c{i}.png" for i in range(5)]
    assert meta["caption"][1] == "bar chart of rainfall"
    assert meta["width"][0] == 120 and meta["height"][0] == 80


def test_parquet_and_saved_hf_dataset_tables(tmp_path, tiny):
    images = [encode(synthetic_photo(90, 60, seed=i), "JPEG") for i in range(4)]
    hf_images = [{"bytes": b, "path": None} for b in images]
    hf_images[2] = {"bytes": None, "path": None}
    table = pa.table(
        {
            "image": hf_images,
            "question": [f"q{i}" for i in range(4)],
            "id": [f"m{i}" for i in range(4)],
        }
    )
    pq.write_table(table, tmp_path / "mathvision.parquet")
    report = embed(
        tmp_path / "mathvision.parquet",
        tmp_path / "out",
        source_name="mathvision",
        embedder=tiny,
        progress=False,
    )
    assert (report.embedded, report.failed) == (3, 1)
    _, meta = _read(tmp_path / "out")
    assert meta["sample_key"] == ["m0", "m1", "m3"] and meta["caption"] == ["q0", "q1", "q3"]

    saved = tmp_path / "ai2d_saved"  # what datasets.Dataset.save_to_disk writes: Arrow streams
    saved.mkdir()
    plain = pa.table({"img": images, "text": ["a", "b", "c", "d"]})
    arrow = str(saved / "data-00000-of-00001.arrow")
    with pa.OSFile(arrow, "wb") as sink, pa.ipc.new_stream(sink, plain.schema) as writer:
        writer.write_table(plain)
    (saved / "state.json").write_text("{}")
    report = embed(saved, tmp_path / "out2", source_name="ai2d", embedder=tiny, progress=False)
    assert report.embedded == 4
    _, meta = _read(tmp_path / "out2")
    assert meta["caption"] == ["a", "b", "c", "d"]
    assert meta["sample_key"][0] == "data-00000-of-00001/0"


def test_ray_workers_write_the_same_output(tmp_path, tiny):
    ray = pytest.importorskip("ray")
    _shards(tmp_path / "cc", 3, 3)
    embed(
        str(tmp_path / "cc" / "*.tar"),
        tmp_path / "single",
        source_name="cc12m",
        embedder=tiny,
        progress=False,
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = embed(
            str(tmp_path / "cc" / "*.tar"),
            tmp_path / "ray",
            source_name="cc12m",
            embedder=tiny,
            workers=2,
            progress=False,
        )
    finally:
        ray.shutdown()
    assert (report.embedded, report.parts_done) == (9, 3)
    a, meta_a = _read(tmp_path / "single")
    b, meta_b = _read(tmp_path / "ray")
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)
    assert meta_a == meta_b


def test_cli_embed_shards_and_readable_errors(tmp_path):
    _shards(tmp_path / "cc", 1, 2)
    run = subprocess.run(
        [
            EMBED_SHARDS,
            str(tmp_path / "cc" / "00000.tar"),
            "--output",
            str(tmp_path / "o"),
            "--source",
            "cc12m",
            "--model",
            "starkret-tiny",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("embedded 2 images, failed 0")
    bad = subprocess.run(
        [
            EMBED_SHARDS,
            str(tmp_path / "missing-*.tar"),
            "-o",
            str(tmp_path / "o2"),
            "--source",
            "cc12m",
            "--model",
            "starkret-tiny",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "missing-*.tar" in bad.stderr


def test_real_img2dataset_shards_from_a_local_http_server(tmp_path, tiny):
    """img2dataset itself downloads from 127.0.0.1 into webdataset shards, then we embed them."""
    if not (Path(sys.executable).parent / "img2dataset").exists():
        pytest.skip("img2dataset is not installed")
    www = tmp_path / "www"
    www.mkdir()
    for i in range(8):
        fmt = "PNG" if i % 4 == 3 else "JPEG"  # PNG bytes served (and stored) as .jpg
        (www / f"{i}.jpg").write_bytes(encode(synthetic_photo(320, 240, seed=i), fmt))
    (www / "page.jpg").write_bytes(b"<!DOCTYPE html><html>moved</html>")
    names = [f"{i}.jpg" for i in range(8)] + ["page.jpg", "missing.jpg"]
    with serve_directory(www) as base:
        (tmp_path / "urls.txt").write_text("".join(f"{base}/{n}\n" for n in names))
        run = run_img2dataset(
            tmp_path / "urls.txt",
            tmp_path / "shards",
            "--output_format=webdataset",
            "--input_format=txt",
            "--number_sample_per_shard=4",
        )
    assert run.returncode == 0, run.stderr[-2000:]
    report = embed(
        str(tmp_path / "shards" / "*.tar"),
        tmp_path / "out",
        source_name="cc12m",
        embedder=tiny,
        progress=False,
    )
    _, meta = _read(tmp_path / "out")
    assert report.embedded == 8
    assert sorted(u.rsplit("/", 1)[1] for u in meta["url"]) == [f"{i}.jpg" for i in range(8)]
    assert all(k.startswith("cc12m/") for k in meta["key"])
    assert report.failed == 1 and report.failure_reasons == {"not an image": 1}
