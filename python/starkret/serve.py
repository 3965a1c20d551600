"""``starkret serve``: an ImageDB as an HTTP service, with a page to look at results.

Endpoints (OpenAPI description at ``/openapi.json``, interactive docs at ``/docs``):

- ``POST /search``: texts or vectors -> per query, per source, the top ``k`` hits.
  Concurrent requests are **micro-batched**: a background batcher collects the queries
  that arrive within ``batch_wait_ms`` (or until ``max_batch`` queries) and runs one
  batched search (text encoding included) for all of them.
- ``POST /align``: sharing moments of a conversation (moments, Ultron outputs or a
  dialogue with ``[Sharing Image]`` turns) -> one image per moment, never an image the
  conversation has already been shown nor a near duplicate of one, ``below_threshold``
  when the best candidate scores under ``min_score`` (so the caller can fall back to
  generation). Conversations are kept in memory, least recently used first out, expire
  after ``conversation_ttl_s`` and are reset with ``DELETE /conversation/{id}``.
- ``GET /image/{source}/{key}``: the image bytes, read only from the DB's own inputs
  (shards, folders, tables recorded in its manifests), or a redirect to its URL.
- ``GET /health``, ``GET /stats``; clip back's ``POST /knn-service`` and
  ``GET /indices-list``; ``GET /`` the page.

Bad requests get a 4xx answer with a one-line ``detail``; the server never reads a file
that is not one of the DB's inputs.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import queue
import tarfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

from .db import Hit, ImageDB

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_K",
    "MAX_QUERIES",
    "Batcher",
    "ServeConfig",
    "create_app",
    "serve",
]

#: Most results per source one query may ask for.
MAX_K = 100
#: Most queries (or moments) in one request.
MAX_QUERIES = 256
#: Longest text query, in characters (CLIP truncates to 77 tokens anyway).
MAX_TEXT = 2000
#: Largest request body.
MAX_BODY_BYTES = 4 * 1024 * 1024
#: Most keys in one request's ``exclude``.
MAX_EXCLUDE = 10_000


@dataclass
class ServeConfig:
    """Service settings (the ``starkret serve`` options)."""

    device: str = "cpu"
    workers: int = 1  # batcher threads searching in parallel
    batch_wait_ms: float = 3.0
    max_batch: int = 256
    min_score: float = 0.2
    near_duplicate_threshold: float = 0.94
    k_per_source: int = 5
    overfetch: int = 4
    max_conversations: int = 10_000
    conversation_ttl_s: float = 3600.0
    max_shown_per_conversation: int = 1000
    threads: int | None = None


class RequestError(ValueError):
    """A bad request: answered with ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# ==== Micro-batching ====


@dataclass
class _Job:
    texts: list[str]
    text_positions: list[int]
    vectors: np.ndarray | None  # (m, dim), not yet normalised
    vector_positions: list[int]
    k: int
    sources: tuple[str, ...] | None
    exclude: list[set[str]]
    done: Any  # a callable(result | exception)
    size: int = 0


