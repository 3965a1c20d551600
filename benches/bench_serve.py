"""`starkret serve` under load on loopback: micro-batched search against one query per request.

The same DB (random unit vectors in starkret-tiny's 64-d space, one source) is served
twice by `starkret serve` in a subprocess: once micro-batching concurrent requests
(the default: up to 256 queries, 3 ms wait) and once with ``--max-batch 1``, each
request searched alone as clip back does. Clients on loopback send one text query per
request (an Ultron description, encoded by the server's text tower) over keep-alive
connections, 1, 16 and 64 at a time, for a fixed time per level (best of two runs, the
two servers measured alternately). Reported: queries/s and p50/p99 latency per level;
the ratio is batched over one-per-request throughput.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Row

LEVELS = (1, 16, 64)
WORDS = [
    "dog",
    "beach",
    "red",
    "bike",
    "sunset",
    "sea",
    "city",
    "street",
    "chart",
    "bar",
    "cat",
    "sofa",
    "mountain",
    "lake",
    "snow",
]


def add_arguments(parser) -> None:
    group = parser.add_argument_group("serve")
    group.add_argument("--serve-images", type=int, default=200_000, help="images in the DB")
    group.add_argument("--serve-seconds", type=float, default=5.0, help="seconds per level")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(db: Path, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    src = Path(__file__).resolve().parents[1] / "python"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "starkret", "serve", str(db), "--port", str(port), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"starkret serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("starkret serve did not start within 120 s")


async def _client(port: int, stop: float, latencies: list[float], seed: int) -> None:
    """One keep-alive connection sending POST /search with one text query at a time."""
    rng = np.random.default_rng(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop:
            text = " ".join(rng.choice(WORDS, 6))
            body = json.dumps({"queries": [text], "k": 5}).encode()
            started = time.perf_counter()
            writer.write(
                b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"/search answered {status}")
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


def _load(port: int, clients: int, seconds: float) -> tuple[float, float, float]:
    async def main() -> tuple[float, list[float]]:
        # Warm-up: a few requests so that connections and the model are hot.
        await asyncio.gather(*(_client(port, time.perf_counter() + 0.3, [], s) for s in range(2)))
        latencies: list[float] = []
        started = time.perf_counter()
        stop = started + seconds
        await asyncio.gather(*(_client(port, stop, latencies, s) for s in range(clients)))
        return time.perf_counter() - started, latencies

    elapsed, latencies = asyncio.run(main())
    ms = np.asarray(latencies) * 1000
    return len(latencies) / elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def run(args) -> list[Row]:
    from starkret import build_index
    from starkret.testing import write_source

    n = 20_000 if args.quick else args.serve_images
    seconds = 2.0 if args.quick else args.serve_seconds
    results: dict[str, dict[int, tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="starkret-bench-serve-") as tmp:
        db = Path(tmp) / "db"
        vectors = np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)
        write_source(db / "photos", "photos", vectors, part_size=50_000)
        build_index(db / "photos", kind="exact")  # the int8 first pass, as users run it
        servers = {}
        try:
            for name, extra in (("batched", []), ("single", ["--max-batch", "1"])):
                servers[name] = _start(db, extra)
            # Levels alternate between the two servers (same machine state for both);
            # the best of two runs is the one least disturbed by other work.
            for c in LEVELS:
                for name, (_, port) in servers.items():
                    runs = [_load(port, c, seconds) for _ in range(2)]
                    results.setdefault(name, {})[c] = max(runs, key=lambda r: r[0])
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    print(f"\nserve: {n:,} images (64-d), one text query per request, {seconds:g} s per level")
    print("clients  batched q/s  p50 ms  p99 ms   one-per-request q/s  p50 ms  p99 ms")
    for c in LEVELS:
        b, s = results["batched"][c], results["single"][c]
        print(
            f"{c:>7}  {b[0]:>11,.1f}  {b[1]:>6.1f}  {b[2]:>6.1f}   {s[0]:>19,.1f}  "
            f"{s[1]:>6.1f}  {s[2]:>6.1f}"
        )
    return [
        Row(
            "serve /search",
            f"{c} clients, {n:,} images (p50 {results['batched'][c][1]:.1f} vs "
            f"{results['single'][c][1]:.1f} ms)",
            results["batched"][c][0],
            results["single"][c][0],
            "one query per request",
            "queries/s",
        )
        for c in LEVELS
    ]
