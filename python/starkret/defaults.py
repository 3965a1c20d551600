"""The default settings of alignment, search and the service, in one place.

The Python API (:class:`starkret.Aligner`), the command line (``starkret align``,
``starkret serve``, whose ``--help`` shows these values) and the service
(:class:`starkret.serve.schema.ServeConfig`) all read them from :data:`DEFAULTS`, so a
default changes here or nowhere. This module imports nothing from starkret.

>>> from starkret.defaults import DEFAULTS
>>> DEFAULTS.min_score, DEFAULTS.near_duplicate_threshold, DEFAULTS.k_per_source
(0.2, 0.94, 5)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULTS", "Defaults"]


@dataclass(frozen=True)
class Defaults:
    """Default values of the alignment and search settings (see :data:`DEFAULTS`)."""

    #: Candidates shown per source for a moment (Stark's "top 5 per source").
    k_per_source: int = 5
    #: A moment whose best usable candidate scores under this gets no image
    #: (``below_threshold``), so the planner can fall back to web search or generation.
    min_score: float = 0.2
    #: Cosine at or above which two images are near duplicates of each other.
    near_duplicate_threshold: float = 0.94
    #: Where an image may not be chosen twice: ``episode``, ``global`` or ``none``.
    reuse: str = "episode"
    #: A moment's first search asks for ``overfetch`` times the candidates it shows,
    #: so used images and near duplicates rarely leave it without one.
    overfetch: int = 4
    #: Most candidates per source one moment's search may grow to.
    max_fetch: int = 4096
    #: Moments aligned together (whole episodes): the memory of one chunk.
    chunk_moments: int = 2048
    #: Where searches run: ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "cpu"
    #: Images ``starkret dedup`` recorded as near duplicates: ``drop`` (left out of
    #: every search, alignment and evaluation) or ``keep``.
    duplicates: str = "drop"

    # ==== the service (``starkret serve``) ====

    #: Address and port the service listens on.
    host: str = "127.0.0.1"
    port: int = 8080
    #: Batcher threads searching in parallel.
    workers: int = 1
    #: Longest wait for more queries to fill a batch, in milliseconds.
    batch_wait_ms: float = 3.0
    #: Most queries searched together (1: one query per request, like clip back).
    max_batch: int = 256
    #: Seconds a client may take to send a request line and headers, counted from
    #: connecting or from the end of the previous response; then the connection closes.
    header_timeout_s: float = 10.0
    #: Seconds a client may take to send a request body once its headers arrived.
    body_timeout_s: float = 30.0
    #: Seconds a kept-alive connection may stay idle after a response.
    keep_alive_s: float = 5.0
    #: Most connections open at once (lowered to fit the process's open-file limit);
    #: at the limit a new connection closes the one waiting longest for a request.
    max_connections: int = 1024
    #: Conversations remembered at once, and idle seconds before one is forgotten.
    max_conversations: int = 10_000
    conversation_ttl_s: float = 3600.0
    #: Images one conversation remembers having shown (its oldest go first).
    max_shown_per_conversation: int = 1000
    #: Bytes all conversations' shown images may hold together (least recently used
    #: conversations go first).
    max_conversation_bytes: int = 256 << 20


#: The one defaults object.
DEFAULTS = Defaults()