class Batcher:
    """Background threads that search the queries of concurrent requests together.

    ``submit`` hands a request's queries to the queue; a worker takes the first job,
    waits at most ``wait_ms`` for more (up to ``max_batch`` queries), encodes all texts
    in one batch, and runs one ``ImageDB.search`` per group of jobs asking for the same
    sources, with ``k`` the largest asked for and per-query exclusions.
    """

    def __init__(self, db: ImageDB, config: ServeConfig, stats: _Stats) -> None:
        self.db, self.config, self.stats = db, config, stats
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._last_size = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"starkret-batcher-{i}", daemon=True)
            for i in range(max(1, config.workers))
        ]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def pending(self) -> int:
        """Jobs waiting for a batcher thread."""
        return self._queue.qsize()

    def submit(self, job: _Job) -> None:
        job.size = len(job.texts) + len(job.vector_positions)
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, size = [first], first.size
            deadline = time.perf_counter() + self.config.batch_wait_ms / 1000
            # Linger for more queries only under load (the last batch had company):
            # a lone client is answered at once.
            linger = self._last_size > 1 or not self._queue.empty()
            while size < self.config.max_batch:
                left = deadline - time.perf_counter() if linger else 0
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # let this thread finish after the batch
                    break
                jobs.append(job)
                size += job.size
            self._last_size = size
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            vectors = self._encode(jobs)
        except Exception as exc:  # a broken model must not kill the batcher
            for job in jobs:
                job.done(exc)
            return
        groups: dict[tuple[str, ...] | None, list[int]] = {}
        for n, job in enumerate(jobs):
            groups.setdefault(job.sources, []).append(n)
        for sources, members in groups.items():
            try:
                rows = [vectors[n] for n in members]
                k = max(jobs[n].k for n in members)
                exclude = [e for n in members for e in jobs[n].exclude]
                hits = self.db.search(
                    np.concatenate(rows),
                    k=k,
                    sources=None if sources is None else list(sources),
                    exclude=exclude if any(exclude) else None,
                    device=self.config.device,
                    threads=self.config.threads,
                )
            except Exception as exc:
                for n in members:
                    jobs[n].done(exc)
                continue
            self.stats.batch(len(hits))
            start = 0
            for n in members:
                job = jobs[n]
                mine = hits[start : start + job.size]
                start += job.size
                job.done([_top_k_per_source(h, job.k) for h in mine])

    def _encode(self, jobs: list[_Job]) -> list[np.ndarray]:
        texts = [t for job in jobs for t in job.texts]
        encoded = self.db.encode(texts) if texts else np.zeros((0, self.db.dim), np.float32)
        out, start = [], 0
        for job in jobs:
            v = np.zeros((job.size, self.db.dim), np.float32)
            if job.texts:
                v[job.text_positions] = encoded[start : start + len(job.texts)]
                start += len(job.texts)
            if job.vectors is not None and len(job.vector_positions):
                v[job.vector_positions] = self.db.encode(job.vectors)
            out.append(v)
        return out


def _top_k_per_source(hits: list[Hit], k: int) -> list[Hit]:
    seen: dict[str, int] = {}
    out = []
    for h in hits:
        n = seen.get(h.source, 0)
        if n < k:
            out.append(h)
            seen[h.source] = n + 1
    return out


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


# ==== Conversations ====


@dataclass
class _Conversation:
    shown: OrderedDict[tuple[str, int], dict] = field(default_factory=OrderedDict)
    vectors: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    moments: int = 0
    touched: float = field(default_factory=time.monotonic)


class Conversations:
    """Per-conversation shown images: LRU-bounded, expiring, resettable."""

    def __init__(
        self, max_conversations: int, ttl_s: float, max_shown: int, clock=time.monotonic
    ) -> None:
        self.max, self.ttl, self.max_shown = max_conversations, ttl_s, max_shown
        self.clock = clock
        self._items: OrderedDict[str, _Conversation] = OrderedDict()
        self.lock = threading.Lock()
        self.evicted = 0
        self.expired = 0

    def get(self, cid: str, create: bool = True) -> _Conversation | None:
        now = self.clock()
        self._expire(now)
        conv = self._items.get(cid)
        if conv is None:
            if not create:
                return None
            conv = self._items[cid] = _Conversation(touched=now)
            while len(self._items) > self.max:
                self._items.popitem(last=False)
                self.evicted += 1
        self._items.move_to_end(cid)
        conv.touched = now
        return conv

    def reset(self, cid: str) -> bool:
        return self._items.pop(cid, None) is not None

    def remember(self, conv: _Conversation, image: tuple[str, int], record: dict, vector) -> None:
        conv.shown[image] = record
        conv.vectors[image] = vector
        while len(conv.shown) > self.max_shown:
            old, _ = conv.shown.popitem(last=False)
            conv.vectors.pop(old, None)

    def _expire(self, now: float) -> None:
        while self._items:
            cid, conv = next(iter(self._items.items()))
            if now - conv.touched <= self.ttl:
                break
            del self._items[cid]
            self.expired += 1

    def __len__(self) -> int:
        return len(self._items)


# ==== Local image bytes ====


