"""`starkret serve` picks up a source that build-index grew, without a restart (issue 23):
the batcher stats each source's index/infos.json before a batch and re-opens the ones a
build has published anew."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_support import Server  # noqa: E402

from starkret import ImageDB, build_index  # noqa: E402
from starkret.testing import write_manifest, write_part, write_source  # noqa: E402

DIM = 16


def _unit(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _top_key(client, vector) -> str:
    body = {"queries": [vector.tolist()], "k": 1}
    response = client.post("/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["hits"]["src"][0]["key"]


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_serve_answers_from_a_grown_source_without_a_restart(tmp_path, kind):
    rng = np.random.default_rng(0)
    vectors = _unit(rng, 1200)
    folder = tmp_path / "db" / "src"
    write_source(folder, "src", vectors[:1000], part_size=250)
    build_index(folder, kind=kind)
    db = ImageDB.open(tmp_path / "db")
    with Server(db) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health").json()["images"] == 1000
        new = vectors[1100]
        assert _top_key(client, new) != "src/000001100"  # not in the DB yet

        keys = [f"{i:09d}" for i in range(1000, 1200)]
        write_part(
            folder,
            "src",
            4,
            keys,
            vectors[1000:],
            urls=[None] * 200,
            captions=[None] * 200,
            shard="part4",
        )
        write_manifest(folder, "src", DIM, 1200, model="starkret-tiny", pretrained=None)
        assert _top_key(client, new) != "src/000001100"  # embedded, not indexed yet
        assert build_index(folder, kind=kind)["added"] == 200

        assert _top_key(client, new) == "src/000001100"
        assert client.get("/health").json()["images"] == 1200


def test_refresh_is_a_no_op_while_nothing_was_published(tmp_path):
    folder = tmp_path / "db" / "src"
    write_source(folder, "src", _unit(np.random.default_rng(1), 300), part_size=100)
    build_index(folder, kind="exact")
    db = ImageDB.open(tmp_path / "db")
    assert db.refresh() == []
    build_index(folder, kind="exact", rebuild=True)
    assert db.refresh() == ["src"] and db.refresh() == []
