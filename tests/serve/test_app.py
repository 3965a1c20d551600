"""`starkret serve`: the API against a real server on 127.0.0.1 (a free port, started and
stopped by the tests), on a demo-like DB embedded with starkret-tiny."""

from __future__ import annotations

import json
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_support import GatedDB, Server, build_demo_db  # noqa: E402

import starkret  # noqa: E402
from starkret.serve.conversations import Conversations  # noqa: E402
from starkret.serve.schema import MAX_BODY_BYTES, MAX_K, ServeConfig  # noqa: E402
from starkret.store.layout import part_file  # noqa: E402
from starkret.testing import write_source  # noqa: E402


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _keys(results):
    return [[h["key"] for hits in r["hits"].values() for h in hits] for r in results]


# ==== search ====


def test_search_answers_per_query_per_source_like_imagedb_search(client, demo_db):
    queries = ["a dog on a beach", "a bar chart"]
    r = client.post("/search", json={"queries": queries, "k": 3})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    direct = demo_db.search(queries, k=3)
    for result, hits in zip(results, direct, strict=True):
        assert set(result["hits"]) == set(demo_db.sources)
        for source, served in result["hits"].items():
            expected = [h for h in hits if h.source == source]
            assert [h["key"] for h in served] == [h.key for h in expected]
            assert [h["score"] for h in served] == pytest.approx(
                [h.score for h in expected], abs=1e-5
            )
            for h in served:
                assert h["image"].startswith(f"/image/{source}/")


def test_search_takes_vectors_sources_and_exclusions(client, demo_db):
    vector = np.random.default_rng(3).standard_normal(demo_db.dim).tolist()
    first = client.post("/search", json={"queries": [vector], "k": 2, "sources": ["cc12m"]})
    assert first.status_code == 200, first.text
    hits = first.json()["results"][0]["hits"]
    assert list(hits) == ["cc12m"]
    best = hits["cc12m"][0]["key"]
    expected = demo_db.search(np.array([vector]), k=2, sources=["cc12m"])[0]
    assert [h["key"] for h in hits["cc12m"]] == [h.key for h in expected]
    again = client.post(
        "/search", json={"queries": [vector], "k": 2, "sources": ["cc12m"], "exclude": [best]}
    )
    assert best not in _keys(again.json()["results"])[0]


def test_concurrent_requests_are_searched_in_one_batch(demo_db):
    gated = GatedDB(demo_db)
    texts = [f"query number {i}" for i in range(9)]
    with Server(gated, ServeConfig(batch_wait_ms=1)) as s:
        answers: dict[int, dict] = {}

        def ask(i: int) -> None:
            with httpx.Client(base_url=s.url, timeout=60) as c:
                answers[i] = c.post("/search", json={"queries": [texts[i]], "k": 2}).json()

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        deadline = time.monotonic() + 30
        while not gated.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        # The batcher is busy with request 0: the next 8 queue up behind it.
        others = [threading.Thread(target=ask, args=(i,)) for i in range(1, 9)]
        for t in others:
            t.start()
        batcher = s.app.state.batcher
        while batcher.pending() < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        gated.gate.set()
        for t in [first, *others]:
            t.join(60)
        with httpx.Client(base_url=s.url) as c:
            stats = c.get("/stats").json()
    assert gated.calls == [1, 8]
    assert stats["batches"] == 2 and stats["max_batch_size"] == 8
    direct = demo_db.search(texts, k=2)
    for i in range(9):
        assert sorted(_keys(answers[i]["results"])[0]) == sorted(h.key for h in direct[i])


