"""`starkret serve` against hostile clients, on a real server on 127.0.0.1 (issue 24,
items 6 to 10): idle and half-sent connections are closed, open connections are capped
without starving a normal client, conversation memory is bounded in bytes, a rewritten
shard never serves another member's bytes, an API key guards the data, and every id
and key the API hands out round-trips. Every socket has a timeout, every loop a deadline.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import selectors
import socket
import tarfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from serve_support import GatedDB, Server, build_demo_db  # noqa: E402

import starkret  # noqa: E402
from starkret.serve.app import path_segment  # noqa: E402
from starkret.serve.conversations import Conversations, image_bytes  # noqa: E402
from starkret.serve.schema import ServeConfig  # noqa: E402

#: Short limits, so that the tests measure them in seconds.
TIMEOUT_S = 1.0
QUICK = ServeConfig(header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S, keep_alive_s=TIMEOUT_S)
#: How late past its deadline a connection may be closed (a loaded 2-core machine).
SLACK_S = 2.0
#: Hostile connections of the crowd test: the issue's 3,000 where file descriptors allow.
HOSTILE = 3000


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, tiny_embedder):
    root = tmp_path_factory.mktemp("hostile")
    build_demo_db(root, tiny_embedder)
    return root


@pytest.fixture(scope="module")
def demo_db(demo_root, tiny_embedder):
    return starkret.ImageDB.open(demo_root / "db", embedder=tiny_embedder)


def _connect(port: int, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if payload:
        sock.sendall(payload)
    return sock


def _until_closed(sock: socket.socket, since: float, limit_s: float) -> tuple[float | None, bytes]:
    """Seconds from ``since`` until the server closes ``sock`` (None: still open
    ``limit_s`` after ``since``), and what it sent before."""
    data = b""
    while True:
        left = since + limit_s - time.monotonic()
        if left <= 0:
            return None, data
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None, data
        except ConnectionResetError:
            return time.monotonic() - since, data
        if not chunk:
            return time.monotonic() - since, data
        data += chunk


def _response(sock: socket.socket) -> bytes:
    """One whole response (headers and a content-length body) read from ``sock``."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536) or b" " * length
    return data


HALF_HEADERS = b"POST /search HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-ty"
HALF_BODY = (
    b"POST /search HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    b"content-length: 200\r\n\r\n" + b'{"queries": ["a dog'
)


# ==== 6. timeouts and the connection cap ====