_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class ImageStore:
    """Bytes of DB images, read only from the inputs the DB's manifests record."""

    def __init__(self, db: ImageDB, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.db, self.max_bytes = db, max_bytes
        self._tar_index: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._tables: OrderedDict[str, _Table] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, source: str, key: str) -> bytes | None:
        located = self.db.locate(key, [source])
        if located is None:
            raise RequestError(404, f"not found: no image {key!r} in source {source!r}")
        row = located[1]
        part, _ = self.db.part_of(source, row)
        inputs = self.db.source_manifest(source).get("part_inputs") or []
        if part >= len(inputs) or not isinstance(inputs[part], dict):
            return None
        kind, path = inputs[part].get("kind"), inputs[part].get("path")
        if not isinstance(path, str):
            return None
        # embed-shards stores ``{source}/{sample key}``.
        sample_key = key[len(source) + 1 :] if key.startswith(f"{source}/") else key
        try:
            if kind == "files":
                return self._file(path, sample_key)
            if kind == "shard":
                return self._shard(path, sample_key)
            if kind == "table":
                return self._table(path, sample_key)
        except (OSError, ValueError, ImportError):
            return None  # an input that changed or vanished since the DB was built
        return None

    def url(self, source: str, key: str) -> str | None:
        located = self.db.locate(key, [source])
        if located is None:
            return None
        # One row of the source's metadata, read on demand (never the whole column).
        return self.db.metadata(source).take([located[1]], columns=("url",))["url"][0]

    def _file(self, root: str, relative: str) -> bytes | None:
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(real_root, relative))
        if os.path.commonpath([real, real_root]) != real_root or real == real_root:
            return None  # a key naming a file outside the folder the DB was built from
        return _read_regular(real, self.max_bytes)

    def _shard(self, path: str, sample_key: str) -> bytes | None:
        with self._lock:
            index = self._tar_index.get(path)
            if index is None:
                index = self._tar_index[path] = _index_tar(path)
                while len(self._tar_index) > 64:
                    self._tar_index.popitem(last=False)
            self._tar_index.move_to_end(path)
        found = index.get(sample_key)
        if found is None:
            return None
        offset, size = found
        if size > self.max_bytes:
            return None
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _table(self, spec: str, sample_key: str) -> bytes | None:
        file, image_col, _caption_col, key_col = spec.rsplit("#", 3)
        with self._lock:
            table = self._tables.get(file)
            if table is None:
                table = self._tables[file] = _Table(Path(file), image_col, key_col)
                while len(self._tables) > 8:
                    self._tables.popitem(last=False)
            self._tables.move_to_end(file)
        value = table.image_cell(sample_key)
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"])
            if isinstance(value.get("path"), str) and "\0" not in value["path"]:
                return self._file(str(Path(file).parent), value["path"])
        return None


