"""CLI consistency: --quiet, --threads and --json on the commands that compute; model
names as clip-retrieval spells them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from starkret.cli import commands as cli
from starkret.ingest.modelspec import normalise_model
from starkret.ingest.towers import MODEL_DEFAULT
from starkret.testing import synthetic_photo, write_source

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("open_clip:ViT-L-14-336-quickgelu/openai", ("ViT-L-14-336-quickgelu", "openai")),
        ("ViT-L/14@336px", ("ViT-L-14-336-quickgelu", "openai")),
        ("ViT-B/32", ("ViT-B-32-quickgelu", "openai")),
        ("open_clip:ViT-B-32/laion2b_s34b_b79k", ("ViT-B-32", "laion2b_s34b_b79k")),
        ("open_clip:starkret-tiny", ("starkret-tiny", MODEL_DEFAULT)),
        ("ViT-L-14-336-quickgelu", ("ViT-L-14-336-quickgelu", MODEL_DEFAULT)),
    ],
)
def test_clip_retrieval_model_spellings_are_open_clip_names(spelling, expected):
    assert normalise_model(spelling, MODEL_DEFAULT, MODEL_DEFAULT) == expected


def test_a_model_tag_contradicting_pretrained_is_refused():
    with pytest.raises(ValueError, match="pretrained"):
        normalise_model("open_clip:ViT-B-32/openai", "laion2b_s34b_b79k", MODEL_DEFAULT)


@pytest.fixture
def planted_db(tmp_path, tiny_embedder):
    texts = ["a golden retriever running on a sandy beach", "a bar chart of monthly rainfall"]
    planted = tiny_embedder.encode_texts(texts, dtype="float32")
    noise = np.random.default_rng(0).standard_normal((30, tiny_embedder.dim)).astype(np.float32)
    write_source(tmp_path / "db" / "cc12m", "cc12m", np.vstack([planted[:1], noise[:15]]))
    write_source(
        tmp_path / "db" / "chartqa",
        "chartqa",
        np.vstack([planted[1:], noise[15:]]),
        keys=[f"chart_{i:03d}.png" for i in range(16)],
    )
    return tmp_path / "db"


def test_json_quiet_threads_on_embed_build_index_align_eval(
    tmp_path, planted_db, capsys, monkeypatch
):
    for name in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS"):  # --threads sets them: restore after
        monkeypatch.delenv(name, raising=False)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        PIL.Image.fromarray(synthetic_photo(40, 30, seed=i)).save(imgs / f"{i}.png")
    args = [str(imgs), "-o", str(tmp_path / "emb"), "--source", "x", "--threads", "1"]
    assert cli.main(["embed", *args, "--model", "open_clip:starkret-tiny", "--json", "-q"]) == 0
    out, err = capsys.readouterr()
    body = json.loads(out)
    assert (body["embedded"], body["failed"]) == (3, 0) and err == ""
    manifest = json.loads((tmp_path / "emb" / "starkret.json").read_text())
    assert manifest["model"] == "starkret-tiny"

    assert cli.main(["build-index", str(planted_db), "--json", "--quiet", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert [s["count"] for s in json.loads(out)["sources"]] == [16, 16] and err == ""

    out_file = tmp_path / "aligned.jsonl"
    dialogues = str(EXAMPLES / "stark_dialogues.jsonl")
    assert cli.main(["align", str(planted_db), dialogues, "-o", str(out_file), "--json", "-q"]) == 0
    out, err = capsys.readouterr()
    body = json.loads(out)
    assert body["moments"] > 0 and body["output"] == str(out_file) and err == ""

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps(
            {"description": "a bar chart of monthly rainfall", "image_key": "chartqa/chart_000.png"}
        )
        + "\n"
    )
    assert (
        cli.main(["eval", str(planted_db), str(pairs), "--quiet", "--threads", "1", "--json"]) == 0
    )
    out, err = capsys.readouterr()
    assert json.loads(out)["count"] == 1 and err == ""


def test_progress_bars_on_build_index_and_eval(tmp_path, planted_db, capsys):
    assert cli.main(["build-index", str(planted_db)]) == 0
    assert "indexing" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"description": "a red bicycle", "image_key": "cc12m/000000001"}) + "\n"
    )
    assert cli.main(["eval", str(planted_db), str(pairs)]) == 0
    assert "evaluating" in capsys.readouterr().err
