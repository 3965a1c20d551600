"""clip back's ``POST /knn-service`` on ``starkret serve``: what clip-retrieval's
``ClipClient`` and clip front send, answered the way clip back answers.

A query is ``text``, ``image`` (the image file's bytes in base64, as ``ClipClient.query(
image=path)`` sends them), ``image_url`` (fetched by the server, only when it was started
with ``--allow-image-urls``) or ``embedding_input``; clip back's priority when several are
given. Images go through the same Rust preprocessing (exact mode, the DB's image size)
and the same image tower as ``embed``, then the same batched search as texts.
``deduplicate`` keeps, of every group of results linked by cosine at or above the
near-duplicate threshold (clip back's connected components over the results), only the
best ranked; the cosines are those of the stored vectors. ``modality="image"`` searches
the image embeddings; ``"text"`` (clip back's caption index) is refused, as this server
has none. ``use_safety_model``, ``use_violence_detector``, ``aesthetic_score``,
``aesthetic_weight`` and ``use_mclip`` are accepted and ignored.

Errors are clip back's (flask-restful's) shape: a status and ``{"message": one line}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
from fastapi.responses import JSONResponse

from starkret.errors import RequestError
from starkret.index.db import Hit, ImageDB
from starkret.ingest.preprocess import OPENAI_MEAN, OPENAI_STD, preprocess
from starkret.ingest.sources import input_format
from starkret.serve.schema import MAX_BODY_BYTES, MAX_K, KnnRequest, ServeConfig, one_line

__all__ = [
    "IGNORED_FIELDS",
    "IMAGE_URL_TIMEOUT_S",
    "MAX_IMAGE_BYTES",
    "MAX_QUERY_PIXELS",
    "KnnService",
    "embed_image",
    "fetch_image",
    "first_of_near_duplicates",
    "image_from_base64",
]

# ==== Limits ====

#: Most pixels a query image may have (checked from its header, before decoding): a
#: 64-megapixel photo. An upload is at most the body limit, but a few MiB of JPEG can
#: declare far more pixels than that.
MAX_QUERY_PIXELS = 64 * 1024 * 1024
#: Largest image an ``image_url`` query may fetch (the body limit of an upload).
MAX_IMAGE_BYTES = MAX_BODY_BYTES
#: Longest an ``image_url`` fetch may take, connection to last byte (clip back: 10 s).
IMAGE_URL_TIMEOUT_S = 10.0
#: Fields clip back's clients send that mean nothing here: accepted, ignored.
IGNORED_FIELDS = (
    "use_safety_model",
    "use_violence_detector",
    "aesthetic_score",
    "aesthetic_weight",
    "use_mclip",
)
_FETCH_CHUNK = 64 * 1024


def knn_error(exc: RequestError) -> JSONResponse:
    """``exc`` as clip back answers an error: its status, ``{"message": one line}``."""
    return JSONResponse({"message": one_line(str(exc))}, exc.status)


# ==== Image queries ====


def image_from_base64(text: str) -> bytes:
    """The bytes of an ``image`` field: base64 (line breaks and a ``data:...;base64,``
    prefix allowed, as browsers write it); RequestError 422 if it is not base64."""
    if text.startswith("data:") and "," in text[:256]:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(422, f"bad image: the image field is not base64 ({exc})") from exc
    if not data:
        raise RequestError(422, "bad image: the image field is empty")
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only (urllib's own also follows ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise RequestError(422, f"bad image_url: it redirects to {newurl!r}, not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image(
    url: str, *, timeout_s: float = IMAGE_URL_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES
) -> bytes:
    """The bytes at an http(s) ``url``, within ``timeout_s`` (connection to last byte)
    and ``max_bytes``; RequestError 422 with the reason otherwise.

    A deadline over the whole transfer, not only per read, so a server dripping bytes
    cannot hold a worker thread longer than ``timeout_s``.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError(422, f"bad image_url: {url!r} is not an http(s) URL")
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "starkret-serve"})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise RequestError(
                    422, f"bad image_url: {url} holds {int(declared):,} bytes (limit {max_bytes:,})"
                )
            data = bytearray()
            while chunk := response.read1(_FETCH_CHUNK):
                data += chunk
                if len(data) > max_bytes:
                    raise RequestError(
                        422, f"bad image_url: {url} holds over {max_bytes:,} bytes (the limit)"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError
    except urllib.error.HTTPError as exc:
        raise RequestError(
            422, f"bad image_url: fetching {url} gave HTTP {exc.code} {exc.reason}"
        ) from exc
    except urllib.error.URLError as exc:
        raise RequestError(422, f"bad image_url: cannot fetch {url} ({exc.reason})") from exc
    except TimeoutError as exc:
        raise RequestError(
            422, f"bad image_url: fetching {url} took over {timeout_s:g} s (the limit)"
        ) from exc
    except OSError as exc:
        raise RequestError(422, f"bad image_url: cannot fetch {url} ({exc})") from exc
    return bytes(data)


def embed_image(db: ImageDB, data: bytes, *, max_pixels: int = MAX_QUERY_PIXELS) -> np.ndarray:
    """One encoded image -> its unit float32 vector, as ``embed`` made the DB's: the Rust
    preprocessing in exact mode at the DB's image size, the image tower of its model.
    RequestError 422 (the decoder's reason) for an image that cannot be decoded."""
    embedder = db.embedder
    manifest = db.manifest
    dtype, layout = input_format(embedder)
    batch = preprocess(
        [data],
        size=int(manifest.get("image_size") or embedder.image_size),
        mode="exact",
        dtype=dtype,
        layout=layout,
        threads=1,
        max_pixels=max_pixels,
        mean=tuple(manifest.get("mean") or OPENAI_MEAN),
        std=tuple(manifest.get("std") or OPENAI_STD),
    )
    if batch.failures:
        raise RequestError(422, f"bad image: {batch.failures[0][1]}")
    return np.asarray(embedder.encode_images(batch.pixels, dtype="float32")[0], np.float32)


# ==== deduplicate ====


def first_of_near_duplicates(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Which of ``vectors`` (unit rows, best ranked first) clip back's ``deduplicate``
    keeps: link every pair with cosine >= ``threshold``; of each connected group, the
    first. Labels spread as the least index of a neighbour until stable (at most the
    group's diameter rounds of one (n, n) step: n is a result list, <= a few hundred)."""
    n = len(vectors)
    if n == 0:
        return np.zeros(0, bool)
    v = np.asarray(vectors, np.float32)
    linked = (v @ v.T) >= np.float32(threshold)
    np.fill_diagonal(linked, True)
    label = np.arange(n)
    while True:
        spread = np.where(linked, label[None, :], n).min(axis=1)
        spread = spread[spread]  # pointer jumping: fewer rounds on long chains
        if np.array_equal(spread, label):
            return label == np.arange(n)
        label = spread


def stored_vectors(db: ImageDB, hits: Sequence[Hit]) -> np.ndarray:
    """The stored (float32) vectors of ``hits``, in order: one read per source."""
    out = np.zeros((len(hits), db.dim), np.float32)
    sources = np.array([h.source for h in hits], dtype=object)
    rows = np.array([h.row for h in hits], np.int64)
    for name in dict.fromkeys(sources.tolist()):
        at = np.flatnonzero(sources == name)
        out[at] = db.vectors(name, rows[at])
    return out


# ==== The service ====

#: ``run_search(queries, k, sources)``: the batcher's hits, best first, per query.
SearchFn = Callable[[list, int, "tuple[str, ...] | None"], Awaitable[list[list[Hit]]]]


class KnnService:
    """``POST /knn-service``: parse clip back's request, make its query vector (text,
    image bytes, fetched image or given vector), search through the batcher, filter
    and answer ``[{id, url, caption, similarity, key, source}]`` best first."""

    def __init__(self, db: ImageDB, config: ServeConfig, run_search: SearchFn) -> None:
        self.db, self.config, self.run_search = db, config, run_search

    async def answer(self, raw: bytes, result_url: Callable[[Hit], str]) -> JSONResponse:
        """The response to a request body ``raw``; ``result_url(hit)`` is a hit's URL."""
        try:
            return JSONResponse(await self._answer(raw, result_url))
        except RequestError as exc:
            return knn_error(exc)

    async def _answer(self, raw: bytes, result_url: Callable[[Hit], str]) -> list[dict]:
        body = self._parse(raw)
        modality = body.modality or "image"
        if modality == "text":
            raise RequestError(
                422,
                "unsupported: modality 'text' searches clip back's caption index and this "
                "server has image embeddings only; use modality 'image'",
            )
        if modality != "image":
            raise RequestError(422, f"invalid modality {modality!r}: expected 'image' or 'text'")
        sources = None
        if body.indice_name not in (None, "", "all"):
            if body.indice_name not in self.db.sources:
                raise RequestError(
                    422,
                    f"unknown indice_name {body.indice_name!r}; this server has "
                    f"{self.db.sources} (or 'all')",
                )
            sources = (body.indice_name,)
        query = await asyncio.to_thread(self._query, body)
        # clip back filters the top num_result_ids, then answers num_images of them
        fetch = max(body.num_images, min(body.num_result_ids or body.num_images, MAX_K))
        found = await self.run_search([query], fetch, sources)
        hits = found[0][:fetch]
        if body.deduplicate and hits:
            vectors = await asyncio.to_thread(stored_vectors, self.db, hits)
            keep = first_of_near_duplicates(vectors, self.config.near_duplicate_threshold)
            hits = [h for h, k in zip(hits, keep.tolist(), strict=True) if k]
        return [
            {
                "id": h.id,
                "url": result_url(h),
                "caption": h.caption,
                "similarity": h.score,
                "key": h.key,
                "source": h.source,
            }
            for h in hits[: body.num_images]
        ]

    def _parse(self, raw: bytes) -> KnnRequest:
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise RequestError(400, f"malformed JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise RequestError(422, "invalid body: expected a JSON object")
        try:
            return KnnRequest.model_validate(payload)
        except Exception as exc:
            errors = getattr(exc, "errors", lambda: [])()
            first = errors[0] if errors else {"loc": (), "msg": str(exc)}
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            raise RequestError(422, f"invalid {where}: {first.get('msg')}") from exc

    def _query(self, body: KnnRequest) -> str | list[float]:
        """The query (a text, or a vector for the batcher to check): clip back's order,
        text first, then image, image_url, embedding_input. Runs in a worker thread."""
        if body.text:
            return body.text
        if body.image:
            return embed_image(self.db, image_from_base64(body.image)).tolist()
        if body.image_url:
            if not self.config.allow_image_urls:
                raise RequestError(
                    403,
                    "forbidden: this server does not fetch image_url queries; start it with "
                    "`starkret serve --allow-image-urls` (or send the image's bytes in image)",
                )
            return embed_image(self.db, fetch_image(body.image_url)).tolist()
        if body.embedding_input is not None:
            return list(body.embedding_input)
        raise RequestError(422, "empty: give text, image, image_url or embedding_input")