def test_several_batcher_threads_answer_every_request_correctly(demo_db):
    texts = [f"a photo of thing {i}" for i in range(12)]
    direct = demo_db.search(texts, k=1)
    answers: dict[int, list[str]] = {}
    with Server(demo_db, ServeConfig(workers=3)) as s:

        def ask(i: int) -> None:
            with httpx.Client(base_url=s.url, timeout=60) as c:
                r = c.post("/search", json={"queries": [texts[i]], "k": 1})
                answers[i] = _keys(r.json()["results"])[0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert {i: sorted(a) for i, a in answers.items()} == {
        i: sorted(h.key for h in direct[i]) for i in range(12)
    }


# ==== refusals ====


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b'{"queries": ["a dog"', 400, "malformed JSON"),
        (b'{"queries": [[1.0, 2.0]]}', 422, "wrong vector dimension"),
        (b'{"queries": ["a dog"], "sources": ["nope"]}', 422, "unknown source 'nope'"),
        (json.dumps({"queries": ["a"], "k": MAX_K + 1}).encode(), 422, "invalid k"),
        (b'{"queries": ["a"], "k": 0}', 422, "invalid k"),
        (b'{"queries": []}', 422, "invalid queries"),
        (b'{"queries": "a dog"}', 422, "invalid queries"),
        (b'{"queries": ["a"], "surprise": 1}', 422, "invalid surprise"),
        (b"[1, 2]", 422, "invalid"),
        (b'{"queries": [[1e308, 1e308]]}', 422, "wrong vector dimension"),
    ],
)
def test_bad_search_requests_get_4xx_with_a_one_line_reason(client, body, status, reason):
    r = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert reason in detail and "\n" not in detail
    assert client.get("/health").json()["status"] == "ok"


def test_vectors_that_overflow_or_have_no_direction_are_refused(client, demo_db):
    for vector, why in (([1e308] * demo_db.dim, "norm inf"), ([0.0] * demo_db.dim, "norm 0.0")):
        r = client.post("/search", json={"queries": [vector]})
        assert r.status_code == 422 and why in r.json()["detail"]


def test_oversized_bodies_are_refused_with_413_with_or_without_content_length(server):
    big = b'{"queries": ["' + b"a" * (MAX_BODY_BYTES + 10) + b'"]}'

    def chunks():
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    with httpx.Client(base_url=server.url, timeout=30) as c:
        sized = c.post("/search", content=big, headers={"content-type": "application/json"})
        streamed = c.post("/search", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in streamed.request.headers
        for r in (sized, streamed):
            assert r.status_code == 413 and r.json()["detail"].startswith("too large")
        assert c.get("/health").status_code == 200


# ==== images ====


def test_image_bytes_come_from_the_shard_or_folder_and_remote_images_redirect(client, demo_db):
    root = demo_db.root.parent / "sources"
    with tarfile.open(root / "cc12m" / "00001.tar") as tar:
        original = tar.extractfile("000010003.jpg").read()
    r = client.get("/image/cc12m/cc12m/000010003")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == original
    chart = client.get("/image/chartqa/chartqa/chart_001.png")
    assert chart.content == (root / "chartqa" / "png" / "chart_001.png").read_bytes()
    assert chart.headers["content-type"] == "image/png"
    remote = client.get("/image/remote/remote/r1", follow_redirects=False)
    assert remote.status_code == 307
    assert remote.headers["location"] == "https://img.example/remote/r1.jpg"


@pytest.mark.parametrize("key_column", [True, False])
def test_image_bytes_come_from_a_parquet_table(tmp_path, tiny_embedder, key_column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from starkret.testing import encode, synthetic_photo

    photos = [encode(synthetic_photo(48, 40, seed=i), "PNG") for i in range(5)]
    columns = {"image": photos, "caption": [f"photo {i}" for i in range(5)]}
    if key_column:
        columns["key"] = [f"k{i}" for i in range(5)]
    pq.write_table(pa.table(columns), tmp_path / "photos.parquet", row_group_size=2)
    starkret.embed(
        tmp_path / "photos.parquet",
        tmp_path / "db" / "tbl",
        source_name="tbl",
        embedder=tiny_embedder,
        chunk_size=3,
        progress=False,
    )
    db = starkret.ImageDB.open(tmp_path / "db", embedder=tiny_embedder)
    key = "tbl/k3" if key_column else "tbl/photos/3"
    with Server(db) as s, httpx.Client(base_url=s.url) as c:
        r = c.get(f"/image/tbl/{key}")
        missing = c.get("/image/tbl/tbl/photos/99")
    assert r.status_code == 200, r.text
    assert r.content == photos[3] and r.headers["content-type"] == "image/png"
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        "/image/chartqa/chartqa%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/image/chartqa/%2Fetc%2Fpasswd",
        "/image/chartqa/chartqa/chart_999.png",
        "/image/nope/nope/x",
        "/image/cc12m/chartqa/chart_001.png",
    ],
)
def test_image_paths_outside_the_db_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["detail"].startswith(("not found", "unknown source"))


