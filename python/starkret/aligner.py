"""The Plan-and-Execute Image Aligner's database step: one image per sharing moment.

For every moment (in episode order) the aligner retrieves candidates from every source
of an :class:`~starkret.db.ImageDB`, then picks the best one that is not reused (in the
episode, or anywhere in the run), not a near duplicate of an image already chosen in
the episode nor of a better candidate of the same moment, and scores at least
``min_score``. Otherwise the moment says why (``below_threshold``, ``exhausted``), so the
planner can fall back to web search or text-to-image. The greedy choice with its
near-duplicate checks runs in Rust over all moments at once.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import _core
from .db import Hit, ImageDB

__all__ = ["MAX_IMAGES_PER_MOMENT", "Aligner", "Alignment", "Candidate", "Moment"]

#: Most images one moment may ask for (``k``): a sharing turn shows a few images, and the
#: search behind a moment fetches ``k * overfetch`` candidates per source, so ``k`` is
#: bounded to keep one moment's memory small (``k = 10**9`` once asked for 32 GB).
MAX_IMAGES_PER_MOMENT = 32

_OUTCOMES = ("ok", "below_threshold", "exhausted")
#: Sources whose images Stark refers to by URL (`url:` keys).
URL_SOURCES = frozenset({"cc12m", "redcaps12m"})


@dataclass
class Moment:
    """One image-sharing moment: a description (or a query vector) in an episode."""

    episode_id: str
    moment_id: str
    description: str | None = None
    session: int = 0
    vector: np.ndarray | None = None
    k: int = 1  # images to share (multi-image turns)

    @classmethod
    def coerce(cls, item: Moment | Mapping, position: int) -> Moment:
        if isinstance(item, Moment):
            moment = item
        elif isinstance(item, Mapping):
            known = {
                f: item[f]
                for f in ("episode_id", "moment_id", "description", "session", "vector", "k")
                if f in item
            }
            missing = [f for f in ("episode_id", "moment_id") if f not in known]
            if missing:
                raise ValueError(f"moment {position} has no {', '.join(missing)}")
            moment = cls(**known)
        else:
            raise TypeError(f"moment {position} is {type(item).__name__}, expected a dict")
        if moment.description is None and moment.vector is None:
            raise ValueError(
                f"moment {position} ({moment.moment_id}) has neither a description nor a vector"
            )
        k = moment.k
        if not _is_integer(k) or not 1 <= k <= MAX_IMAGES_PER_MOMENT:
            raise ValueError(
                f"moment {position} ({moment.moment_id}): k must be an integer from 1 to "
                f"{MAX_IMAGES_PER_MOMENT} (MAX_IMAGES_PER_MOMENT), got {k!r}"[:200]
            )
        if moment.description is not None and not isinstance(moment.description, str):
            raise ValueError(
                f"moment {position} ({moment.moment_id}): description must be a str, "
                f"got {type(moment.description).__name__}"
            )
        if not _is_integer(moment.session):
            raise ValueError(
                f"moment {position} ({moment.moment_id}): session must be an int, "
                f"got {type(moment.session).__name__}"
            )
        return moment


@dataclass(frozen=True)
class Candidate:
    """A retrieved image with its CLIP score."""

    source: str
    key: str
    score: float
    url: str | None = None
    caption: str | None = None

    @property
    def stark_key(self) -> str:
        """The key as Stark's dialogues store it (`url:` + URL for CC12M/RedCaps12M)."""
        if self.source in URL_SOURCES and self.url:
            return f"url:{self.url}"
        return self.key

    def image_record(self) -> dict:
        """Stark's image record: ``{image_source, image_url, index}``."""
        return {"image_source": self.source, "image_url": self.url, "index": self.key}


