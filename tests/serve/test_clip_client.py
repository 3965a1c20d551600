"""clip-retrieval's own ``ClipClient`` (``clip_retrieval.clip_client``, the client clip
back's users already have) against ``starkret serve``'s ``/knn-service`` on 127.0.0.1.

The client module needs only ``requests``; clip-retrieval's package ``__init__`` imports
clip back, torch and the rest, so the module is loaded from its file. ``scripts/
bootstrap.sh`` installs clip-retrieval without its dependencies; elsewhere
``STARKRET_CLIP_RETRIEVAL_PATH`` may name a ``pip install --no-deps --target`` of it.
Without it these tests skip, except under ``CI`` where they fail.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import socket
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_support import Server  # noqa: E402

import starkret  # noqa: E402
from starkret.defaults import DEFAULTS  # noqa: E402
from starkret.errors import RequestError  # noqa: E402
from starkret.serve.clipback import fetch_image, first_of_near_duplicates  # noqa: E402
from starkret.serve.schema import ServeConfig  # noqa: E402
from starkret.testing import raw_png, serve_directory, write_source  # noqa: E402

THRESHOLD = DEFAULTS.near_duplicate_threshold


def _clip_client_module():
    """clip-retrieval's ``clip_client`` module, loaded from its file (not via the
    package, whose ``__init__`` needs torch, flask, faiss, ...)."""
    root = os.environ.get("STARKRET_CLIP_RETRIEVAL_PATH")
    if root:
        folders = [str(Path(root, "clip_retrieval"))]
    else:
        spec = importlib.util.find_spec("clip_retrieval")  # finds it, runs nothing
        folders = list(spec.submodule_search_locations or []) if spec else []
    path = next(
        (Path(f, "clip_client.py") for f in folders if Path(f, "clip_client.py").is_file()), None
    )
    why = None
    if path is None:
        why = "clip-retrieval is not installed (scripts/bootstrap.sh installs it --no-deps)"
    elif importlib.util.find_spec("requests") is None:
        why = "requests (clip-retrieval's ClipClient needs it) is not installed"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip_client():
    return _clip_client_module()


@pytest.fixture(scope="module")
def url_server(demo_db):
    with Server(demo_db, ServeConfig(allow_image_urls=True)) as s:
        yield s


def _client(module, server, **options):
    return module.ClipClient(url=server.url + "/knn-service", **options)


def clip_backs_dedup(vectors: np.ndarray, threshold: float) -> list[int]:
    """clip back's ``connected_components_dedup``, written as it is (a Python graph walk
    over range-search neighbours): the indices it removes."""
    sims = vectors @ vectors.T
    neighbours = defaultdict(list)
    for i in range(len(vectors)):
        for j in np.flatnonzero(sims[i] >= threshold).tolist():
            neighbours[i].append(j)
    seen: set[int] = set()
    removed = set()
    for node in neighbours:
        if node in seen:
            continue
        group, todo = [], {node}
        while todo:
            n = todo.pop()
            seen.add(n)
            todo |= set(neighbours[n]) - seen
            group.append(n)
        removed |= set(group[1:])
    return sorted(removed)


def _expected(db, query, k, sources=None, *, deduplicate):
    """What clip back answers: the top ``k`` (merged over ``sources``), filtered."""
    [hits] = db.search(query, k=k, sources=sources)
    hits = sorted(hits, key=lambda h: -h.score)[:k]
    if deduplicate:
        vectors = np.stack([db.vectors(h.source, [h.row])[0] for h in hits])
        drop = set(clip_backs_dedup(vectors, THRESHOLD))
        hits = [h for i, h in enumerate(hits) if i not in drop]
    return hits


# ==== text and vector queries ====


def test_text_query_with_clip_clients_defaults_is_clip_backs_answer(clip_client, server, demo_db):
    """ClipClient's defaults (deduplicate=True, modality image, safety on, 40 images,
    indice 'all') give the top results of all sources with near duplicates removed."""
    text = "a dog on a beach"
    rows = _client(clip_client, server, indice_name="all").query(text=text)
    assert isinstance(rows, list), rows
    expected = _expected(demo_db, [text], 40, deduplicate=True)
    assert len(expected) < min(40, len(demo_db))  # the tiny model's images: near duplicates
    assert [r["key"] for r in rows] == [h.key for h in expected]
    assert [r["similarity"] for r in rows] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert {"id", "url", "caption", "similarity"} <= set(rows[0])
    plain = _client(clip_client, server, indice_name="cc12m", num_images=3, deduplicate=False)
    rows = plain.query(text=text)
    assert [r["key"] for r in rows] == [
        h.key for h in _expected(demo_db, [text], 3, ["cc12m"], deduplicate=False)
    ]


# ==== image queries ====


def _image_of(db, source: str, key: str, folder: Path) -> Path:
    data = db.image_bytes(source, key)
    assert data is not None
    path = folder / Path(key).name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("source", "key"), [("cc12m", "cc12m/000010003"), ("chartqa", "chartqa/chart_002.png")]
)
def test_image_query_by_path_finds_the_image_itself_first(
    clip_client, server, demo_db, tmp_path, source, key
):
    """``query(image=path)`` sends the file's bytes in base64: decoded and embedded as
    ``embed`` did, the DB's own image comes back first with cosine ~1."""
    path = _image_of(demo_db, source, key, tmp_path)
    for indice in (source, "all"):
        rows = _client(clip_client, server, indice_name=indice, num_images=3).query(image=str(path))
        assert isinstance(rows, list), rows
        assert rows[0]["key"] == key and rows[0]["source"] == source
        assert rows[0]["similarity"] > 0.995
        stored = demo_db.vectors(source, [demo_db.locate(key, [source])[1]])
        [[best]] = demo_db.search(stored, k=1, sources=[source])
        assert rows[0]["similarity"] == pytest.approx(best.score, abs=5e-3)


