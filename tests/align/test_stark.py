"""Stark's release conventions in align: image UUIDs, url: keys, records, module routing,
parquet in and out, stark-image-style tars of the chosen local images."""

from __future__ import annotations

import json
import os
import tarfile
import uuid
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import starkret
from starkret.align.dialogue import align_file
from starkret.align.formats import read_episodes
from starkret.align.stark import export_images, write_parquet
from starkret.ingest.embed import embed
from starkret.testing import synthetic_photo, write_source


def _stark_row(episode_id: str, description: str) -> dict:
    """One row of stark-dialogue (flat columns), with a p-t2i turn already filled."""
    return {
        "unique_id": episode_id,
        "session1:dialogue": ["hi", "look at this", "nice", "and this one"],
        "session1:speakers": ["A", "B", "A", "B"],
        "session1:image_descriptions": ["", description, "", "a painted dragon"],
        "session1:image_sources": ["", "internet", "", "generated"],
        "session1:images_module_name": ["", "retrieval", "", "p-t2i"],
        "session1:images_key": ["", "", "", "6f1c2a9e-0000-4000-8000-000000000001"],
    }


def test_stark_parquet_in_uuid_keys_out_p_t2i_left_alone(tmp_path, tiny_embedder):
    texts = ["a golden retriever on a beach", "a red bicycle"]
    vectors = np.vstack(
        [tiny_embedder.encode_texts(texts, dtype="float32"), np.eye(tiny_embedder.dim)[:6]]
    )
    write_source(tmp_path / "db" / "cc12m", "cc12m", vectors)
    db = starkret.ImageDB.open(tmp_path / "db", embedder=tiny_embedder)
    rows = [_stark_row("ep-1", texts[0]), _stark_row("ep-2", texts[1])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "stark.parquet")
    aligner = starkret.Aligner(db, min_score=-1.0)
    outputs = []
    for run in ("a", "b"):  # the keys do not depend on the run
        out = tmp_path / f"aligned-{run}.jsonl"
        report = align_file(db, tmp_path / "stark.parquet", out, aligner=aligner, progress=False)
        assert (report.episodes, report.moments) == (2, 2)  # the p-t2i turns are not aligned
        outputs.append([json.loads(line) for line in out.read_text().splitlines()])
    first = outputs[0][0]
    key = first["session1:images_key"][1]
    assert key.startswith("url:") and uuid.UUID(key[4:]).version == 5
    assert first["session1:images_key"][3] == "6f1c2a9e-0000-4000-8000-000000000001"
    assert first["session1:images_module_name"] == ["", "retrieval", "", "p-t2i"]
    assert [o["session1:images_key"] for o in outputs[0]] == [
        o["session1:images_key"] for o in outputs[1]
    ]
    records = [
        json.loads(line)
        for line in (tmp_path / "aligned-a.jsonl.images.jsonl").read_text().splitlines()
    ]
    assert records[0]["index"] == key[4:] and records[0]["image_source"] == "cc12m"
    assert records[0]["image_url"].startswith("https://img.example/cc12m/")

    parquet = write_parquet(tmp_path / "aligned-a.jsonl", tmp_path / "aligned.parquet")
    again = list(read_episodes(parquet))
    assert [e.episode_id for e in again] == ["ep-1", "ep-2"]
    assert pq.read_table(parquet).column("session1:images_key").to_pylist()[0][1] == key