class _Table:
    """A parquet or Arrow table's image cells, found by sample key (row groups read on demand)."""

    def __init__(self, path: Path, image_col: str, key_col: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.stem = path, path.stem
        if path.suffix == ".parquet":
            self._parquet = pq.ParquetFile(path)
            self._table = None
            names = self._parquet.schema_arrow.names
        else:
            self._parquet = None
            with pa.memory_map(str(path)) as source:
                try:
                    self._table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    self._table = None
            if self._table is None:
                with pa.memory_map(str(path)) as source:
                    self._table = pa.ipc.open_file(source).read_all()
            names = self._table.column_names
        self.image_col = image_col if image_col in names else _auto_column(names, "image")
        self.key_col = key_col if key_col in names else _auto_column(names, "key")
        self._rows: dict[str, int] | None = None

    def _row_of(self, sample_key: str) -> int | None:
        if self.key_col is None:
            # embed-shards names rows of a table without key column ``{stem}/{row}``.
            prefix = f"{self.stem}/"
            tail = sample_key[len(prefix) :]
            return int(tail) if sample_key.startswith(prefix) and tail.isdigit() else None
        if self._rows is None:
            if self._parquet is not None:
                keys = self._parquet.read(columns=[self.key_col]).column(0).to_pylist()
            else:
                keys = self._table.column(self.key_col).to_pylist()
            self._rows = {}
            for i, k in enumerate(keys):
                self._rows.setdefault(str(k), i)
        return self._rows.get(sample_key)

    def image_cell(self, sample_key: str):
        row = self._row_of(sample_key)
        if row is None or self.image_col is None:
            return None
        if self._parquet is None:
            return (
                self._table.column(self.image_col)[row].as_py() if row < len(self._table) else None
            )
        metadata = self._parquet.metadata
        start = 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if row < start + rows:
                cells = self._parquet.read_row_group(group, columns=[self.image_col]).column(0)
                return cells[row - start].as_py()
            start += rows
        return None


def _auto_column(names: list[str], kind: str) -> str | None:
    """The column embed-shards picks when none is named (its candidates, in order)."""
    from . import sources

    candidates = {
        "image": getattr(sources, "_IMAGE_COLUMNS", ("image", "img", "jpg", "png")),
        "key": getattr(sources, "_KEY_COLUMNS", ("key", "id", "image_id", "filename")),
    }[kind]
    return next((name for name in candidates if name in names), None)


def _read_regular(path: str, limit: int) -> bytes | None:
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        return f.read(limit + 1)


def _index_tar(path: str) -> dict[str, tuple[int, int]]:
    """``sample key -> (offset, size)`` of the image member of every sample of a shard."""
    out: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            if dot < 0:
                continue
            key, ext = name[:dot], name[dot + 1 :].lower()
            if ext in _IMAGE_EXTS and key not in out:
                out[key] = (member.offset_data, member.size)
                if key.startswith("./"):
                    out.setdefault(key[2:], (member.offset_data, member.size))
    return out


def _media_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:2] == b"BM":
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return "application/octet-stream"


# ==== Alignment with conversation state ====


def select_for_conversation(
    candidates: list[list[Hit]],
    vectors: list[np.ndarray],
    ks: list[int],
    shown_ids: set[tuple[str, int]],
    shown_vectors: list[np.ndarray],
    *,
    threshold: float,
    min_score: float,
) -> list[tuple[list[int], str]]:
    """The aligner's choice for one conversation's moments, in order.

    Same rules as :class:`starkret.Aligner` with ``reuse="episode"`` (its spec is
    :func:`starkret.testing.reference_select`), the episode being the whole conversation:
    images shown earlier (``shown_ids``) are never reused and images within
    ``threshold`` cosine of one shown (``shown_vectors``) are near duplicates.
    """
    used = set(shown_ids)
    chosen = [np.asarray(v, np.float32) for v in shown_vectors]
    out = []
    for hits, cand_vectors, k in zip(candidates, vectors, ks, strict=True):
        picked: list[int] = []
        outcome = "exhausted"
        for i, h in enumerate(hits):
            if len(picked) >= k:
                break
            if h.score < min_score:
                outcome = "below_threshold"
                break
            image = (h.source, h.row)
            if image in used:
                continue
            v = cand_vectors[i]
            if i and float(np.max(cand_vectors[:i] @ v)) >= threshold:
                continue
            if chosen and float(np.max(np.stack(chosen) @ v)) >= threshold:
                continue
            picked.append(i)
            used.add(image)
            chosen.append(v)
        if len(picked) >= k:
            outcome = "ok"
        out.append((picked, outcome))
    return out