def test_idle_and_half_sent_connections_are_closed_at_their_timeouts(demo_db):
    with Server(demo_db, QUICK) as s:
        kinds = {"silent": b"", "half headers": HALF_HEADERS, "half body": HALF_BODY}
        socks = {
            kind: (_connect(s.port, payload), time.monotonic()) for kind, payload in kinds.items()
        }
        # A kept-alive connection that starts a second request and stops half-way.
        kept = _connect(s.port, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _response(kept).startswith(b"HTTP/1.1 200")
        socks["half a second request"] = (kept, time.monotonic())
        kept.sendall(b"GET /health HTTP/1.1\r\nho")
        limit = TIMEOUT_S + SLACK_S + 3
        closed = {kind: _until_closed(sock, since, limit) for kind, (sock, since) in socks.items()}
        for sock, _ in socks.values():
            sock.close()
        stats = httpx.get(f"{s.url}/stats", timeout=10).json()
    print("\nclosed after (s):", {kind: round(t or -1, 3) for kind, (t, _) in closed.items()})
    for kind, (seconds, answer) in closed.items():
        assert seconds is not None, f"{kind}: still open after {limit} s"
        assert TIMEOUT_S * 0.8 <= seconds <= TIMEOUT_S + SLACK_S, (kind, seconds)
        if kind != "silent":  # a client that sent part of a request is told why
            assert answer.startswith(b"HTTP/1.1 408"), (kind, answer[:100])
            detail = json.loads(answer.split(b"\r\n\r\n", 1)[1])["detail"]
            assert detail.startswith("timeout") and "\n" not in detail
    connections = stats["connections"]
    assert connections["header_timeouts"] >= 3 and connections["body_timeouts"] >= 1


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * HOSTILE + 512
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return HOSTILE if soft == resource.RLIM_INFINITY else min(HOSTILE, soft - 300)


def test_a_normal_client_is_served_while_thousands_of_hostile_connections_crowd_in(demo_db):
    """Hostile clients open connections and stall (silent, half headers, half a body)
    faster than any timeout: the cap keeps the open connections bounded by closing the
    ones waiting longest, and a normal client is served all along."""
    hostile = _raise_fd_limit()
    assert hostile >= 500, "the open-file limit leaves too few descriptors for this test"
    cap = 64
    config = ServeConfig(header_timeout_s=60, body_timeout_s=60, max_connections=cap)
    payloads = (b"", HALF_HEADERS, HALF_BODY)
    socks: list[socket.socket] = []
    with Server(demo_db, config) as s:
        try:
            started = time.monotonic()
            for i in range(hostile):
                socks.append(_connect(s.port, payloads[i % 3]))
            opened_s = time.monotonic() - started
            # The server accepted (and closed) them as they came; wait until it caught up.
            selector = selectors.DefaultSelector()
            for sock in socks:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            open_ = set(socks)
            deadline = time.monotonic() + 60
            while len(open_) > cap and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.5):
                    try:
                        gone = key.fileobj.recv(65536) == b""
                    except (BlockingIOError, InterruptedError):
                        gone = False
                    except ConnectionResetError:
                        gone = True
                    if gone:
                        selector.unregister(key.fileobj)
                        open_.discard(key.fileobj)
            selector.close()
            t0 = time.monotonic()
            with httpx.Client(base_url=s.url, timeout=10) as c:
                health = c.get("/health")
                found = c.post("/search", json={"queries": ["a dog on a beach"], "k": 2})
                stats = c.get("/stats").json().get("connections", {})
            served_s = time.monotonic() - t0
        finally:
            for sock in socks:
                sock.close()
    print(
        f"\n{hostile} hostile connections opened in {opened_s:.2f} s; still open "
        f"{len(open_)} (cap {cap}); server held at most {stats.get('most_open')}; evicted "
        f"{stats.get('evicted')}; a normal client served in {served_s * 1000:.0f} ms"
    )
    assert len(open_) <= cap
    assert health.status_code == 200 and found.status_code == 200, found.text
    assert stats["most_open"] <= cap and stats["evicted"] >= hostile - cap
    assert served_s < 10


def test_at_the_cap_with_every_request_in_progress_a_new_connection_gets_503(demo_db):
    gated = GatedDB(demo_db)
    config = ServeConfig(max_connections=2, batch_wait_ms=1, workers=1)
    with Server(gated, config) as s:
        answers: list[int] = []

        def ask() -> None:
            with httpx.Client(base_url=s.url, timeout=60) as c:
                answers.append(c.post("/search", json={"queries": ["a dog"], "k": 1}).status_code)

        askers = [threading.Thread(target=ask) for _ in range(2)]
        for t in askers:
            t.start()
        deadline = time.monotonic() + 30
        while not gated.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        while s.app.state.batcher.pending() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            shed = httpx.get(f"{s.url}/health", timeout=10)
        finally:
            gated.gate.set()
            for t in askers:
                t.join(60)
        after = httpx.get(f"{s.url}/health", timeout=10)
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert shed.json()["detail"].startswith("busy")
    assert answers == [200, 200] and after.status_code == 200


# ==== 7. conversation memory, bounded in bytes ====


