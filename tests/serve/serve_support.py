"""A demo-like DB and a real ``starkret serve`` server on loopback, for the serve tests."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

CAPTIONS = ["a dog on a beach", "a red bicycle", "sunset over the sea", "a city street"]


def build_demo_db(root: Path, embedder) -> Path:
    """cc12m-like shards, a chartqa-like folder and a URL-only source, embedded with
    starkret-tiny (random weights: scores carry no meaning, geometry is real)."""
    import starkret
    from starkret.testing import encode, synthetic_photo, write_source

    shards = root / "sources" / "cc12m"
    shards.mkdir(parents=True)
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(6):
                key = f"{s:05d}{i:04d}"
                photo = encode(synthetic_photo(96, 96, seed=s * 100 + i), "JPEG", quality=90)
                meta = {"url": f"https://example.com/{key}.jpg", "key": key}
                for ext, data in (
                    ("jpg", photo),
                    ("txt", CAPTIONS[i % 4].encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    charts = root / "sources" / "chartqa" / "png"
    charts.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        image = PIL.Image.new("RGB", (120, 90), "white")
        draw = PIL.ImageDraw.Draw(image)
        for b, height in enumerate(rng.integers(10, 80, 4)):
            draw.rectangle([10 + 25 * b, 85 - int(height), 28 + 25 * b, 85], fill=(60, 90, 200))
        image.save(charts / f"chart_{i:03d}.png")
        (charts / f"chart_{i:03d}.txt").write_text(f"bar chart number {i}")
    db = root / "db"
    for source, inputs in (
        ("cc12m", str(shards / "{00000..00001}.tar")),
        ("chartqa", charts),
    ):
        starkret.embed(
            inputs,
            db / source,
            source_name=source,
            embedder=embedder,
            batch_size=8,
            chunk_size=3,
            progress=False,
        )
    # A source known only by URL (no local inputs): /image redirects.
    manifest = json.loads((db / "cc12m" / "starkret.json").read_text())
    vectors = np.random.default_rng(1).standard_normal((5, manifest["dim"])).astype(np.float32)
    write_source(db / "remote", "remote", vectors, keys=[f"r{i}" for i in range(5)])
    remote = json.loads((db / "remote" / "starkret.json").read_text())
    for field in ("model", "pretrained", "dim", "image_size", "mean", "std"):
        remote[field] = manifest[field]
    (db / "remote" / "starkret.json").write_text(json.dumps(remote))
    return db


class Server:
    """``create_app(db)`` served by uvicorn on 127.0.0.1, a free port, in a thread, with
    the options ``starkret serve`` gives uvicorn (timeouts, connection cap)."""

    def __init__(self, db, config=None) -> None:
        import uvicorn

        from starkret.serve.app import create_app
        from starkret.serve.connections import uvicorn_options
        from starkret.serve.schema import ServeConfig

        self.app = create_app(db, config)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app, lifespan="on", **uvicorn_options(self.app, config or ServeConfig())
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


class GatedDB:
    """An ImageDB whose first search (the batcher's ``search_arrays``) waits until the
    test opens the gate."""

    def __init__(self, db) -> None:
        self._db, self.gate, self.calls = db, threading.Event(), []

    def __getattr__(self, name):
        return getattr(self._db, name)

    def __len__(self) -> int:
        return len(self._db)

    def search_arrays(self, vectors, k, **kwargs):
        self.calls.append(len(vectors))
        self.gate.wait(30)
        return self._db.search_arrays(vectors, k, **kwargs)
