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
  generation). Conversations are kept in memory, bounded in number and in bytes (least
  recently used first out), expire after ``conversation_ttl_s`` and are reset with
  ``DELETE /conversation/{id}``; a forgotten conversation starts fresh.
- ``GET /image/{source}/{key}``: the image bytes, read only from the DB's own inputs
  (shards, folders, tables recorded in its manifests), or a redirect to its URL.
- ``GET /health``, ``GET /stats``; clip back's ``POST /knn-service`` and
  ``GET /indices-list``; ``GET /`` the page.

Bad requests get a 4xx answer with a one-line ``detail``; the server never reads a file
that is not one of the DB's inputs. With an API key every endpoint but ``/health``, the
page and the API description needs ``Authorization: Bearer KEY``. Ids and keys go in
paths percent-encoded (``/`` as ``%2F``) and come back exactly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from starkret.align.choice import Choice, Rule, choose
from starkret.defaults import DEFAULTS
from starkret.errors import InvalidInputError
from starkret.index.db import Hit, ImageDB, Results
from starkret.serve.batcher import Batcher, _Job
from starkret.serve.clipback import KnnService
from starkret.serve.connections import ConnectionCounts, connection_limit, uvicorn_options
from starkret.serve.conversations import Conversations
from starkret.serve.middleware import _Guard, _Stats
from starkret.serve.schema import (
    MAX_BODY_BYTES,
    MAX_FETCH,
    MAX_K,
    MAX_QUERIES,
    MAX_TEXT,
    AlignRequest,
    AlignResponse,
    ConversationOut,
    KnnRequest,
    RequestError,
    SearchRequest,
    SearchResponse,
    ServeConfig,
    one_line,
)
from starkret.store.images import media_type, part_input

#: What the API says about conversations it forgets (OpenAPI descriptions, docs).
FORGOTTEN = (
    "A conversation is forgotten when it is reset, idle for the TTL, or evicted (least "
    "recently used first) to keep all conversations within their count and byte limits; "
    "a forgotten conversation starts fresh: images shown before may be shown again."
)


