"""The Plan-and-Execute Image Aligner's database step: one image per sharing moment.

For every moment (in episode order) the aligner retrieves candidates from every source
of an :class:`~starkret.index.db.ImageDB`, then picks the best one that is not reused (in the
episode, or anywhere in the run), not a near duplicate of an image already chosen in
the episode nor of a better candidate of the same moment, and scores at least
``min_score``. Otherwise the moment says why (``below_threshold``, ``exhausted``), so the
planner can fall back to web search or text-to-image. The greedy choice with its
near-duplicate checks runs in Rust over all moments at once
(:func:`starkret.align.choice.choose`, which the service's ``/align`` calls too).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from starkret.align.choice import OUTCOMES, Candidates, Choice, Rule, choose
from starkret.align.stark import URL_SOURCES
from starkret.defaults import DEFAULTS
from starkret.errors import InvalidInputError, InvalidTypeError
from starkret.index.db import ImageDB

__all__ = ["MAX_IMAGES_PER_MOMENT", "Aligner", "Alignment", "Candidate", "Moment"]

#: Most images one moment may ask for (``k``): a sharing turn shows a few images, and the
#: search behind a moment fetches ``k * overfetch`` candidates per source, so ``k`` is
#: bounded to keep one moment's memory small (``k = 10**9`` once asked for 32 GB).
MAX_IMAGES_PER_MOMENT = 32


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
                raise InvalidInputError(f"moment {position} has no {', '.join(missing)}")
            moment = cls(**known)
        else:
            raise InvalidTypeError(f"moment {position} is {type(item).__name__}, expected a dict")
        if moment.description is None and moment.vector is None:
            raise InvalidInputError(
                f"moment {position} ({moment.moment_id}) has neither a description nor a vector"
            )
        k = moment.k
        if not _is_integer(k) or not 1 <= k <= MAX_IMAGES_PER_MOMENT:
            raise InvalidInputError(
                f"moment {position} ({moment.moment_id}): k must be an integer from 1 to "
                f"{MAX_IMAGES_PER_MOMENT} (MAX_IMAGES_PER_MOMENT), got {k!r}"[:200]
            )
        if moment.description is not None and not isinstance(moment.description, str):
            raise InvalidInputError(
                f"moment {position} ({moment.moment_id}): description must be a str, "
                f"got {type(moment.description).__name__}"
            )
        if not _is_integer(moment.session):
            raise InvalidInputError(
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
        k_per_source: int = DEFAULTS.k_per_source,
        min_score: float = DEFAULTS.min_score,
        near_duplicate_threshold: float = DEFAULTS.near_duplicate_threshold,
        reuse: str = DEFAULTS.reuse,
        overfetch: int = DEFAULTS.overfetch,
        max_fetch: int = DEFAULTS.max_fetch,
        chunk_moments: int = DEFAULTS.chunk_moments,
        device: str = DEFAULTS.device,
    ) -> None:
        if reuse not in ("episode", "global", "none"):
            raise InvalidInputError(f"reuse must be 'episode', 'global' or 'none', got {reuse!r}")
        for name, value in (
            ("k_per_source", k_per_source),
            ("overfetch", overfetch),
            ("max_fetch", max_fetch),
            ("chunk_moments", chunk_moments),
        ):
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
        if not -1.0 <= near_duplicate_threshold <= 1.0:
            raise InvalidInputError("near_duplicate_threshold is a cosine: between -1 and 1")
        self.db, self.k_per_source, self.min_score = db, k_per_source, float(min_score)
        self.threshold, self.reuse = float(near_duplicate_threshold), reuse
        self.overfetch, self.max_fetch, self.chunk_moments = overfetch, max_fetch, chunk_moments
        self.device = device  # passed to ImageDB.search_arrays: "cpu", "cuda", "cuda:N"
        self._used_globally = np.zeros(0, np.uint64)  # sorted image ids

    def align(self, moments: Iterable[Moment | Mapping]) -> list[Alignment]:
        """Alignments for ``moments``, returned in the order given.

        Moments are processed in episode order (episodes by first appearance, then
        session, then the order given), so "already used in the episode" means used by
        an earlier moment of that episode. With ``reuse="global"`` the constraint spans
        every call of this aligner. Work goes in chunks of about ``chunk_moments``
        whole episodes: queries are encoded, searched and chosen per chunk, with every
        candidate kept as arrays, so memory is that of one chunk plus the results.
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
        results: list[Alignment | None] = [None] * len(items)
        for chunk in _episode_chunks(order, items, self.chunk_moments):
            moments_of_chunk = [items[i] for i in chunk]
            for i, alignment in zip(chunk, self._align_chunk(moments_of_chunk), strict=True):
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

    def _align_chunk(self, moments: list[Moment]) -> list[Alignment]:
        vectors = self._vectors(moments)
        episodes: dict[str, int] = {}
        numbers = [episodes.setdefault(m.episode_id, len(episodes)) for m in moments]

        def search(group: np.ndarray, k: int):
            return self.db.search_arrays(vectors[group], k, device=self.device)

        choice = choose(
            self.db,
            np.array(numbers, np.uint64),
            np.array([m.k for m in moments], np.int64),
            search,
            rule=Rule(self.reuse, self.threshold, self.min_score),
            k_per_source=self.k_per_source,
            overfetch=self.overfetch,
            max_fetch=self.max_fetch,
            used=self._used_globally,
        )
        if self.reuse == "global" and len(choice.picked):
            picked_ids = choice.candidates.ids[choice.picked]
            self._used_globally = np.union1d(self._used_globally, picked_ids)
        return self._alignments(moments, choice)

    def _alignments(self, moments: list[Moment], choice: Choice) -> list[Alignment]:
        """Alignment objects; metadata is read only for the candidates they hold."""
        names = self.db.sources
        cands: Candidates = choice.candidates
        picked, counts, outcomes = choice.picked, choice.counts, choice.outcomes
        shown = cands.first_per_source(self.k_per_source, len(names))
        needed = shown.copy()
        needed[picked] = True
        made: dict[int, Candidate] = {}
        for s, name in enumerate(names):
            idx = np.flatnonzero(needed & (cands.sources == s))
            if len(idx) == 0:
                continue
            meta = self.db.metadata(name).take(cands.rows[idx], ("key", "url", "caption"))
            scores = cands.scores[idx].tolist()
            for n, i in enumerate(idx.tolist()):
                made[i] = Candidate(
                    name, meta["key"][n], scores[n], meta["url"][n], meta["caption"][n]
                )
        out = []
        start = 0
        for j, m in enumerate(moments):
            a, b = int(cands.offsets[j]), int(cands.offsets[j + 1])
            chosen = [made[int(i)] for i in picked[start : start + counts[j]]]
            start += int(counts[j])
            per_source: dict[str, list[Candidate]] = {name: [] for name in names}
            for i in np.flatnonzero(shown[a:b]).tolist():
                c = made[a + i]
                per_source[c.source].append(c)
            out.append(
                Alignment(
                    m.moment_id,
                    m.episode_id,
                    m.session,
                    m.description,
                    OUTCOMES[outcomes[j]],
                    chosen,
                    per_source,
                )
            )
        return out


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _episode_chunks(order: list[int], items: list[Moment], size: int):
    """Consecutive runs of ``order`` with whole episodes, about ``size`` moments each."""
    chunk: list[int] = []
    for n, i in enumerate(order):
        chunk.append(i)
        last = n + 1 == len(order)
        if last or (len(chunk) >= size and items[order[n + 1]].episode_id != items[i].episode_id):
            yield chunk
            chunk = []