# ==== Request and response bodies (the OpenAPI schema) ====

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
Vector = Annotated[list[float], Field(min_length=1, max_length=8192)]
Key = Annotated[str, StringConstraints(max_length=4096)]
SourceName = Annotated[str, StringConstraints(max_length=256)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queries: Annotated[list[Text | Vector], Field(min_length=1, max_length=MAX_QUERIES)] = Field(
        description="image descriptions, or query vectors of the DB's dimension "
        f"(at most {MAX_QUERIES})",
    )
    k: int = Field(5, ge=1, le=MAX_K, description=f"hits per source (1 to {MAX_K})")
    sources: Annotated[list[SourceName], Field(max_length=256)] | None = Field(
        None, description="only these sources (default: all)"
    )
    exclude: Annotated[list[Key], Field(max_length=MAX_EXCLUDE)] | None = Field(
        None, description="image keys never to return"
    )


class HitOut(BaseModel):
    key: str
    source: str
    score: float
    id: int
    url: str | None
    caption: str | None
    image: str = Field(description="path of GET /image for this hit")


class QueryResult(BaseModel):
    query: int
    hits: dict[str, list[HitOut]]


class SearchResponse(BaseModel):
    results: list[QueryResult]


class MomentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: Text | None = None
    vector: Vector | None = None
    moment_id: Annotated[str, StringConstraints(max_length=256)] | None = None
    k: int = Field(1, ge=1, le=32)


class AlignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    conversation_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    moments: Annotated[list[MomentIn], Field(max_length=MAX_QUERIES)] | None = None
    ultron_outputs: Annotated[list[Text], Field(max_length=MAX_QUERIES)] | None = Field(
        None, description="raw Ultron outputs: the `<RET> <h> ... </h>` turns share images"
    )
    dialogue: Annotated[str, StringConstraints(max_length=200_000)] | None = Field(
        None, description="a dialogue text, one turn per line, `[Sharing Image] ...` turns"
    )
    text: Annotated[str, StringConstraints(max_length=200_000)] | None = Field(
        None, description="an Ultron output or a dialogue, whichever it is"
    )
    sources: Annotated[list[SourceName], Field(max_length=256)] | None = None
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


class ImageOut(BaseModel):
    key: str
    source: str
    score: float
    url: str | None
    caption: str | None
    image: str


class AlignmentOut(BaseModel):
    moment_id: str
    description: str | None
    status: Literal["ok", "below_threshold", "exhausted"]
    images: list[ImageOut]
    candidates: dict[str, list[ImageOut]]


class AlignResponse(BaseModel):
    conversation_id: str
    alignments: list[AlignmentOut]
    shown: int


class ConversationOut(BaseModel):
    conversation_id: str
    moments: int
    shown: list[ImageOut]


class KnnRequest(BaseModel):
    """clip back's /knn-service request (the fields this server uses)."""

    model_config = ConfigDict(extra="allow")
    text: Text | None = None
    image: str | None = None
    image_url: str | None = None
    embedding_input: Vector | None = None
    modality: str | None = "image"
    num_images: int = Field(40, ge=1, le=MAX_K)
    indice_name: SourceName | None = None


# ==== The application ====


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def create_app(db: ImageDB, config: ServeConfig | None = None):
    """The FastAPI application serving ``db`` (the batcher starts with the app)."""

    config = config or ServeConfig()
    stats = _Stats()
    conversations = Conversations(
        config.max_conversations, config.conversation_ttl_s, config.max_shown_per_conversation
    )
    images = ImageStore(db)
    state: dict[str, Any] = {}

    def fail(status: int, reason: str):
        raise RequestError(status, reason)

    def check_sources(sources: list[str] | None) -> tuple[str, ...] | None:
        if sources is None:
            return None
        for s in sources:
            if s not in db.sources:
                fail(422, _one_line(f"unknown source {s!r}; this DB has {db.sources}"))
        return tuple(dict.fromkeys(sources))

    def check_vector(v: list[float], what: str) -> np.ndarray:
        if len(v) != db.dim:
            fail(
                422,
                f"wrong vector dimension: {what} has {len(v)} numbers, this DB's vectors "
                f"have {db.dim}",
            )
        a = np.asarray(v, np.float64)
        if not np.isfinite(a).all():
            fail(422, f"{what} has a number that is not finite")
        norm = float(np.linalg.norm(a))
        if not math.isfinite(norm) or norm == 0.0:
            fail(422, f"{what} has norm {norm}: it needs a direction")
        return (a / norm).astype(np.float32)

    async def run_search(
        queries: list, k: int, sources, exclude: list[set[str]] | None
    ) -> list[list[Hit]]:
        texts, text_pos, vecs, vec_pos = [], [], [], []
        for i, q in enumerate(queries):
            if isinstance(q, str):
                texts.append(q)
                text_pos.append(i)
            else:
                vecs.append(check_vector(q, f"query {i}"))
                vec_pos.append(i)
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(result) -> None:
            def settle() -> None:
                if future.done():
                    return
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

            loop.call_soon_threadsafe(settle)

        job = _Job(
            texts,
            text_pos,
            np.stack(vecs) if vecs else None,
            vec_pos,
            k,
            sources,
            exclude if exclude is not None else [set() for _ in queries],
            done,
        )
        state["batcher"].submit(job)
        return await future

    def hit_out(h: Hit) -> dict:
        return {
            "key": h.key,
            "source": h.source,
            "score": h.score,
            "id": h.id,
            "url": h.url,
            "caption": h.caption,
            "image": image_path(h.source, h.key),
        }

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = app.state.batcher = Batcher(db, config, stats)
        try:
            yield
        finally:
            state["batcher"].close()

    app = FastAPI(
        title="starkret serve",
        version="1",
        description="An image DB for image-sharing dialogue models: batched search, "
        "per-conversation alignment without reuse, image bytes, and a page.",
        lifespan=lifespan,
    )

    app.add_middleware(_Guard, limit=MAX_BODY_BYTES, stats=stats)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return JSONResponse({"detail": _one_line(str(exc))}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx") or {}
            return JSONResponse(
                {"detail": _one_line(f"malformed JSON: {ctx.get('error', 'cannot parse')}")},
                400,
            )
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        msg = first.get("msg", "invalid")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return JSONResponse({"detail": _one_line(f"invalid {where}: {msg}{more}")}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": _one_line(str(exc.detail))}, exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return JSONResponse({"detail": _one_line(f"internal error: {exc}")}, 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("starkret").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the DB is open and the batcher runs."""
        return {"status": "ok", "images": len(db), "sources": db.sources, "dim": db.dim}

    @app.get("/stats")
    async def get_stats() -> dict:
        """Queries, batch sizes, latency percentiles per endpoint, conversations."""
        out = stats.as_dict()
        out["conversations"] = {
            "live": len(conversations),
            "evicted": conversations.evicted,
            "expired": conversations.expired,
            "max": config.max_conversations,
            "ttl_s": config.conversation_ttl_s,
        }
        out["limits"] = {
            "max_k": MAX_K,
            "max_queries": MAX_QUERIES,
            "max_body_bytes": MAX_BODY_BYTES,
            "batch_wait_ms": config.batch_wait_ms,
            "max_batch": config.max_batch,
            "workers": config.workers,
        }
        return out

    # Responses are built as plain JSON (no response-model validation on the hot path);
    # ``responses=`` keeps their schema in the OpenAPI description.
    @app.post("/search", response_model=None, responses={200: {"model": SearchResponse}})
    async def search(body: SearchRequest) -> JSONResponse:
        """Top ``k`` hits of every source (or of ``sources``) for each query."""
        sources = check_sources(body.sources)
        exclude = None if body.exclude is None else [set(body.exclude)] * len(body.queries)
        found = await run_search(body.queries, body.k, sources, exclude)
        results = []
        for q, hits in enumerate(found):
            per_source: dict[str, list[dict]] = {s: [] for s in (sources or db.sources)}
            for h in hits:
                per_source[h.source].append(hit_out(h))
            results.append({"query": q, "hits": per_source})
        return JSONResponse({"results": results})

    def image_out(record: dict) -> dict:
        return {k: record[k] for k in ("key", "source", "score", "url", "caption", "image")}

    @app.post("/align", response_model=AlignResponse)
    async def align(body: AlignRequest) -> dict:
        """One image per sharing moment, never one this conversation was shown before."""
        from .formats import find_sharing_moments, parse_ultron_output

        sources = check_sources(body.sources)
        moments: list[dict] = []
        for i, m in enumerate(body.moments or []):
            if (m.description is None) == (m.vector is None):
                fail(422, f"moment {i} needs exactly one of description and vector")
            moments.append(
                {
                    "moment_id": m.moment_id or f"m{i}",
                    "description": m.description,
                    "query": m.description
                    if m.vector is None
                    else check_vector(m.vector, f"moment {i}").tolist(),
                    "k": m.k,
                }
            )
        texts = list(body.ultron_outputs or [])
        dialogue = body.dialogue
        if body.text is not None:
            if parse_ultron_output(body.text) is not None:
                texts.append(body.text)
            else:
                dialogue = body.text if dialogue is None else dialogue + "\n" + body.text
        for i, t in enumerate(texts):
            d = parse_ultron_output(t)
            if d is not None:
                moments.append({"moment_id": f"ultron{i}", "description": d, "query": d, "k": 1})
        if dialogue:
            for sm in find_sharing_moments(dialogue):
                d = sm.description[:MAX_TEXT]
                moments.append(
                    {"moment_id": f"line{sm.line}", "description": d, "query": d, "k": 1}
                )
        if not moments:
            fail(422, "empty: no moments, no <RET> turn and no [Sharing Image] line")
        if len(moments) > MAX_QUERIES:
            fail(422, f"too many moments: {len(moments)} (limit {MAX_QUERIES})")
        threshold = config.near_duplicate_threshold
        min_score = config.min_score if body.min_score is None else body.min_score
        with conversations.lock:
            conv = conversations.get(body.conversation_id)
            shown_keys = {r["key"] for r in conv.shown.values()}
        fetch = [max(config.k_per_source, m["k"]) * config.overfetch for m in moments]
        while True:
            k = min(max(fetch), MAX_K * 4)
            found = await run_search(
                [m["query"] for m in moments],
                k,
                sources,
                [shown_keys] * len(moments),
            )
            cand_vectors = [_hit_vectors(db, hits) for hits in found]
            with conversations.lock:
                conv = conversations.get(body.conversation_id)
                choice = select_for_conversation(
                    found,
                    cand_vectors,
                    [m["k"] for m in moments],
                    set(conv.shown),
                    list(conv.vectors.values()),
                    threshold=threshold,
                    min_score=min_score,
                )
                starved = [
                    outcome == "exhausted"
                    and any(n >= k for n in collections.Counter(h.source for h in hits).values())
                    for (_, outcome), hits in zip(choice, found, strict=True)
                ]
                if any(starved) and k < MAX_K * 4:
                    fetch = [f * 2 for f in fetch]
                    continue
                alignments = []
                for m, hits, vecs, (picked, outcome) in zip(
                    moments, found, cand_vectors, choice, strict=True
                ):
                    chosen = []
                    for p in picked:
                        record = {**hit_out(hits[p]), "moment_id": m["moment_id"]}
                        conversations.remember(conv, (hits[p].source, hits[p].row), record, vecs[p])
                        chosen.append(image_out(record))
                    conv.moments += 1
                    per_source: dict[str, list[dict]] = {s: [] for s in (sources or db.sources)}
                    for h in _top_k_per_source(hits, config.k_per_source):
                        per_source[h.source].append(image_out(hit_out(h)))
                    alignments.append(
                        {
                            "moment_id": m["moment_id"],
                            "description": m["description"],
                            "status": outcome,
                            "images": chosen,
                            "candidates": per_source,
                        }
                    )
                return {
                    "conversation_id": body.conversation_id,
                    "alignments": alignments,
                    "shown": len(conv.shown),
                }

    @app.get("/conversation/{conversation_id}", response_model=ConversationOut)
    async def get_conversation(conversation_id: str) -> dict:
        """The images a conversation has been shown, oldest first."""
        with conversations.lock:
            conv = conversations.get(conversation_id, create=False)
            if conv is None:
                fail(404, f"not found: no conversation {conversation_id!r} (expired or reset?)")
            return {
                "conversation_id": conversation_id,
                "moments": conv.moments,
                "shown": [image_out(r) for r in conv.shown.values()],
            }

    @app.delete("/conversation/{conversation_id}")
    async def reset_conversation(conversation_id: str) -> dict:
        """Forget a conversation's shown images."""
        with conversations.lock:
            existed = conversations.reset(conversation_id)
        return {"conversation_id": conversation_id, "reset": existed}

    @app.get(
        "/image/{source}/{key:path}",
        responses={200: {"content": {"image/*": {}}}, 307: {}, 404: {}},
    )
    async def image(source: str, key: str):
        """The image's bytes from the DB's own inputs, or a redirect to its URL."""
        if source not in db.sources:
            fail(404, _one_line(f"unknown source {source!r}; this DB has {db.sources}"))
        data = await asyncio.to_thread(images.read, source, key)
        if data is not None:
            return Response(
                data,
                media_type=_media_type(data),
                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"},
            )
        url = images.url(source, key)
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            return RedirectResponse(url, 307)
        fail(404, f"not found: {key!r} has no local bytes and no http(s) URL")

    @app.get("/indices-list")
    async def indices_list() -> list[str]:
        """clip back's list of indices: the DB's sources."""
        return db.sources

    @app.post("/knn-service")
    async def knn_service(request: Request) -> list[dict]:
        """clip back's query shape: ``text`` or ``embedding_input``, ``num_images``,
        ``indice_name``; answers ``[{id, url, caption, similarity}]`` best first."""
        import json

        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            fail(400, f"malformed JSON: {exc}")
        if not isinstance(payload, dict):
            fail(422, "invalid body: expected a JSON object")
        try:
            body = KnnRequest.model_validate(payload)
        except Exception as exc:
            errors = getattr(exc, "errors", lambda: [])()
            first = errors[0] if errors else {"loc": (), "msg": str(exc)}
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            fail(422, f"invalid {where}: {first.get('msg')}")
        if body.image is not None or body.image_url is not None:
            fail(422, "unsupported: image queries (this server encodes texts and vectors)")
        if body.text is None and body.embedding_input is None:
            fail(422, "empty: give text or embedding_input")
        sources = None
        if body.indice_name is not None and body.indice_name not in ("all", ""):
            sources = check_sources([body.indice_name])
        query = body.text if body.text is not None else body.embedding_input
        found = await run_search([query], body.num_images, sources, None)
        hits = sorted(found[0], key=lambda h: -h.score)[: body.num_images]
        base = str(request.base_url).rstrip("/")
        return [
            {
                "id": h.id,
                "url": h.url or base + image_path(h.source, h.key),
                "caption": h.caption,
                "similarity": h.score,
                "key": h.key,
                "source": h.source,
            }
            for h in hits
        ]

    return app


def image_path(source: str, key: str) -> str:
    """The ``GET /image`` path of an image (the key percent-encoded, slashes kept)."""
    from urllib.parse import quote

    return f"/image/{quote(source, safe='')}/{quote(key, safe='/')}"


def _hit_vectors(db: ImageDB, hits: list[Hit]) -> np.ndarray:
    out = np.zeros((len(hits), db.dim), np.float32)
    by_source: dict[str, list[int]] = {}
    for n, h in enumerate(hits):
        by_source.setdefault(h.source, []).append(n)
    for source, positions in by_source.items():
        out[positions] = db.vectors(source, [hits[p].row for p in positions])
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1)


class _Guard:
    """ASGI middleware: bodies over ``limit`` bytes get 413 before the app sees them;
    every request's latency and status go to the statistics."""

    def __init__(self, app, limit: int, stats: _Stats) -> None:
        self.app, self.limit, self.stats = app, limit, stats

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
            body = await self._read(scope, receive)
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

    async def _read(self, scope, receive) -> bytes | None:
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if len(body) > self.limit:
                return None
            if not message.get("more_body", False):
                break
        return bytes(body)


async def _send_json(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def serve(
    db_path: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    config: ServeConfig | None = None,
    embedder=None,
) -> None:
    """Open the DB and serve it until interrupted (``starkret serve``)."""
    import uvicorn

    config = config or ServeConfig()
    db = ImageDB.open(db_path, embedder=embedder)
    if embedder is None:
        from .towers import ClipEmbedder

        db = ImageDB.open(
            db_path,
            embedder=ClipEmbedder(
                db.manifest["model"], db.manifest["pretrained"], device=config.device
            ),
        )
    db.encode(["warm up"])  # load the text tower before the first request
    app = create_app(db, config)
    print(f"starkret serve: {db!r} on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
