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


#: The one defaults object.
DEFAULTS = Defaults()
