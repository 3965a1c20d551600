"""Request statistics and the ASGI guard every request passes (API key, body limit,
latency)."""

from __future__ import annotations

import collections
import hashlib
import hmac
import threading
import time

import numpy as np

# ==== Statistics ====


class _Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.queries = 0
        self.batches = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.latencies: dict[str, collections.deque[float]] = {}

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.queries += size
            self.batch_sizes[size] += 1

    def request(self, endpoint: str, seconds: float, status: int) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            if status >= 400:
                self.errors[endpoint] += 1
            self.latencies.setdefault(endpoint, collections.deque(maxlen=10_000)).append(seconds)

    def as_dict(self) -> dict:
        with self._lock:
            latency = {}
            for endpoint, values in self.latencies.items():
                a = np.asarray(values) * 1000
                latency[endpoint] = {
                    "count": len(a),
                    "p50_ms": round(float(np.percentile(a, 50)), 3),
                    "p90_ms": round(float(np.percentile(a, 90)), 3),
                    "p99_ms": round(float(np.percentile(a, 99)), 3),
                    "max_ms": round(float(a.max()), 3),
                }
            sizes = self.batch_sizes
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": dict(self.requests),
                "errors": dict(self.errors),
                "queries": self.queries,
                "batches": self.batches,
                "mean_batch_size": round(self.queries / self.batches, 3) if self.batches else 0,
                "max_batch_size": max(sizes) if sizes else 0,
                "batch_sizes": {str(s): n for s, n in sorted(sizes.items())},
                "latency": latency,
            }


#: Paths served without the API key: liveness, the page (which asks for the key) and
#: the API's description. None of them holds data.
OPEN_PATHS = frozenset(
    ("/health", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
)


class _Disconnected(Exception):
    """The client went away (or was closed) before its request body was complete."""


class _Guard:
    """ASGI middleware: without the API key (when the server has one) a request gets
    401, bodies over ``limit`` bytes get 413, both before the app sees them; every
    request's latency and status go to the statistics."""

    def __init__(self, app, limit: int, stats: _Stats, api_key: str | None = None) -> None:
        self.app, self.limit, self.stats = app, limit, stats
        # Compared as digests: equal lengths, so the comparison's time tells nothing.
        self._key_digest = None if api_key is None else _digest(api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not self._authorized(scope):
                await _send_json(
                    send_status,
                    401,
                    "unauthorized: this server needs its API key as 'Authorization: Bearer KEY'",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
            try:
                body = await self._read(scope, receive)
            except _Disconnected:
                return  # nobody to answer; the app never sees half a body
            if body is None:
                await _send_json(
                    send_status, 413, f"too large: request body over {self.limit:,} bytes"
                )
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.stats.request(endpoint, time.perf_counter() - started, status)

    def _authorized(self, scope) -> bool:
        if self._key_digest is None or scope.get("path") in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(_digest(token.strip()), self._key_digest)
        return False

    async def _read(self, scope, receive) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            body += message.get("body", b"")
            if len(body) > self.limit:
                return None
            if not message.get("more_body", False):
                break
        return bytes(body)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


async def _send_json(send, status: int, detail: str, headers: list | None = None) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