def test_a_bad_or_oversized_image_is_a_4xx_in_clip_backs_shape(clip_client, server, tmp_path):
    not_image = tmp_path / "notes.jpg"
    not_image.write_bytes(b"this is not an image at all")
    answer = _client(clip_client, server, indice_name="all").query(image=str(not_image))
    assert set(answer) == {"message"} and answer["message"].startswith("bad image: not an image")
    bomb = raw_png(np.zeros((1, 3 * 10_000), np.uint8), width=10_000, height=10_000,
                   color_type=2, bit_depth=8)  # fmt: skip
    r = httpx.post(
        server.url + "/knn-service",
        json={"image": base64.b64encode(bomb).decode(), "num_images": 1},
        timeout=30,
    )
    assert r.status_code == 422 and r.json()["message"].startswith("bad image: too large")
    for body, status, start in (
        (b"{not json", 400, "malformed JSON"),
        (b'{"image": "%%% not base64"}', 422, "bad image: the image field is not base64"),
        (b'{"text": "a", "indice_name": "nope"}', 422, "unknown indice_name 'nope'"),
        (b"{}", 422, "empty"),
    ):
        r = httpx.post(server.url + "/knn-service", content=body, timeout=30)
        assert r.status_code == status and set(r.json()) == {"message"}, r.text
        assert r.json()["message"].startswith(start) and "\n" not in r.json()["message"]


