"""Connections the service holds: request timeouts and a cap on open connections.

uvicorn closes a kept-alive connection that stays idle after a response
(``timeout_keep_alive``), but nothing else: a client that connects and stays silent, or
sends half a request line, headers or body, holds its connection (a file descriptor and
buffers) for ever, and ``limit_concurrency`` only answers 503 once a request's headers
have arrived, after its file descriptor was spent. :func:`uvicorn_options` gives uvicorn
a protocol class that adds, around uvicorn's own HTTP protocol:

- a deadline for the request line and headers (``header_timeout_s`` from connecting or
  from the end of the previous response), and one for the body (``body_timeout_s`` from
  the end of the headers); a connection that misses it gets ``408`` and is closed;
- a cap on open connections (``max_connections``): at the cap, a new connection closes
  the connection that has waited longest for a complete request (silent, half a request
  line, headers or body), so hostile clients cannot crowd out a normal one; only when
  every open connection has a request in progress is the new one shed with ``503``.
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
from collections import OrderedDict
from typing import Any

from starkret.serve.schema import ServeConfig

__all__ = ["ConnectionCounts", "connection_limit", "guarded_protocol", "uvicorn_options"]

#: File descriptors kept free besides those the process holds when it starts serving.
FD_RESERVE = 32
#: Most connections the event loop accepts in one go, which is also the listen queue
#: (uvicorn's ``backlog``, 2048 by default): an evicted connection's descriptor is freed
#: only after the burst that evicted it, so two bursts' worth of descriptors are kept
#: free; under a low open-file limit the burst is smaller (a quarter of the room).
MAX_ACCEPT_BURST = 2048
MIN_ACCEPT_BURST = 64
#: Connections being shed (answered 503, closing) at once; more are closed at once.
MAX_SHEDDING = 64
#: Seconds a shed connection may take to close its side after our 503.
SHED_LINGER_S = 1.0

_WAITING_HEADERS, _WAITING_BODY, _BUSY = "headers", "body", "busy"


class ConnectionCounts:
    """What the connection guard did, for ``GET /stats`` (updated on the event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.open = 0
        self.most_open = 0
        self.limit = 0
        self.header_timeouts = 0
        self.body_timeouts = 0
        self.evicted = 0
        self.shed = 0

    def count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def opened(self, n: int) -> None:
        with self._lock:
            self.open = n
            self.most_open = max(self.most_open, n)

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "open": self.open,
                "most_open": self.most_open,
                "max": self.limit,
                "header_timeouts": self.header_timeouts,
                "body_timeouts": self.body_timeouts,
                "evicted": self.evicted,
                "shed": self.shed,
            }


def connection_limit(wanted: int) -> int:
    """``wanted`` lowered to fit the process's open-file limit (each connection holds a
    file descriptor; past the limit ``accept`` fails and nobody is served), counting the
    descriptors the process holds now."""
    return _descriptor_budget(wanted)[0]