def _record(c: int, i: int) -> dict:
    key = f"cc12m/{c:05d}{i:04d}"
    return {
        "key": key,
        "source": "cc12m",
        "score": 0.25 + i / 1000,
        "id": (3 << 32) + i,
        "url": f"https://example.com/images/{c}/{i}.jpg",
        "caption": f"a photo of thing {i} on a table",
        "image": f"/image/cc12m/{path_segment(key)}",
        "moment_id": f"m{i}",
    }


@pytest.mark.parametrize("dim", [64, 768])
def test_conversation_memory_is_counted_as_tracemalloc_measures_it(dim):
    conversations = Conversations(100_000, 3600.0, 1000, max_bytes=1 << 40)
    vectors = np.random.default_rng(0).standard_normal((50, dim)).astype(np.float32)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for c in range(100):
            conversations.get(f"conversation-{c}")
        empty = tracemalloc.get_traced_memory()[0]
        for c in range(100):
            conv = conversations.get(f"conversation-{c}")
            for i in range(50):
                record = _record(c, i)
                # a row of a batch, as the aligner hands it over: it must be copied
                conversations.remember(conv, ("cc12m", c * 1000 + i), record, vectors[i])
        full = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_conversation = (empty - before) / 100
    per_image = (full - empty) / 5000
    print(f"\ndim {dim}: {per_conversation:.0f} B per conversation, {per_image:.0f} B per image")
    assert conversations.bytes == pytest.approx(full - before, rel=0.1)
    assert image_bytes(_record(1, 1), vectors[1].copy()) == pytest.approx(per_image, rel=0.1)


def test_conversations_stay_within_their_bytes_least_recently_used_out_first():
    one = image_bytes(_record(0, 0), np.zeros(64, np.float32))
    budget = 40 * one
    conversations = Conversations(10_000, 3600.0, 1000, max_bytes=budget)
    vector = np.zeros(64, np.float32)
    for c in range(30):
        conv = conversations.get(f"c{c}")
        for i in range(10):
            conversations.remember(conv, ("cc12m", c * 100 + i), _record(c, i), vector)
        assert conversations.bytes <= budget
    conversations.get("c25")  # used again: the least recently used are c26..c29's elders
    conv = conversations.get("c29")
    conversations.remember(conv, ("cc12m", 99_999), _record(29, 99), vector)
    assert conversations.get("c0", create=False) is None and conversations.evicted >= 26
    assert conversations.get("c25", create=False) is not None
    # one conversation alone over the budget keeps its newest images
    big = conversations.get("big")
    for i in range(100):
        conversations.remember(big, ("cc12m", 200_000 + i), _record(7, i), vector)
    assert conversations.bytes <= budget and len(conversations) == 1
    assert list(big.shown)[-1] == ("cc12m", 200_099) and len(big.shown) < 100


def test_the_service_bounds_conversation_bytes_and_an_evicted_one_starts_fresh(demo_db):
    budget = 12_000  # a few conversations' worth of shown images
    config = ServeConfig(
        min_score=-1.0, near_duplicate_threshold=1.0, max_conversation_bytes=budget
    )
    with Server(demo_db, config) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        moments = [{"description": "a dog on a beach"}, {"description": "a red bicycle"}]
        first = c.post("/align", json={"conversation_id": "c0", "moments": moments}).json()
        shown_first = [a["images"][0]["key"] for a in first["alignments"]]
        for n in range(1, 12):
            r = c.post("/align", json={"conversation_id": f"c{n}", "moments": moments})
            assert r.status_code == 200, r.text
        stats = c.get("/stats").json()["conversations"]
        gone = c.get("/conversation/c0")
        again = c.post("/align", json={"conversation_id": "c0", "moments": moments}).json()
        spec = c.get("/openapi.json").json()
    assert 0 < stats["bytes"] <= budget and stats["evicted"] >= 1
    assert stats["max_bytes"] == budget
    assert gone.status_code == 404 and "evicted" in gone.json()["detail"]
    # Started fresh: the images shown before eviction are shown again.
    assert [a["images"][0]["key"] for a in again["alignments"]] == shown_first
    described = spec["paths"]["/align"]["post"]["description"]
    assert "starts fresh" in described and "evicted" in described


