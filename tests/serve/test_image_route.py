"""``GET /image`` answers for every input kind embed reads, with the original bytes."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from serve_support import Server

import starkret
from starkret.testing.inputs import embed_every_input_kind


@pytest.fixture(scope="module")
def every_kind_db(tmp_path_factory, tiny_embedder):
    return embed_every_input_kind(tmp_path_factory.mktemp("kinds"), tiny_embedder)


def test_image_answers_with_the_original_bytes_for_every_input_kind(every_kind_db, tiny_embedder):
    folder, images = every_kind_db
    db = starkret.ImageDB.open(folder, embedder=tiny_embedder)
    wrong = {}
    with Server(db) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        for source, keys in images.items():
            for key, data in keys.items():
                r = c.get(f"/image/{source}/{quote(key, safe='')}")
                kind = "image/jpeg" if data[:2] == b"\xff\xd8" else "image/png"
                if r.status_code != 200:
                    wrong[key] = (r.status_code, r.text[:200])
                elif r.content != data or r.headers["content-type"] != kind:
                    wrong[key] = (len(r.content), r.headers["content-type"])
        missing = c.get(f"/image/parquet/{quote('parquet/photos/99', safe='')}")
    assert not wrong
    assert missing.status_code == 404
