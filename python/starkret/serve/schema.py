"""The service's limits, settings and request/response bodies (its OpenAPI schema)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from starkret.defaults import DEFAULTS
from starkret.errors import RequestError as RequestError  # its old home: re-exported

MAX_K = 100
#: Most candidates per source one /align moment's search may grow to.
MAX_FETCH = 4 * MAX_K
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

    device: str = DEFAULTS.device
    workers: int = DEFAULTS.workers  # batcher threads searching in parallel
    batch_wait_ms: float = DEFAULTS.batch_wait_ms
    max_batch: int = DEFAULTS.max_batch
    min_score: float = DEFAULTS.min_score
    near_duplicate_threshold: float = DEFAULTS.near_duplicate_threshold
    k_per_source: int = DEFAULTS.k_per_source
    overfetch: int = DEFAULTS.overfetch
    max_conversations: int = DEFAULTS.max_conversations
    conversation_ttl_s: float = DEFAULTS.conversation_ttl_s
    max_shown_per_conversation: int = DEFAULTS.max_shown_per_conversation
    #: Bytes all conversations' shown images may hold together (see ``GET /stats``).
    max_conversation_bytes: int = DEFAULTS.max_conversation_bytes
    #: /knn-service may fetch ``image_url`` queries (any http(s) URL the server can reach).
    allow_image_urls: bool = False
    threads: int | None = None
    header_timeout_s: float = DEFAULTS.header_timeout_s
    body_timeout_s: float = DEFAULTS.body_timeout_s
    keep_alive_s: float = DEFAULTS.keep_alive_s
    max_connections: int = DEFAULTS.max_connections
    #: Clients must send ``Authorization: Bearer <api_key>`` (None: no key needed).
    api_key: str | None = field(default=None, repr=False)
    #: The base of the absolute URLs in answers (``/knn-service``'s ``url``); None:
    #: ``http://{DEFAULTS.host}:{DEFAULTS.port}`` (``serve`` derives it from its host and
    #: port). Never taken from a request's Host header.
    public_url: str | None = None
    #: Near duplicates recorded by ``starkret dedup``: ``drop`` (never answered) or ``keep``.
    duplicates: str = DEFAULTS.duplicates


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one line of at most ``limit`` characters: every error the service
    answers with (the ``detail`` or ``message`` of a 4xx) goes through it."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


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
    k: int = Field(
        DEFAULTS.k_per_source, ge=1, le=MAX_K, description=f"hits per source (1 to {MAX_K})"
    )
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
    """clip back's /knn-service request: the fields this server uses. The others clip
    back's clients send (use_safety_model, use_violence_detector, aesthetic_score,
    aesthetic_weight, use_mclip) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    text: Text | None = None
    image: str | None = None  # the image file's bytes, base64
    image_url: Annotated[str, StringConstraints(max_length=MAX_TEXT)] | None = None
    embedding_input: Vector | None = None
    modality: str | None = "image"
    num_images: int = Field(40, ge=1, le=MAX_K)
    #: Results fetched before ``deduplicate`` filters them (clamped to [num_images, MAX_K]).
    num_result_ids: int | None = Field(None, ge=1)
    indice_name: SourceName | None = None
    deduplicate: bool = False