# ==== 8. a shard rewritten or replaced after the DB was built ====


def test_a_rewritten_shard_serves_each_members_own_bytes_and_a_garbage_one_404(
    tmp_path, tiny_embedder
):
    db = starkret.ImageDB.open(build_demo_db(tmp_path, tiny_embedder), embedder=tiny_embedder)
    shard = tmp_path / "sources" / "cc12m" / "00000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    images = {m.name.split(".")[0]: data for m, data in members if m.name.endswith(".jpg")}
    with Server(db) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        paths = {k: f"/image/cc12m/{path_segment('cc12m/' + k)}" for k in images}
        for key, path in paths.items():  # the member tables are cached now
            assert c.get(path).content == images[key]
        time.sleep(0.01)  # a later mtime even on coarse clocks
        with tarfile.open(shard, "w") as tar:  # rewritten in place, in another order
            for m, data in reversed(members):
                tar.addfile(m, io.BytesIO(data))
        wrong = {
            k: len(c.get(p).content) for k, p in paths.items() if c.get(p).content != images[k]
        }
        shard.write_bytes(b"\x1f\x8b garbage, not a tar " * 100)
        garbage = [c.get(p, follow_redirects=False) for p in paths.values()]
        shard.unlink()
        vanished = c.get(next(iter(paths.values())), follow_redirects=False)
    assert not wrong
    for r in [*garbage, vanished]:
        assert r.status_code == 404, (r.status_code, r.text[:200])
        detail = r.json()["detail"]
        assert "changed or vanished" in detail and "\n" not in detail


# ==== 9. an API key, and URLs from the configured public URL ====


def test_an_api_key_guards_everything_but_health_and_the_page(demo_db):
    key = "s3cret-key"
    config = ServeConfig(api_key=key, public_url="https://images.example.org/base/")
    good = {"authorization": f"Bearer {key}"}
    with Server(demo_db, config) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        body = {"queries": ["a dog"], "k": 1}
        refused = {
            "none": c.post("/search", json=body),
            "wrong": c.post("/search", json=body, headers={"authorization": "Bearer nope"}),
            "basic": c.post("/search", json=body, headers={"authorization": f"Basic {key}"}),
            "delete": c.delete("/conversation/x"),
            "stats": c.get("/stats"),
            "image": c.get("/image/chartqa/chartqa%2Fchart_001.png"),
            "knn": c.post("/knn-service", json={"text": "a chart"}),
        }
        opened = [c.get("/health"), c.get("/"), c.get("/openapi.json")]
        allowed = c.post("/search", json=body, headers=good)
        knn = c.post(
            "/knn-service",
            json={"text": "a chart", "indice_name": "chartqa"},
            headers={**good, "host": "evil.example"},
        )
    for name, r in refused.items():
        assert r.status_code == 401, (name, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["detail"].startswith("unauthorized")
    assert all(r.status_code == 200 for r in opened)
    assert allowed.status_code == 200
    urls = [row["url"] for row in knn.json()]
    assert urls and all(
        u.startswith("https://images.example.org/base/image/chartqa/") for u in urls
    )


def test_serve_takes_the_key_from_a_file_or_the_environment(demo_db, monkeypatch, tmp_path):
    """`starkret serve --api-key-file` and STARKRET_API_KEY, in-process (uvicorn.run
    wrapped only to be able to stop it), and the public URL derived from host and port."""
    import uvicorn

    from starkret.cli import commands as cli

    servers: list = []

    def run(app, **options):
        server = uvicorn.Server(uvicorn.Config(app, **options))
        servers.append(server)
        server.run()

    monkeypatch.setattr(uvicorn, "run", run)
    key_file = tmp_path / "key"
    key_file.write_text("from-the-file\n")
    for how, key in (("file", "from-the-file"), ("environment", "from-the-environment")):
        servers.clear()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        argv = ["serve", str(demo_db.root), "--port", str(port), "--keep-alive", "2"]
        if how == "file":
            argv += ["--api-key-file", str(key_file)]
            monkeypatch.delenv("STARKRET_API_KEY", raising=False)
        else:
            monkeypatch.setenv("STARKRET_API_KEY", key)
        codes: list[int] = []
        thread = threading.Thread(
            target=lambda a=argv, out=codes: out.append(cli.main(a)), daemon=True
        )
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while not (servers and servers[0].started):
                assert thread.is_alive() and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.05)
            base = f"http://127.0.0.1:{port}"
            without = httpx.get(f"{base}/stats", timeout=30)
            auth = {"authorization": f"Bearer {key}"}
            limits = httpx.get(f"{base}/stats", headers=auth, timeout=30).json()["limits"]
            knn = httpx.post(
                f"{base}/knn-service",
                json={"text": "a chart", "indice_name": "chartqa"},
                headers={**auth, "host": "evil.example"},
                timeout=30,
            ).json()
        finally:
            if servers:
                servers[0].should_exit = True
            thread.join(30)
        assert codes == [0], how
        assert without.status_code == 401, how
        assert limits["keep_alive_s"] == 2
        assert knn and all(row["url"].startswith(f"{base}/image/") for row in knn), how
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert cli.main(["serve", str(demo_db.root), "--api-key-file", str(empty)]) == 2