def test_a_metadata_key_escaping_the_folder_is_never_read(tmp_path, tiny_embedder):

    db_dir = build_demo_db(tmp_path, tiny_embedder)
    import pyarrow.parquet as pq

    secret = tmp_path / "sources" / "chartqa" / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    meta = part_file(db_dir / "chartqa", "metadata", 0)
    table = pq.read_table(meta)
    keys = table.column("key").to_pylist()
    keys[0] = "chartqa/../secret.png"
    table = table.set_column(table.column_names.index("key"), "key", [keys])
    pq.write_table(table, meta)
    db = starkret.ImageDB.open(db_dir, embedder=tiny_embedder)
    with Server(db) as s, httpx.Client(base_url=s.url) as c:
        r = c.get("/image/chartqa/chartqa%2F..%2Fsecret.png")
    assert r.status_code == 404 and "no local bytes" in r.json()["detail"]
    assert b"PNG" not in r.content


# ==== align and conversations ====


def _planted_db(folder: Path):
    """A (near-duplicate of A), A, B, C at decreasing similarity to axis 0."""
    dim = 16
    v = np.zeros((4, dim), np.float32)
    v[0, 0], v[0, 1] = 1.0, 0.05  # A
    v[1, 0], v[1, 1] = 1.0, 0.08  # A': a near duplicate of A
    v[2, 0], v[2, 2] = 0.8, 0.6  # B
    v[3, 0], v[3, 3] = 0.6, 0.8  # C
    write_source(folder / "photos", "photos", v, keys=["A", "A2", "B", "C"])
    return starkret.ImageDB.open(folder)


def _query(dim: int = 16) -> list[float]:
    q = [0.0] * dim
    q[0] = 1.0
    return q


def test_align_never_shows_a_conversation_the_same_image_or_a_near_duplicate(tmp_path):
    db = _planted_db(tmp_path)
    config = ServeConfig(min_score=0.5, near_duplicate_threshold=0.99)
    with Server(db, config) as s, httpx.Client(base_url=s.url) as c:
        chosen = []
        for _ in range(3):
            r = c.post("/align", json={"conversation_id": "c1", "moments": [{"vector": _query()}]})
            assert r.status_code == 200, r.text
            (a,) = r.json()["alignments"]
            chosen.append((a["status"], [i["key"] for i in a["images"]]))
        # A, then B (A reused, A2 a near duplicate of A), then C scores 0.6 >= 0.5.
        assert chosen == [("ok", ["photos/A"]), ("ok", ["photos/B"]), ("ok", ["photos/C"])]
        r = c.post("/align", json={"conversation_id": "c1", "moments": [{"vector": _query()}]})
        assert r.json()["alignments"][0]["status"] == "exhausted"
        # Another conversation starts afresh; a high min_score asks for a fallback.
        other = c.post(
            "/align",
            json={"conversation_id": "c2", "moments": [{"vector": _query()}], "min_score": 0.999},
        ).json()["alignments"][0]
        assert other["status"] == "below_threshold" and other["images"] == []
        shown = c.get("/conversation/c1").json()
        assert [i["key"] for i in shown["shown"]] == ["photos/A", "photos/B", "photos/C"]
        assert c.delete("/conversation/c1").json()["reset"] is True
        assert c.get("/conversation/c1").status_code == 404
        r = c.post("/align", json={"conversation_id": "c1", "moments": [{"vector": _query()}]})
        assert r.json()["alignments"][0]["images"][0]["key"] == "photos/A"