@dataclass
class Alignment:
    """The outcome for one moment: chosen image(s) or the reason there is none."""

    moment_id: str
    episode_id: str
    session: int
    description: str | None
    status: str  # "ok" | "below_threshold" | "exhausted"
    images: list[Candidate] = field(default_factory=list)
    #: The top ``k_per_source`` candidates of every source, like Stark's db_searched_results.
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)
    module: str = "retrieval"

    @property
    def key(self) -> str | None:
        return self.images[0].key if self.images else None

    @property
    def source(self) -> str | None:
        return self.images[0].source if self.images else None

    @property
    def score(self) -> float | None:
        return self.images[0].score if self.images else None

    def to_dict(self) -> dict:
        return {
            "episode_id": self.episode_id,
            "session": self.session,
            "moment_id": self.moment_id,
            "description": self.description,
            "status": self.status,
            "module": self.module if self.images else None,
            "images": [
                {**c.image_record(), "key": c.stark_key, "score": c.score} for c in self.images
            ],
            "db_searched_results": {
                s: [{"key": c.stark_key, "score": round(c.score, 6)} for c in cands]
                for s, cands in self.candidates.items()
            },
        }


class Aligner:
    """Choose one image per moment from an ImageDB, without reuse or near duplicates.

    >>> aligner = Aligner(ImageDB.open("db"), k_per_source=5, min_score=0.2)  # doctest: +SKIP
    >>> aligner.align([{"episode_id": "e1", "moment_id": "e1-3",
    ...                 "description": "my dog Star asleep on the sofa"}])  # doctest: +SKIP
    [Alignment(moment_id='e1-3', ..., status='ok', images=[Candidate(source='cc12m', ...)])]
    """

    def __init__(
        self,
        db: ImageDB,
        *,
        k_per_source: int = 5,
        min_score: float = 0.2,
        near_duplicate_threshold: float = 0.94,
        reuse: str = "episode",
        overfetch: int = 4,
        max_fetch: int = 4096,
        chunk_moments: int = 2048,
        device: str = "cpu",
    ) -> None:
        if reuse not in ("episode", "global", "none"):
            raise ValueError(f"reuse must be 'episode', 'global' or 'none', got {reuse!r}")
        for name, value in (
            ("k_per_source", k_per_source),
            ("overfetch", overfetch),
            ("max_fetch", max_fetch),
            ("chunk_moments", chunk_moments),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not -1.0 <= near_duplicate_threshold <= 1.0:
            raise ValueError("near_duplicate_threshold is a cosine: between -1 and 1")
        self.db, self.k_per_source, self.min_score = db, k_per_source, float(min_score)
        self.threshold, self.reuse = float(near_duplicate_threshold), reuse
        self.overfetch, self.max_fetch, self.chunk_moments = overfetch, max_fetch, chunk_moments
        self.device = device  # passed to ImageDB.search: "cpu", "cuda", "cuda:N"
        self._source_ids = {name: i for i, name in enumerate(db.sources)}
        self._used_globally: set[int] = set()

    def align(self, moments: Iterable[Moment | Mapping]) -> list[Alignment]:
        """Alignments for ``moments``, returned in the order given.

        Moments are processed in episode order (episodes by first appearance, then
        session, then the order given), so "already used in the episode" means used by
        an earlier moment of that episode. With ``reuse="global"`` the constraint spans
        every call of this aligner.
        """
        items = [Moment.coerce(m, i) for i, m in enumerate(moments)]
        if not items:
            return []
        first_seen: dict[str, int] = {}
        for i, m in enumerate(items):
            first_seen.setdefault(m.episode_id, i)
        order = sorted(
            range(len(items)), key=lambda i: (first_seen[items[i].episode_id], items[i].session, i)
        )
        vectors = self._vectors(items)
        results: list[Alignment | None] = [None] * len(items)
        for chunk in _episode_chunks(order, items, self.chunk_moments):
            for i, alignment in zip(chunk, self._align_chunk(chunk, items, vectors), strict=True):
                results[i] = alignment
        return results  # type: ignore[return-value]

    # ==== internals ====

    def _vectors(self, items: list[Moment]) -> np.ndarray:
        out = np.zeros((len(items), self.db.dim), np.float32)
        texts = [i for i, m in enumerate(items) if m.vector is None]
        if texts:
            out[texts] = self.db.encode([items[i].description for i in texts])
        given = [i for i, m in enumerate(items) if m.vector is not None]
        if given:
            out[given] = self.db.encode(np.stack([np.asarray(items[i].vector) for i in given]))
        return out

    def _align_chunk(self, chunk: list[int], items: list[Moment], vectors: np.ndarray):
        base = max(self.k_per_source, 1) * self.overfetch
        fetch = [max(base, items[i].k * self.overfetch) for i in chunk]
        while True:
            hits = self._search(chunk, vectors, fetch)
            picked, counts, outcomes, flat = self._select(chunk, items, hits)
            retry = False
            for j in range(len(chunk)):
                starved = outcomes[j] == 2 and fetch[j] < self.max_fetch
                if starved and any(n >= fetch[j] for n in _per_source_counts(hits[j])):
                    fetch[j] = min(fetch[j] * 2, self.max_fetch)
                    retry = True
            if not retry:
                break
        used = [flat[p] for p in picked]
        if self.reuse == "global":
            self._used_globally.update(self._image_id(h) for h in used)
        out, start = [], 0
        for j, i in enumerate(chunk):
            m = items[i]
            chosen = [_candidate(h) for h in used[start : start + counts[j]]]
            start += counts[j]
            out.append(
                Alignment(
                    m.moment_id,
                    m.episode_id,
                    m.session,
                    m.description,
                    _OUTCOMES[outcomes[j]],
                    chosen,
                    self._per_source(hits[j]),
                )
            )
        return out

    def _search(self, chunk, vectors, fetch) -> list[list[Hit]]:
        # One batched search per distinct fetch size (usually just one).
        hits: list[list[Hit]] = [[] for _ in chunk]
        for size in sorted(set(fetch)):
            rows = [j for j, f in enumerate(fetch) if f == size]
            found = self.db.search(vectors[[chunk[j] for j in rows]], k=size, device=self.device)
            for j, h in zip(rows, found, strict=True):
                hits[j] = h
        return hits

    def _image_id(self, hit: Hit) -> int:
        return (self._source_ids[hit.source] << 40) | hit.row

    def _select(self, chunk, items, hits):
        flat = [h for per_moment in hits for h in per_moment]
        offsets = np.zeros(len(chunk) + 1, np.int64)
        offsets[1:] = np.cumsum([len(h) for h in hits])
        episodes = {}
        episode_ids = np.array(
            [episodes.setdefault(items[i].episode_id, len(episodes)) for i in chunk], np.uint64
        )
        ids = np.array([self._image_id(h) for h in flat], np.uint64)
        scores = np.array([h.score for h in flat], np.float32)
        vectors = self._candidate_vectors(flat)
        picked, counts, outcomes = _core.select_images(
            episode_ids,
            np.array([items[i].k for i in chunk], np.int64),
            offsets,
            ids,
            scores,
            vectors,
            reuse=self.reuse,
            threshold=self.threshold,
            min_score=self.min_score,
            used=np.array(sorted(self._used_globally), np.uint64),
        )
        return picked, counts, outcomes, flat

    def _candidate_vectors(self, flat: list[Hit]) -> np.ndarray:
        out = np.zeros((len(flat), self.db.dim), np.float32)
        by_source: dict[str, list[int]] = {}
        for n, h in enumerate(flat):
            by_source.setdefault(h.source, []).append(n)
        for source, positions in by_source.items():
            out[positions] = self.db.vectors(source, [flat[p].row for p in positions])
        return out

    def _per_source(self, hits: list[Hit]) -> dict[str, list[Candidate]]:
        out: dict[str, list[Candidate]] = {s: [] for s in self.db.sources}
        for h in hits:
            if len(out[h.source]) < self.k_per_source:
                out[h.source].append(_candidate(h))
        return out


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _candidate(hit: Hit) -> Candidate:
    return Candidate(hit.source, hit.key, hit.score, hit.url, hit.caption)


def _per_source_counts(hits: list[Hit]) -> list[int]:
    counts: dict[str, int] = {}
    for h in hits:
        counts[h.source] = counts.get(h.source, 0) + 1
    return list(counts.values())


def _episode_chunks(order: list[int], items: list[Moment], size: int):
    """Consecutive runs of ``order`` with whole episodes, about ``size`` moments each."""
    chunk: list[int] = []
    for n, i in enumerate(order):
        chunk.append(i)
        last = n + 1 == len(order)
        if last or (len(chunk) >= size and items[order[n + 1]].episode_id != items[i].episode_id):
            yield chunk
            chunk = []