def _descriptor_budget(wanted: int) -> tuple[int, int]:
    """(connections, accept burst) that fit the open-file limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted, MAX_ACCEPT_BURST
    room = soft - _open_descriptors() - FD_RESERVE - MAX_SHEDDING
    burst = min(MAX_ACCEPT_BURST, max(MIN_ACCEPT_BURST, room // 4))
    return max(1, min(wanted, room - 2 * burst)), burst


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: assume a modest number
        return 64


def _response(status: bytes, detail: str, extra: bytes = b"") -> bytes:
    import json

    body = json.dumps({"detail": detail}).encode()
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + extra
        + b"content-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def guarded_protocol(
    base: type[asyncio.Protocol], config: ServeConfig, counts: ConnectionCounts
) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol ``base`` (h11 or httptools: both keep the
    request in progress as ``self.cycle`` with ``more_body`` and ``response_complete``)
    with the deadlines and the connection cap of ``config``."""
    limit = counts.limit = connection_limit(config.max_connections)
    header_s, body_s = config.header_timeout_s, config.body_timeout_s
    timeout_header = _response(
        b"408 Request Timeout",
        f"timeout: the request line and headers did not arrive within {header_s:g} s",
    )
    timeout_body = _response(
        b"408 Request Timeout", f"timeout: the request body did not arrive within {body_s:g} s"
    )
    busy = _response(
        b"503 Service Unavailable",
        f"busy: {limit} connections with requests in progress; try again",
        b"retry-after: 1\r\n",
    )
    # Connections without a complete request, the longest waiting first (one server's:
    # the class is made per server).
    waiting: OrderedDict[Any, None] = OrderedDict()
    shedding: set[Any] = set()

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        _phase: str | None = None
        _timer: asyncio.TimerHandle | None = None
        _cycle_seen: Any = None
        _shed: bool = False
        _got_bytes: bool = False

        # ==== asyncio.Protocol ====

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.connections) >= limit:
                if waiting:
                    oldest = next(iter(waiting))
                    counts.count("evicted")
                    oldest._close(None)
                    self.connections.discard(oldest)  # gone now, whatever uvicorn does later
                else:
                    self._shed_connection(transport)
                    return
            super().connection_made(transport)
            counts.opened(len(self.connections))
            self._wait(_WAITING_HEADERS, header_s)

        def data_received(self, data: bytes) -> None:
            if self._shed:
                return  # read and dropped, so that closing sends no reset over our 503
            self._got_bytes = True
            super().data_received(data)
            self._track()

        def eof_received(self):
            if self._shed:
                self.transport.close()
                return None
            return super().eof_received()

        def connection_lost(self, exc) -> None:
            self._settle(None)
            if self._shed:
                shedding.discard(self)
                return
            super().connection_lost(exc)
            counts.opened(len(self.connections))

        # ==== uvicorn's protocol ====

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                self._settle(None)
            elif self.cycle is not self._cycle_seen:
                self._track()  # a pipelined request came next
            else:
                self._got_bytes = False
                self._wait(_WAITING_HEADERS, header_s)

        # ==== deadlines ====

        def _track(self) -> None:
            """Moves on when the request in progress got its headers or its body."""
            cycle = self.cycle
            if cycle is None or self.transport is None or self.transport.is_closing():
                return
            if cycle is not self._cycle_seen:  # a new request's headers are complete
                self._cycle_seen = cycle
                if cycle.more_body and not cycle.response_complete:
                    self._wait(_WAITING_BODY, body_s)
                else:
                    self._settle(_BUSY)
            elif self._phase == _WAITING_BODY and not cycle.more_body:
                self._settle(_BUSY)

        def _wait(self, phase: str, seconds: float) -> None:
            self._settle(phase)
            waiting[self] = None
            self._timer = self.loop.call_later(seconds, self._expire, phase)

        def _settle(self, phase: str | None) -> None:
            self._phase = phase
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            waiting.pop(self, None)

        def _expire(self, phase: str) -> None:
            self._timer = None
            if self._phase != phase:
                return
            if phase == _WAITING_BODY:
                counts.count("body_timeouts")
                self._close(timeout_body)
            else:
                counts.count("header_timeouts")
                # A silent connection is just closed; one that sent part of a request
                # is told why.
                self._close(timeout_header if self._got_bytes else None)

        def _close(self, answer: bytes | None) -> None:
            self._settle(None)
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            cycle = self.cycle
            # Waiting for headers, the last cycle's response is complete; waiting for a
            # body, the application may have started answering (then it has the word).
            if answer is not None and (
                cycle is None or cycle.response_complete or not cycle.response_started
            ):
                transport.write(answer)
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the application's receive() sees a disconnect
                cycle.message_event.set()
            transport.close()

        # ==== shedding ====

        def _shed_connection(self, transport) -> None:
            self._shed = True
            self.transport = transport
            counts.count("shed")
            if len(shedding) >= MAX_SHEDDING:
                transport.abort()
                return
            shedding.add(self)
            transport.write(busy)
            if transport.can_write_eof():
                transport.write_eof()
            self.loop.call_later(SHED_LINGER_S, transport.abort)

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def uvicorn_options(app, config: ServeConfig) -> dict:
    """``uvicorn.run``/``uvicorn.Config`` options serving ``app`` (from
    :func:`starkret.serve.app.create_app`) with ``config``'s timeouts and connection cap."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    counts = app.state.connections
    return {
        "http": guarded_protocol(AutoHTTPProtocol, config, counts),
        "timeout_keep_alive": config.keep_alive_s,
        "backlog": _descriptor_budget(config.max_connections)[1],
        "log_level": "warning",
        "access_log": False,
    }