class _AnyText(Convertor):
    """A path parameter that is any non-empty text, ``/`` and newlines included (sent
    percent-encoded; the server decodes the path once)."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("any_text", _AnyText())

# ==== The application ====


def create_app(db: ImageDB, config: ServeConfig | None = None):
    """The FastAPI application serving ``db`` (the batcher starts with the app)."""

    config = config or ServeConfig()
    check_service_options(config)
    stats = _Stats()
    conversations = Conversations(
        config.max_conversations,
        config.conversation_ttl_s,
        config.max_shown_per_conversation,
        max_bytes=config.max_conversation_bytes,
    )
    connections = ConnectionCounts()
    public_url = (config.public_url or f"http://{DEFAULTS.host}:{DEFAULTS.port}").rstrip("/")
    state: dict[str, Any] = {}

    def fail(status: int, reason: str):
        raise RequestError(status, reason)

    def check_sources(sources: list[str] | None) -> tuple[str, ...] | None:
        if sources is None:
            return None
        for s in sources:
            if s not in db.sources:
                fail(422, one_line(f"unknown source {s!r}; this DB has {db.sources}"))
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

    def make_job(queries: list, k: int, sources, done, **options) -> _Job:
        texts, text_pos, vecs, vec_pos = [], [], [], []
        for i, q in enumerate(queries):
            if isinstance(q, str):
                texts.append(q)
                text_pos.append(i)
            else:
                vecs.append(check_vector(q, f"query {i}"))
                vec_pos.append(i)
        vectors = np.stack(vecs) if vecs else None
        return _Job(texts, text_pos, vectors, vec_pos, k, sources, done, **options)

    async def run_search(
        queries: list, k: int, sources, exclude_keys: tuple[str, ...] = ()
    ) -> list[list[Hit]]:
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

        state["batcher"].submit(make_job(queries, k, sources, done, exclude_keys=exclude_keys))
        return await future

    def search_blocking(queries: list, k: int, sources, exclude_rows) -> Results:
        """The batcher's arrays for ``queries``, waited for (from a worker thread)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def done(result) -> None:
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        job = make_job(queries, k, sources, done, exclude_rows=exclude_rows, arrays=True)
        state["batcher"].submit(job)
        return future.result()

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
    app.state.connections = connections  # counted by the connection guard (serve)

    app.add_middleware(_Guard, limit=MAX_BODY_BYTES, stats=stats, api_key=config.api_key)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return JSONResponse({"detail": one_line(str(exc))}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx") or {}
            return JSONResponse(
                {"detail": one_line(f"malformed JSON: {ctx.get('error', 'cannot parse')}")},
                400,
            )
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        msg = first.get("msg", "invalid")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return JSONResponse({"detail": one_line(f"invalid {where}: {msg}{more}")}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": one_line(str(exc.detail))}, exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return JSONResponse({"detail": one_line(f"internal error: {exc}")}, 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("starkret.serve").joinpath("static/index.html").read_text("utf-8")
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
            "bytes": conversations.bytes,
            "max_bytes": config.max_conversation_bytes,
        }
        out["connections"] = connections.as_dict()
        out["limits"] = {
            "max_k": MAX_K,
            "max_queries": MAX_QUERIES,
            "max_body_bytes": MAX_BODY_BYTES,
            "batch_wait_ms": config.batch_wait_ms,
            "max_batch": config.max_batch,
            "workers": config.workers,
            "header_timeout_s": config.header_timeout_s,
            "body_timeout_s": config.body_timeout_s,
            "keep_alive_s": config.keep_alive_s,
            "max_connections": connections.limit or connection_limit(config.max_connections),
            "max_conversation_bytes": config.max_conversation_bytes,
            "max_shown_per_conversation": config.max_shown_per_conversation,
        }
        return out

    # Responses are built as plain JSON (no response-model validation on the hot path);
    # ``responses=`` keeps their schema in the OpenAPI description.
    @app.post("/search", response_model=None, responses={200: {"model": SearchResponse}})
    async def search(body: SearchRequest) -> JSONResponse:
        """Top ``k`` hits of every source (or of ``sources``) for each query."""
        sources = check_sources(body.sources)
        found = await run_search(body.queries, body.k, sources, tuple(body.exclude or ()))
        results = []
        for q, hits in enumerate(found):
            per_source: dict[str, list[dict]] = {s: [] for s in (sources or db.sources)}
            for h in hits:
                per_source[h.source].append(hit_out(h))
            results.append({"query": q, "hits": per_source})
        return JSONResponse({"results": results})

    def image_out(record: dict) -> dict:
        return {k: record[k] for k in ("key", "source", "score", "url", "caption", "image")}

    @app.post("/align", response_model=AlignResponse, description=FORGOTTEN)
    async def align(body: AlignRequest) -> dict:
        """One image per sharing moment, never one this conversation was shown before."""
        from starkret.align.formats import find_sharing_moments, parse_ultron_output

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
        min_score = config.min_score if body.min_score is None else body.min_score
        rule = Rule("episode", config.near_duplicate_threshold, min_score)
        queries = [m["query"] for m in moments]
        with conversations.lock:
            conv = conversations.get(body.conversation_id)
        async with conv.turn:
            with conversations.lock:
                conv = conversations.get(body.conversation_id)
                shown, shown_rows = conv.shown_images(db.sources, db.dim)

            def search(group: np.ndarray, k: int) -> Results:
                return search_blocking([queries[i] for i in group], k, sources, shown_rows)

            choice = await asyncio.to_thread(
                choose,
                db,
                np.zeros(len(moments), np.uint64),  # the conversation is one episode
                np.array([m["k"] for m in moments], np.int64),
                search,
                rule=rule,
                k_per_source=config.k_per_source,
                overfetch=config.overfetch,
                max_fetch=MAX_FETCH,
                shown=shown,
            )
            per_source_top = choice.candidates.first_per_source(
                config.k_per_source, len(db.sources)
            )
            hits = await asyncio.to_thread(_hits_of, db, choice, per_source_top)
            with conversations.lock:
                conv = conversations.get(body.conversation_id)
                alignments = []
                start = 0
                for j, m in enumerate(moments):
                    chosen = []
                    for n in range(start, start + int(choice.counts[j])):
                        p = int(choice.picked[n])
                        record = {**hit_out(hits[p]), "moment_id": m["moment_id"]}
                        image = (hits[p].source, hits[p].row)
                        conversations.remember(conv, image, record, choice.picked_vectors[n])
                        chosen.append(image_out(record))
                    start += int(choice.counts[j])
                    conv.moments += 1
                    a, b = choice.candidates.offsets[j : j + 2].tolist()
                    per_source: dict[str, list[dict]] = {s: [] for s in (sources or db.sources)}
                    for i in (a + np.flatnonzero(per_source_top[a:b])).tolist():
                        per_source[hits[i].source].append(image_out(hit_out(hits[i])))
                    alignments.append(
                        {
                            "moment_id": m["moment_id"],
                            "description": m["description"],
                            "status": choice.status(j),
                            "images": chosen,
                            "candidates": per_source,
                        }
                    )
                return {
                    "conversation_id": body.conversation_id,
                    "alignments": alignments,
                    "shown": len(conv.shown),
                }

    @app.get(
        "/conversation/{conversation_id:any_text}",
        response_model=ConversationOut,
        description="The id goes percent-encoded (`/` as `%2F`). " + FORGOTTEN,
    )
    async def get_conversation(conversation_id: str) -> dict:
        """The images a conversation has been shown, oldest first."""
        with conversations.lock:
            conv = conversations.get(conversation_id, create=False)
            if conv is None:
                fail(
                    404,
                    one_line(
                        f"not found: no conversation {conversation_id!r} "
                        "(reset, expired or evicted?)"
                    ),
                )
            return {
                "conversation_id": conversation_id,
                "moments": conv.moments,
                "shown": [image_out(r) for r in conv.shown.values()],
            }

    @app.delete(
        "/conversation/{conversation_id:any_text}",
        description="The id goes percent-encoded (`/` as `%2F`). " + FORGOTTEN,
    )
    async def reset_conversation(conversation_id: str) -> dict:
        """Forget a conversation's shown images."""
        with conversations.lock:
            existed = conversations.reset(conversation_id)
        return {"conversation_id": conversation_id, "reset": existed}

    @app.get(
        "/image/{source}/{key:any_text}",
        responses={200: {"content": {"image/*": {}}}, 307: {}, 404: {}},
    )
    async def image(source: str, key: str):
        """The image's bytes from the DB's own inputs, or a redirect to its URL (when its
        source records no local input); 404 when its input changed or vanished since
        the DB was built. The key goes percent-encoded (`/` as `%2F`)."""
        if source not in db.sources:
            fail(404, one_line(f"unknown source {source!r}; this DB has {db.sources}"))
        located = db.locate(key, [source])
        if located is None:
            fail(404, one_line(f"not found: no image {key!r} in source {source!r}"))
        data = await asyncio.to_thread(db.image_bytes, source, key)
        if data is not None:
            return Response(
                data,
                media_type=media_type(data),
                headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"},
            )
        part = db.part_of(source, located[1])[0]
        if part_input(db.source_manifest(source), part) is not None:
            # Its bytes were read from a local input once: never someone else's bytes, nor
            # a redirect, when that input no longer holds them.
            fail(
                404,
                one_line(
                    f"not found: {key!r} has no local bytes any more (its input changed or "
                    "vanished since the DB was built, or the key is unsafe to read)"
                ),
            )
        url = db.image_url(source, key)
        if isinstance(url, str) and url.startswith(("http://", "https://")):
            return RedirectResponse(url, 307)
        fail(404, one_line(f"not found: {key!r} has no local bytes and no http(s) URL"))

    @app.get("/indices-list")
    async def indices_list() -> list[str]:
        """clip back's list of indices: the DB's sources."""
        return db.sources

    knn = KnnService(db, config, run_search)

    def result_url(h: Hit) -> str:
        """The URL a clip back answer gives for a hit: its own, else its GET /image
        under the server's public URL."""
        return h.url or public_url + image_path(h.source, h.key)

    # The body is read raw (clip back's clients send JSON without a content type);
    # its schema is declared for the OpenAPI description.
    knn_body = {"content": {"application/json": {"schema": KnnRequest.model_json_schema()}}}

    @app.post("/knn-service", response_model=None, openapi_extra={"requestBody": knn_body})
    async def knn_service(request: Request) -> JSONResponse:
        """clip back's query: ``text``, ``image`` (base64), ``image_url`` (with
        ``--allow-image-urls``) or ``embedding_input``; ``num_images``, ``indice_name``,
        ``deduplicate``, ``modality="image"``; answers ``[{id, url, caption,
        similarity}]`` best first, errors as ``{"message"}`` (clip back's shape)."""
        return await knn.answer(await request.body(), result_url)

    return app


def image_path(source: str, key: str) -> str:
    """The ``GET /image`` path of an image: source and key percent-encoded whole (``/``
    too, so no client merges or resolves a segment of a key).

    >>> image_path("chartqa", "png/a b.png")
    '/image/chartqa/png%2Fa%20b.png'
    """
    return f"/image/{path_segment(source)}/{path_segment(key)}"


def path_segment(text: str) -> str:
    """``text`` as one percent-encoded path segment that no client rewrites (a lone
    ``.`` or ``..`` is a dot segment, so its dots are encoded too)."""
    from urllib.parse import quote

    segment = quote(text, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


def _hits_of(db: ImageDB, choice: Choice, shown: np.ndarray) -> dict[int, Hit]:
    """Hits (metadata read) of the candidates an answer holds: ``shown`` ones and picked
    ones, by flat candidate index."""
    needed = shown.copy()
    needed[choice.picked] = True
    idx = np.flatnonzero(needed)
    cands = choice.candidates
    one_per_line = Results(
        cands.sources[idx, None].astype(np.int16), cands.rows[idx, None], cands.scores[idx, None]
    )
    return {int(i): h[0] for i, h in zip(idx.tolist(), db.hits(one_per_line), strict=True)}


def serve(
    db_path: str | os.PathLike,
    *,
    host: str = DEFAULTS.host,
    port: int = DEFAULTS.port,
    config: ServeConfig | None = None,
    embedder=None,
) -> None:
    """Open the DB and serve it until interrupted (``starkret serve``).

    Without ``config.api_key`` the key is taken from the ``STARKRET_API_KEY``
    environment variable when set; without ``config.public_url`` answers' URLs start
    with ``http://{host}:{port}``."""
    import dataclasses

    import uvicorn

    config = config or ServeConfig()
    if config.api_key is None and os.environ.get(API_KEY_VARIABLE):
        config = dataclasses.replace(config, api_key=os.environ[API_KEY_VARIABLE].strip())
    if config.public_url is None:
        config = dataclasses.replace(config, public_url=default_public_url(host, port))
    check_service_options(config)
    db = ImageDB.open(db_path, embedder=embedder, duplicates=config.duplicates)
    if embedder is None:
        from starkret.ingest.towers import ClipEmbedder

        db = ImageDB.open(
            db_path,
            duplicates=config.duplicates,
            # not compiled: a compiled image tower pads every call to a full batch and
            # compiles on the first /knn-service image query; queries come one by one
            embedder=ClipEmbedder(
                db.manifest["model"], db.manifest["pretrained"], device=config.device, compile=False
            ),
        )
    db.encode(["warm up"])  # load the text tower before the first request
    app = create_app(db, config)
    options = uvicorn_options(app, config)
    limit = app.state.connections.limit
    print(f"starkret serve: {db!r} on http://{host}:{port}/ (public URL {config.public_url})")
    if limit < config.max_connections:
        print(
            f"starkret serve: at most {limit} connections (the open-file limit, ulimit -n, "
            f"is too low for --max-connections {config.max_connections})"
        )
    print(
        "starkret serve: "
        + ("API key required" if config.api_key else "no API key: anyone reaching the port")
        + " (--api-key-file or STARKRET_API_KEY)",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, **options)


#: The environment variable ``starkret serve`` takes its API key from.
API_KEY_VARIABLE = "STARKRET_API_KEY"


def default_public_url(host: str, port: int) -> str:
    """``http://host:port``, the base of answers' URLs unless ``--public-url`` says; a
    wildcard address (``0.0.0.0``, ``::``) is replaced by this machine's name."""
    import socket

    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{port}"


def read_api_key(path: str | os.PathLike) -> str:
    """The API key in the file ``path`` (its first line, without surrounding blanks)."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read the API key file {path}: {exc}") from exc
    if not key:
        raise InvalidInputError(f"the API key file {path} is empty")
    return key


def check_service_options(config: ServeConfig) -> None:
    """Raises :class:`~starkret.errors.InvalidInputError` for service options that cannot
    work (a timeout or limit below its minimum, a public URL that is not http(s))."""
    for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
        if not getattr(config, name) > 0:
            raise InvalidInputError(f"{name} must be above 0, not {getattr(config, name)}")
    if config.max_connections < 1 or config.max_conversation_bytes < 1:
        raise InvalidInputError("max_connections and max_conversation_bytes must be at least 1")
    if config.api_key is not None and not config.api_key.strip():
        raise InvalidInputError("the API key is empty")
    url = config.public_url
    if url is not None and not url.startswith(("http://", "https://")):
        raise InvalidInputError(f"the public URL must start with http:// or https://: {url!r}")