def test_image_url_is_refused_unless_the_server_allows_fetching(
    clip_client, server, url_server, demo_db, tmp_path
):
    key = "cc12m/000000004"
    _image_of(demo_db, "cc12m", key, tmp_path)
    with serve_directory(tmp_path) as base:
        url = f"{base}/{Path(key).name}"
        refused = _client(clip_client, server, indice_name="cc12m").query(image=url)
        assert set(refused) == {"message"} and "--allow-image-urls" in refused["message"]
        r = httpx.post(server.url + "/knn-service", json={"image_url": url}, timeout=30)
        assert r.status_code == 403
        rows = _client(clip_client, url_server, indice_name="cc12m", num_images=2).query(image=url)
        assert isinstance(rows, list), rows
        assert rows[0]["key"] == key and rows[0]["similarity"] > 0.995
        missing = _client(clip_client, url_server, indice_name="cc12m").query(
            image=f"{base}/absent.jpg"
        )
        assert missing["message"].startswith("bad image_url:") and "404" in missing["message"]
    for bad in ("file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "http:///x.jpg"):
        r = httpx.post(url_server.url + "/knn-service", json={"image_url": bad}, timeout=30)
        assert r.status_code == 422 and "not an http(s) URL" in r.json()["message"], r.text


def test_an_image_url_fetch_is_bounded_in_bytes_and_time(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    with serve_directory(tmp_path) as base:
        with pytest.raises(RequestError, match="holds 5,000 bytes"):
            fetch_image(f"{base}/big.bin", max_bytes=4096)
        assert fetch_image(f"{base}/big.bin", max_bytes=5000) == b"x" * 5000
    # a server that sends a byte every 50 ms forever: cut at the deadline, not per read
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not stop.wait(0.05):
            try:
                conn.sendall(b"x")
            except OSError:
                break
        conn.close()

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        with pytest.raises(RequestError, match=r"took over 0\.5 s"):
            fetch_image(f"http://127.0.0.1:{listener.getsockname()[1]}/slow", timeout_s=0.5)
    finally:
        stop.set()
        thread.join(5)
        listener.close()


# ==== deduplicate, modality, ignored fields ====


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_embedder):
    """Vectors of known geometry: a chain a ~ b ~ c (a and c not near), a close pair
    d ~ e, and far ones; the query ranks them a, b, d, e, c, then the far ones."""
    dim = tiny_embedder.dim
    basis = np.eye(dim, dtype=np.float64)
    step = np.arccos(0.96)  # a~b and b~c at cosine 0.96, a~c at cos(2 step) = 0.843

    def planar(angle: float, i: int, j: int) -> np.ndarray:
        return np.cos(angle) * basis[i] + np.sin(angle) * basis[j]

    chain = [planar(n * step, 0, 1) for n in range(3)]
    pair = [planar(0.0, 2, 3), planar(np.arccos(0.97), 2, 3)]
    far = [basis[4 + i] for i in range(6)]
    vectors = np.stack(chain + pair + far)
    query = 0.6 * planar(-0.4, 0, 1) + 0.45 * planar(-0.2, 2, 3)
    query += 0.2 * sum(basis[4 + i] * (0.9 - 0.1 * i) for i in range(6))
    root = tmp_path_factory.mktemp("planted") / "db"
    keys = ["a", "b", "c", "d", "e", *[f"far{i}" for i in range(6)]]
    write_source(root / "planted", "planted", vectors.astype(np.float32), keys=keys)
    db = starkret.ImageDB.open(root, embedder=tiny_embedder)
    [hits] = db.search(query[None, :].astype(np.float32), k=len(keys))
    assert [h.key for h in hits][:5] == ["planted/" + k for k in "abdec"]  # the premise
    return db, query


def test_deduplicate_keeps_the_best_of_each_near_duplicate_group(clip_client, planted):
    db, query = planted
    with Server(db) as s:
        unique = _client(clip_client, s, indice_name="planted", num_images=11)
        rows = unique.query(embedding_input=query.tolist())
        everything = _client(clip_client, s, indice_name="planted", num_images=11,
                             deduplicate=False).query(embedding_input=query.tolist())  # fmt: skip
    keys = [r["key"] for r in rows]
    # b is a near duplicate of a; c is one of b (clip back's groups are connected
    # components, so c goes although it is not near a); e is one of d
    assert keys == [h.key for h in _expected(db, query[None, :], 11, deduplicate=True)]
    assert keys[:2] == ["planted/a", "planted/d"] and len(keys) == 11 - 3
    assert [r["key"] for r in everything][:5] == ["planted/" + k for k in "abdec"]


def test_first_of_near_duplicates_is_clip_backs_connected_components():
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 40, 100):
        centres = rng.standard_normal((max(1, n // 4), 16))
        vectors = centres[rng.integers(0, len(centres), n)] + 0.15 * rng.standard_normal((n, 16))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        keep = first_of_near_duplicates(vectors.astype(np.float32), 0.94)
        expected = np.ones(n, bool)
        expected[clip_backs_dedup(vectors.astype(np.float32), 0.94)] = False
        assert keep.tolist() == expected.tolist()


def test_modality_text_is_refused_there_being_no_caption_index(clip_client, server):
    text_client = _client(clip_client, server, indice_name="all",
                          modality=clip_client.Modality.TEXT)  # fmt: skip
    answer = text_client.query(text="a red bicycle")
    assert set(answer) == {"message"} and "modality 'text'" in answer["message"]
    r = httpx.post(server.url + "/knn-service", json={"text": "a", "modality": "text"}, timeout=30)
    assert r.status_code == 422
    r = httpx.post(server.url + "/knn-service", json={"text": "a", "modality": "x"}, timeout=30)
    assert r.status_code == 422 and r.json()["message"].startswith("invalid modality")


def test_fields_that_mean_nothing_here_are_accepted_and_ignored(
    clip_client, server, demo_db, tmp_path
):
    """Safety, violence, aesthetic and mclip options change nothing (clip front sends
    aesthetic_score as "" too), for text and image queries alike."""
    path = _image_of(demo_db, "cc12m", "cc12m/000000002", tmp_path)
    answers = []
    for on in (False, True):
        client = _client(
            clip_client,
            server,
            indice_name="all",
            num_images=5,
            deduplicate=False,
            use_mclip=on,
            aesthetic_score=5 if on else 9,
            aesthetic_weight=0.9 if on else 0.5,
            use_safety_model=on,
            use_violence_detector=on,
        )
        answers.append((client.query(text="sunset over the sea"), client.query(image=str(path))))
    assert answers[0] == answers[1]
    assert all(isinstance(a, list) and len(a) == 5 for a in answers[1])
    r = httpx.post(
        server.url + "/knn-service",
        json={"text": "a", "aesthetic_score": "", "aesthetic_weight": "", "num_images": 2},
        timeout=30,
    )
    assert r.status_code == 200 and len(r.json()) == 2


def test_starkret_serve_flag_allows_image_urls_and_the_tower_is_not_compiled(demo_db, monkeypatch):
    """`starkret serve --allow-image-urls` reaches the app's settings; the embedder serve
    builds is eager (a compiled tower would pad each one-image query to a full batch and
    compile on the first one)."""
    import uvicorn

    import starkret.ingest.towers as towers
    import starkret.serve.app as serve_app
    from starkret.cli import commands as cli

    built: list[dict] = []
    configs: list[ServeConfig] = []
    real_embedder, real_create_app = towers.ClipEmbedder, serve_app.create_app

    def embedder(model, pretrained, **options):
        built.append(options)
        return real_embedder("starkret-tiny", device="cpu", compile=options.get("compile"))

    def create_app(db, config=None):
        configs.append(config)
        return real_create_app(db, config)

    monkeypatch.setattr(towers, "ClipEmbedder", embedder)
    monkeypatch.setattr(serve_app, "create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
    for argv, allowed in (([], False), (["--allow-image-urls"], True)):
        assert cli.main(["serve", str(demo_db.root), *argv]) == 0
        assert configs[-1].allow_image_urls is allowed
        assert built[-1].get("compile") is False