def test_chosen_local_images_export_as_stark_image_tars(tmp_path, tiny_embedder):
    imgs = tmp_path / "charts"
    imgs.mkdir()
    for i in range(3):
        PIL.Image.fromarray(synthetic_photo(48, 40, seed=i)).save(imgs / f"c{i}.png")
    embed(
        imgs,
        tmp_path / "db" / "chartqa",
        source_name="chartqa",
        embedder=tiny_embedder,
        progress=False,
    )
    db = starkret.ImageDB.open(tmp_path / "db", embedder=tiny_embedder)
    episodes = tmp_path / "in.jsonl"
    episodes.write_text(json.dumps(_stark_row("ep-1", "a bar chart")) + "\n")
    out = tmp_path / "out.jsonl"
    align_file(db, episodes, out, aligner=starkret.Aligner(db, min_score=-1.0), progress=False)
    key = json.loads(out.read_text())["session1:images_key"][1]
    assert not key.startswith("url:")
    records = [
        json.loads(x) for x in (tmp_path / "out.jsonl.images.jsonl").read_text().splitlines()
    ]
    written, problems = export_images(db, records, tmp_path / "stark-image")
    assert (written, problems) == (1, [])
    with tarfile.open(tmp_path / "stark-image" / "00000.tar") as tar:
        names = sorted(tar.getnames())
        assert names == [f"{key}.json", f"{key}.png"]
        data = tar.extractfile(f"{key}.png").read()
        meta = json.loads(tar.extractfile(f"{key}.json").read())
    original = records[0]["db_key"].split("/", 1)[1]
    assert data == (imgs / original).read_bytes()
    assert meta == {"image_source": "chartqa", "index": key}


class _Images:
    """A DB that has every image (PNG bytes named after the key)."""

    def image_bytes(self, source: str, key: str) -> bytes:
        return b"\x89PNG\r\n\x1a\n" + key.encode()


def test_export_publishes_only_complete_tars(tmp_path):
    """A failure mid-export leaves the tars finished before it, and no partial one."""

    def records():
        for i in range(3):
            yield {"image_source": "chartqa", "index": f"u{i}", "db_key": f"chartqa/{i}"}
        raise OSError("input cut short")

    out = tmp_path / "stark-image"
    with pytest.raises(OSError, match="cut short"):
        export_images(_Images(), records(), out, per_tar=2)
    assert sorted(os.listdir(out)) == ["00000.tar"]
    with tarfile.open(out / "00000.tar") as tar:
        assert sorted(tar.getnames()) == ["u0.json", "u0.png", "u1.json", "u1.png"]
    assert export_images(_Images(), [], tmp_path / "none") == (0, [])
    assert os.listdir(tmp_path / "none") == []


def test_a_chosen_image_has_one_key_in_images_key_its_alignment_and_its_record(
    tmp_path, tiny_embedder
):
    """Stark keys (the default): the alignment stored beside the episode used to show the
    `url:URL` key where images_key and OUTPUT.images.jsonl hold `url:UUID`."""
    texts = ["a golden retriever on a beach", "a red bicycle"]
    write_source(
        tmp_path / "db" / "cc12m", "cc12m", tiny_embedder.encode_texts(texts, dtype="float32")
    )
    db = starkret.ImageDB.open(tmp_path / "db", embedder=tiny_embedder)
    episodes = tmp_path / "in.jsonl"
    episodes.write_text(json.dumps(_stark_row("ep-1", texts[0])) + "\n")
    out = tmp_path / "out.jsonl"
    align_file(db, episodes, out, aligner=starkret.Aligner(db, min_score=-1.0), progress=False)
    line = json.loads(out.read_text())
    key = line["session1:images_key"][1]
    assert key.startswith("url:") and uuid.UUID(key[4:])
    (alignment,) = line["alignments"]
    (image,) = alignment["images"]
    (record,) = [
        json.loads(x) for x in (tmp_path / "out.jsonl.images.jsonl").read_text().splitlines()
    ]
    assert image["key"] == record["key"] == key
    assert image["index"] == record["index"] == key[4:]
    assert image["db_key"] == record["db_key"] == "cc12m/000000000"
    assert image["image_url"] == record["image_url"] == "https://img.example/cc12m/000000000.jpg"
    # the candidates of every source keep their DB keys (they have no UUID)
    assert alignment["db_searched_results"]["cc12m"][0]["key"] == f"url:{image['image_url']}"


def test_the_docs_name_exported_images_by_the_format_of_their_bytes():
    """docs/align.md said `UUID.png` while a JPEG source exports `UUID.jpg`."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "align.md").read_text()
    assert "`UUID.png`" not in page
    assert "`UUID.EXT` + `UUID.json`, EXT the image's format read from its bytes" in page
