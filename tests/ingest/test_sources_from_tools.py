"""Inputs as other tools write them: img2dataset's three output formats, the Hugging Face
schemas of the Stark sources (parquet and save_to_disk, Dataset and DatasetDict)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starkret.ingest.embed import embed
from starkret.ingest.sources import plan_parts
from starkret.testing import encode, run_img2dataset, serve_directory, synthetic_photo
from starkret.testing.inputs import save_to_disk


def _meta(out: Path) -> dict:
    files = sorted((out / "metadata").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pydict()


# ==== img2dataset output folders ====


@pytest.fixture(scope="module")
def img2dataset_folders(tmp_path_factory):
    """The real img2dataset, over 127.0.0.1, into webdataset, parquet and files folders."""
    if not (Path(sys.executable).parent / "img2dataset").exists():
        pytest.skip("img2dataset is not installed")
    tmp = tmp_path_factory.mktemp("i2d")
    www = tmp / "www"
    www.mkdir()
    for i in range(6):
        (www / f"{i}.jpg").write_bytes(encode(synthetic_photo(160, 120, seed=i), "JPEG"))
    (www / "page.jpg").write_bytes(b"<!DOCTYPE html><html>moved</html>")
    names = [f"{i}.jpg" for i in range(6)] + ["page.jpg", "missing.jpg"]
    folders = {}
    with serve_directory(www) as base:
        table = pa.table(
            {"url": [f"{base}/{n}" for n in names], "caption": [f"photo {n}" for n in names]}
        )
        pq.write_table(table, tmp / "urls.parquet")
        runs = {  # the three at once: most of img2dataset's time is its start-up
            fmt: run_img2dataset(
                tmp / "urls.parquet",
                tmp / fmt,
                f"--output_format={fmt}",
                "--input_format=parquet",
                "--url_col=url",
                "--caption_col=caption",
                "--number_sample_per_shard=3",
                wait=False,
            )
            for fmt in ("webdataset", "parquet", "files")
        }
        for fmt, run in runs.items():
            try:
                _, err = run.communicate(timeout=240)
            finally:
                run.kill()
            assert run.returncode == 0, err[-2000:]
            folders[fmt] = tmp / fmt
    return folders


def test_img2dataset_folder_in_every_output_format_gives_same_keys_urls_captions(
    img2dataset_folders, tmp_path, tiny_embedder
):
    results = {}
    for fmt, folder in img2dataset_folders.items():
        assert sorted(folder.glob("*_stats.json")), fmt  # its stats files are there
        report = embed(
            folder, tmp_path / fmt, source_name="cc12m", embedder=tiny_embedder, progress=False
        )
        meta = _meta(tmp_path / fmt)
        rows = sorted(zip(meta["key"], meta["url"], meta["caption"], strict=True))
        results[fmt] = (report.embedded, report.failed, report.failure_reasons, rows)
    embedded, failed, reasons, rows = results["webdataset"]
    assert (embedded, failed, reasons) == (6, 1, {"not an image": 1})
    assert [r[2] for r in rows] == [f"photo {i}.jpg" for i in range(6)]
    assert all(r[0].startswith("cc12m/") and r[0][6:].isdigit() for r in rows)
    assert all(r[1].endswith(r[2].split()[1]) for r in rows)
    assert results["parquet"] == results["webdataset"]
    assert results["files"] == results["webdataset"]


# ==== Hugging Face schemas of the Stark sources ====

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _hf_image(i: int) -> dict:
    return {"bytes": encode(synthetic_photo(96, 64, seed=i), "PNG"), "path": f"{i}.png"}


def _features(schema_features: dict) -> dict:
    return {"huggingface": json.dumps({"info": {"features": schema_features}})}


def mathvision(n: int) -> pa.Table:
    """MathLLMs/MathVision's columns and types (image is a *path string*)."""
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("question", pa.string()),
            ("options", pa.list_(pa.string())),
            ("image", pa.string()),
            ("decoded_image", _IMAGE),
            ("answer", pa.string()),
            ("solution", pa.string()),
            ("level", pa.int64()),
            ("subject", pa.string()),
        ],
        metadata=_features(
            {
                "id": {"dtype": "string", "_type": "Value"},
                "image": {"dtype": "string", "_type": "Value"},
                "decoded_image": {"_type": "Image"},
            }
        ),
    )
    rows = {
        "id": [str(i + 1) for i in range(n)],
        "question": [f"What is the area of figure {i}?" for i in range(n)],
        "options": [["A", "B"] for _ in range(n)],
        "image": [f"images/{i + 1}.jpg" for i in range(n)],
        "decoded_image": [_hf_image(i) for i in range(n)],
        "answer": ["A"] * n,
        "solution": [""] * n,
        "level": [1] * n,
        "subject": ["metric geometry - area"] * n,
    }
    return pa.table(rows, schema=schema)