def test_align_matches_the_aligner_for_a_fresh_conversation(client, demo_db):
    descriptions = ["a dog on a beach", "a red bicycle", "a dog on a beach", "sunset", "a chart"]
    aligner = starkret.Aligner(demo_db, k_per_source=5, min_score=-1.0)
    expected = aligner.align(
        [
            {"episode_id": "e", "moment_id": f"m{i}", "description": d}
            for i, d in enumerate(descriptions)
        ]
    )
    r = client.post(
        "/align",
        json={
            "conversation_id": "fresh",
            "moments": [{"description": d} for d in descriptions],
            "min_score": -1.0,
        },
    )
    assert r.status_code == 200, r.text
    got = r.json()["alignments"]
    assert [a["status"] for a in got] == [a.status for a in expected]
    assert [[i["key"] for i in a["images"]] for a in got] == [
        [c.key for c in a.images] for a in expected
    ]


def _clustered_db(folder: Path, dim: int = 16):
    """Two sources of images around four topics, with near-duplicate groups (within a
    source and across the two); returns the DB, its unit vectors and the topics."""
    rng = np.random.default_rng(11)
    topics = rng.standard_normal((4, dim))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    vectors = {}
    for name, n in (("charts", 14), ("photos", 24)):
        v = topics[rng.integers(0, 4, n)] + 0.45 * rng.standard_normal((n, dim))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        for copy, of in ((1, 0), (2, 0), (7, 6)):  # near copies (cosine > 0.99)
            v[copy] = v[of] + 0.01 * rng.standard_normal(dim)
        vectors[name] = v / np.linalg.norm(v, axis=1, keepdims=True)
    vectors["photos"][10] = vectors["charts"][3] + 0.01 * rng.standard_normal(dim)
    vectors["photos"][10] /= np.linalg.norm(vectors["photos"][10])
    for name, v in vectors.items():
        write_source(folder / name, name, v, part_size=10)
    return starkret.ImageDB.open(folder), vectors, topics


def _reference_choice(db, vectors, moments, rule):
    """reference_select over every row of every source, one episode per conversation
    (its moments in order): ``[(status, keys)]`` in the order of ``moments``."""
    from starkret.testing import reference_select

    rows = [
        (s, name, row, vectors[name][row].astype(np.float16).astype(np.float32))
        for s, name in enumerate(db.sources)
        for row in range(len(vectors[name]))
    ]
    spec, lists = [], []
    episodes = {}
    for m in moments:
        episodes.setdefault(m["conversation"], len(episodes))
    order = sorted(range(len(moments)), key=lambda i: episodes[moments[i]["conversation"]])
    for m in (moments[i] for i in order):
        q = np.asarray(m["vector"], np.float32)
        q /= np.linalg.norm(q)
        ranked = sorted(rows, key=lambda r: (-float(r[3] @ q), r[1], r[2]))
        lists.append(ranked)
        spec.append(
            {
                "episode": episodes[m["conversation"]],
                "k": m["k"],
                "ids": [(s << 40) | row for s, _, row, _ in ranked],
                "scores": [float(v @ q) for *_, v in ranked],
                "vectors": [v for *_, v in ranked],
            }
        )
    chosen = reference_select(spec, reuse="episode", **rule)
    out = [None] * len(moments)
    for i, ranked, (picked, outcome) in zip(order, lists, chosen, strict=True):
        out[i] = (outcome, [f"{ranked[p][1]}/{ranked[p][2]:09d}" for p in picked])
    return out