# ==== 10. ids and keys round-trip ====

ODD = ["a/b", "50%", "%2F", "with space", "new\nline", "ünï cødé ✓", "..", "?x=1#y", "/lead"]


def test_every_conversation_id_round_trips(demo_db):
    config = ServeConfig(min_score=-1.0)
    with Server(demo_db, config) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        wrong = {}
        for cid in ODD:
            r = c.post(
                "/align",
                json={"conversation_id": cid, "moments": [{"description": "a dog"}]},
            )
            assert r.status_code == 200, (cid, r.text)
            got = c.get(f"/conversation/{path_segment(cid)}")
            reset = c.delete(f"/conversation/{path_segment(cid)}")
            after = c.get(f"/conversation/{path_segment(cid)}")
            answer = (
                got.status_code,
                got.json().get("conversation_id"),
                len(got.json().get("shown", ())),
                reset.json(),
                after.status_code,
            )
            if answer != (200, cid, 1, {"conversation_id": cid, "reset": True}, 404):
                wrong[cid] = answer
    assert not wrong


def test_every_image_key_round_trips(tmp_path, tiny_embedder):
    from starkret.testing import encode, synthetic_photo

    folder = tmp_path / "odd"
    names = {}
    for i, name in enumerate(ODD):
        if name in ("..", "/lead"):
            continue  # not file names
        relative = Path(name.replace("/", "/sub ")) if "/" in name else Path(name)
        path = folder / relative.parent / (relative.name + ".jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = encode(synthetic_photo(64, 64, seed=i), "JPEG", quality=90)
        path.write_bytes(data)
        names[str(path.relative_to(folder))] = data
    starkret.embed(
        folder, tmp_path / "db" / "odd", source_name="odd", embedder=tiny_embedder, progress=False
    )
    db = starkret.ImageDB.open(tmp_path / "db", embedder=tiny_embedder)
    with Server(db) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        hits = c.post("/search", json={"queries": ["x"], "k": 20}).json()["results"][0]["hits"]
        served = {h["key"]: c.get(h["image"]) for h in hits["odd"]}
    assert len(served) == len(names)
    wrong = {}
    for key, r in served.items():
        expected = names.get(key.removeprefix("odd/"))
        if r.status_code != 200 or r.content != expected:
            wrong[key] = (r.status_code, r.text[:100] if r.status_code != 200 else "bytes")
    assert not wrong