def chartqa(n: int, seed: int = 0) -> pa.Table:
    """HuggingFaceM4/ChartQA: image Image, query, label (list), human_or_machine (ClassLabel)."""
    schema = pa.schema(
        [
            ("image", _IMAGE),
            ("query", pa.string()),
            ("label", pa.list_(pa.string())),
            ("human_or_machine", pa.int64()),
        ]
    )
    return pa.table(
        {
            "image": [_hf_image(seed + i) for i in range(n)],
            "query": [f"How many bars exceed {seed + i}?" for i in range(n)],
            "label": [["3"]] * n,
            "human_or_machine": [0] * n,
        },
        schema=schema,
    )


def ai2d(n: int) -> pa.Table:
    """lmms-lab/ai2d: question, options, answer, image Image."""
    schema = pa.schema(
        [
            ("question", pa.string()),
            ("options", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("image", _IMAGE),
        ]
    )
    return pa.table(
        {
            "question": [f"Which stage is {i}?" for i in range(n)],
            "options": [["egg", "larva"]] * n,
            "answer": ["0"] * n,
            "image": [_hf_image(50 + i) for i in range(n)],
        },
        schema=schema,
    )


def test_mathvision_picks_the_image_struct_over_the_path_string_and_id_as_key(
    tmp_path, tiny_embedder
):
    pq.write_table(mathvision(3), tmp_path / "testmini-00000-of-00001.parquet")
    for source in ("mathvision", "anything"):  # by name, and by column type alone
        report = embed(
            tmp_path / "testmini-00000-of-00001.parquet",
            tmp_path / f"out-{source}",
            source_name=source,
            embedder=tiny_embedder,
            progress=False,
        )
        assert (report.embedded, report.failed) == (3, 0)
        meta = _meta(tmp_path / f"out-{source}")
        assert meta["sample_key"] == ["1", "2", "3"]
        assert meta["caption"][0] == "What is the area of figure 0?"


def test_chartqa_query_is_the_caption_and_datasetdict_splits_make_distinct_keys(
    tmp_path, tiny_embedder
):
    root = tmp_path / "chartqa"
    root.mkdir()
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    save_to_disk(chartqa(2), root / "train")
    save_to_disk(chartqa(2, seed=10), root / "test")
    report = embed(
        root, tmp_path / "out", source_name="chartqa", embedder=tiny_embedder, progress=False
    )
    assert (report.embedded, report.failed) == (4, 0)
    meta = _meta(tmp_path / "out")
    assert sorted(meta["sample_key"]) == [
        "test/data-00000-of-00001/0",
        "test/data-00000-of-00001/1",
        "train/data-00000-of-00001/0",
        "train/data-00000-of-00001/1",
    ]
    assert sorted(meta["caption"]) == sorted(f"How many bars exceed {i}?" for i in (0, 1, 10, 11))


def test_ai2d_single_dataset_keeps_its_keys(tmp_path, tiny_embedder):
    save_to_disk(ai2d(2), tmp_path / "ai2d")
    report = embed(
        tmp_path / "ai2d",
        tmp_path / "out",
        source_name="ai2d",
        embedder=tiny_embedder,
        progress=False,
    )
    assert (report.embedded, report.failed) == (2, 0)
    meta = _meta(tmp_path / "out")
    assert meta["sample_key"] == ["data-00000-of-00001/0", "data-00000-of-00001/1"]
    assert meta["caption"] == ["Which stage is 0?", "Which stage is 1?"]


def test_flags_still_win_over_the_known_source(tmp_path):
    pq.write_table(mathvision(2), tmp_path / "m.parquet")
    [part] = plan_parts(tmp_path / "m.parquet", source="mathvision", caption_column="subject")
    assert part.columns[:3] == ("decoded_image", "subject", "id")
    with pytest.raises(ValueError, match="no column 'nope'"):
        plan_parts(tmp_path / "m.parquet", source="mathvision", image_column="nope")


def test_real_datasets_library_output_when_it_is_installed(tmp_path, tiny_embedder):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"image": [_hf_image(i)["bytes"] for i in range(2)], "query": ["a", "b"]},
                features=datasets.Features(
                    {"image": datasets.Image(), "query": datasets.Value("string")}
                ),
            )
            for split in ("train", "test")
        }
    )
    dd.save_to_disk(str(tmp_path / "chartqa"))
    report = embed(
        tmp_path / "chartqa",
        tmp_path / "out",
        source_name="chartqa",
        embedder=tiny_embedder,
        progress=False,
    )
    assert (report.embedded, report.failed) == (4, 0)