def test_align_across_requests_equals_the_aligner_and_the_reference(tmp_path):
    # One conversation asks again and again about the same topics, so later turns meet
    # images shown earlier and their near duplicates; a second conversation interleaves.
    db, vectors, topics = _clustered_db(tmp_path)
    rng = np.random.default_rng(12)
    requests = []
    for r in range(7):
        conversation = "talk" if r % 3 else "other"
        moments = []
        for j in range(int(rng.integers(1, 4))):
            q = topics[int(rng.integers(0, 2))] + 0.2 * rng.standard_normal(topics.shape[1])
            if rng.random() < 0.15:
                q = rng.standard_normal(topics.shape[1])  # about nothing in the DB
            k = int(rng.integers(1, 3))
            moments.append({"vector": q.tolist(), "k": k, "moment_id": f"r{r}m{j}"})
        requests.append((conversation, moments))
    rule = {"threshold": 0.97, "min_score": 0.35}
    config = ServeConfig(min_score=rule["min_score"], near_duplicate_threshold=rule["threshold"])
    served = []
    with Server(db, config) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        for conversation, moments in requests:
            r = c.post("/align", json={"conversation_id": conversation, "moments": moments})
            assert r.status_code == 200, r.text
            served += [
                (a["status"], [i["key"] for i in a["images"]]) for a in r.json()["alignments"]
            ]
    flat = [
        {**m, "conversation": conversation, "episode_id": conversation}
        for conversation, moments in requests
        for m in moments
    ]
    aligner = starkret.Aligner(
        db,
        min_score=rule["min_score"],
        near_duplicate_threshold=rule["threshold"],
        reuse="episode",
    )
    aligned = [
        (a.status, [c.key for c in a.images])
        for a in aligner.align(
            [{k: m[k] for k in ("episode_id", "moment_id", "vector", "k")} for m in flat]
        )
    ]
    reference = _reference_choice(db, vectors, flat, rule)
    assert served == aligned == reference
    # the case is not trivial: images were refused as shown or near copies, some moments
    # found nothing good enough, and no conversation was shown one image twice
    statuses = [status for status, _ in served]
    assert "ok" in statuses and "below_threshold" in statuses
    for conversation in ("talk", "other"):
        keys = [
            k
            for m, (_, ks) in zip(flat, served, strict=True)
            for k in ks
            if m["conversation"] == conversation
        ]
        assert len(keys) == len(set(keys))
    firsts = [
        _reference_choice(db, vectors, [{**m, "k": 1, "conversation": i}], rule)[0][1]
        for i, m in enumerate(flat)
    ]
    assert any(f and f[0] not in ks for f, (_, ks) in zip(firsts, served, strict=True))


def test_concurrent_align_requests_of_one_conversation_never_share_an_image(tmp_path):
    db, _, topics = _clustered_db(tmp_path)
    config = ServeConfig(min_score=-1.0, near_duplicate_threshold=0.97, workers=2)
    answers: list[list[str]] = []
    with Server(db, config) as s:

        def ask() -> None:
            with httpx.Client(base_url=s.url, timeout=60) as c:
                body = {"conversation_id": "busy", "moments": [{"vector": topics[0].tolist()}]}
                r = c.post("/align", json=body)
                answers.append([i["key"] for a in r.json()["alignments"] for i in a["images"]])

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    keys = [k for keys in answers for k in keys]
    assert len(answers) == 6 and len(keys) == 6 and len(set(keys)) == 6


def test_align_parses_ultron_outputs_and_dialogues(client):
    r = client.post(
        "/align",
        json={
            "conversation_id": "parse",
            "ultron_outputs": ["Sure! <RET> <h> my dog Star on the sofa </h></s>", "no image"],
            "dialogue": "A: hi\nB: [Sharing Image] <a beach at dusk>",
            "min_score": -1.0,
        },
    )
    assert r.status_code == 200, r.text
    descriptions = [a["description"] for a in r.json()["alignments"]]
    assert descriptions == ["my dog Star on the sofa", "a beach at dusk"]
    text = client.post(
        "/align",
        json={"conversation_id": "parse", "text": "<RET><h>a red bike", "min_score": -1.0},
    )
    assert [a["description"] for a in text.json()["alignments"]] == ["a red bike"]
    empty = client.post("/align", json={"conversation_id": "parse", "text": "just chatting"})
    assert empty.status_code == 422 and empty.json()["detail"].startswith("empty")
    both = client.post(
        "/align",
        json={"conversation_id": "parse", "moments": [{"description": "x", "vector": [1.0]}]},
    )
    assert both.status_code == 422


def test_conversations_are_bounded_and_expire():
    now = [0.0]
    conversations = Conversations(2, ttl_s=10.0, max_shown=2, clock=lambda: now[0])
    a = conversations.get("a")
    conversations.get("b")
    conversations.get("a")
    conversations.get("c")  # evicts b, the least recently used
    assert conversations.get("b", create=False) is None and conversations.evicted == 1
    for n in range(3):
        conversations.remember(a, ("s", n), {"key": str(n)}, np.zeros(2, np.float32))
    assert [r["key"] for r in a.shown.values()] == ["1", "2"] and len(a.vectors) == 2
    now[0] = 11.0
    assert conversations.get("a", create=False) is None and conversations.expired == 2
    assert len(conversations) == 0


# ==== clip back compatibility, health, stats ====


def test_knn_service_answers_in_clip_backs_shape(client, demo_db):
    assert client.get("/indices-list").json() == demo_db.sources
    r = client.post(
        "/knn-service",
        json={
            "text": "a dog",
            "modality": "image",
            "num_images": 3,
            "indice_name": "cc12m",
            # the tiny model's images are near duplicates of each other: deduplicate
            # would leave one (tests/serve/test_clip_client.py covers it)
            "deduplicate": False,
            "use_safety_model": False,
        },
    )
    assert r.status_code == 200, r.text
    rows = r.json()
    assert len(rows) == 3
    assert {"id", "url", "caption", "similarity"} <= set(rows[0])
    assert [row["similarity"] for row in rows] == sorted(
        (x["similarity"] for x in rows), reverse=True
    )
    local = client.post("/knn-service", json={"text": "a chart", "indice_name": "chartqa"}).json()
    assert all("/image/chartqa/" in row["url"] for row in local)
    image = client.post("/knn-service", json={"image": "aGVsbG8="})  # b"hello"
    assert image.status_code == 422 and image.json() == {"message": image.json()["message"]}
    assert image.json()["message"].startswith("bad image: not an image")


def test_health_stats_openapi_and_page(client):
    assert client.get("/health").json()["status"] == "ok"
    client.post("/search", json={"queries": ["a"]})
    stats = client.get("/stats").json()
    assert stats["queries"] >= 1 and "p99_ms" in stats["latency"]["/search"]
    assert stats["limits"]["max_k"] == MAX_K
    spec = client.get("/openapi.json").json()
    assert {"/search", "/align", "/knn-service", "/image/{source}/{key}"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and 'id="gallery"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: offline


def test_starkret_serve_command_serves_the_db(demo_db, monkeypatch):
    """`starkret serve DB --port P` end to end, in-process (a subprocess spends most of
    its time importing torch): uvicorn.run is wrapped only to be able to stop it."""
    import socket

    import uvicorn

    from starkret.cli import commands as cli

    servers: list = []

    def run(app, **options):
        server = uvicorn.Server(uvicorn.Config(app, **options))
        servers.append(server)
        server.run()

    monkeypatch.setattr(uvicorn, "run", run)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["serve", str(demo_db.root), "--port", str(port), "--workers", "2"]
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(cli.main(argv)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (servers and servers[0].started):
            assert thread.is_alive(), "starkret serve exited early"
            assert time.monotonic() < deadline, "starkret serve did not come up"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health", timeout=30).json()["images"] == len(demo_db)
        r = httpx.post(f"{base}/search", json={"queries": ["a dog"], "k": 1}, timeout=30)
        assert r.status_code == 200
        assert httpx.get(f"{base}/stats", timeout=30).json()["limits"]["workers"] == 2
    finally:
        if servers:
            servers[0].should_exit = True
        thread.join(30)
    assert codes == [0]


def test_starkret_serve_refuses_bad_options(demo_db, capsys):
    from starkret.cli import commands as cli

    assert cli.main(["serve", str(demo_db.root), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


# ==== property-based: requests generated from the OpenAPI description ====

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402


def test_generated_requests_never_get_a_server_error(server):
    """Requests generated from /openapi.json (valid and invalid bodies, odd paths):
    never a 5xx, every refusal a one-line reason."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 8
    modes = list(schemathesis.GenerationMode)  # valid and invalid requests
    for operation, mode in ((op, mode) for op in operations for mode in modes):

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case):
            response = case.call(base_url=server.url, timeout=30)
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                # clip back's endpoint answers in clip back's shape
                field = "message" if case.operation.path == "/knn-service" else "detail"
                detail = response.json()[field]
                assert isinstance(detail, str) and "\n" not in detail

        try:
            check()
        except Unsatisfiable:
            # No invalid request exists for an operation without parameters (GET /health).
            assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
    assert httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"
