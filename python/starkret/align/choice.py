"""The alignment rule, driven: fetch candidates, choose in Rust, fetch more where needed.

One implementation serves every caller (:class:`~starkret.align.aligner.Aligner`, the
service's ``/align``): :func:`choose` searches ``overfetch`` times the candidates a
moment shows, runs the one greedy choice (``starkret._core.select_images``, spec
:func:`starkret.testing.reference_select`) over all moments at once, and searches again,
with twice as many candidates, only for the moments whose candidates ran out while a
source may hold more. Candidates stay arrays throughout; vectors are read only for the
prefix of each list the choice looks at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

import starkret._core as _core
from starkret.index.db import ImageDB, Results

__all__ = [
    "IMAGE_ID_SOURCE_SHIFT",
    "OUTCOMES",
    "Candidates",
    "Choice",
    "Rule",
    "Shown",
    "choose",
    "image_ids",
]

#: What a moment's outcome number means (``_core.select_images``' third result).
OUTCOMES = ("ok", "below_threshold", "exhausted")
_EXHAUSTED = 2
#: Candidates per moment whose vectors the choice reads first (more only if it needs them).
SELECT_PREFIX = 8
#: An image's id in the choice: its source's number shifted by this, or'd with its row.
IMAGE_ID_SOURCE_SHIFT = 40

#: ``search(moments, k) -> Results``: the top ``k`` of every source for the queries of
#: ``moments`` (indices into the moments :func:`choose` was given), in that order.
SearchFn = Callable[[np.ndarray, int], Results]


def image_ids(sources: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One uint64 id per image: ``(source number << IMAGE_ID_SOURCE_SHIFT) | row``."""
    return (np.asarray(sources).astype(np.uint64) << np.uint64(IMAGE_ID_SOURCE_SHIFT)) | (
        np.asarray(rows).astype(np.uint64)
    )


@dataclass(frozen=True)
class Rule:
    """The choice's settings: ``reuse`` policy, near-duplicate cosine, least score."""

    reuse: str
    threshold: float
    min_score: float


@dataclass(frozen=True)
class Shown:
    """Images episodes have already shown (a conversation's earlier turns): image ``i``
    (id from :func:`image_ids`, unit vector ``vectors[i]``) in episode ``episodes[i]``."""

    episodes: np.ndarray  # uint64
    ids: np.ndarray  # uint64
    vectors: np.ndarray  # float32 (n, dim)

    def core_options(self) -> dict[str, np.ndarray]:
        return {
            "shown_episodes": np.ascontiguousarray(self.episodes, np.uint64),
            "shown_ids": np.ascontiguousarray(self.ids, np.uint64),
            "shown_vectors": np.ascontiguousarray(self.vectors, np.float32),
        }


@dataclass
class Candidates:
    """Every moment's candidates, flat: moment ``j`` owns ``offsets[j]:offsets[j + 1]``,
    best first (all sources ranked together)."""

    offsets: np.ndarray
    sources: np.ndarray  # source numbers (ImageDB.sources)
    rows: np.ndarray
    scores: np.ndarray
    ids: np.ndarray  # image_ids(sources, rows)

    @classmethod
    def stack(cls, found: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Candidates:
        """From one ``(sources, rows, scores)`` triple per moment."""
        offsets = np.zeros(len(found) + 1, np.int64)
        offsets[1:] = np.cumsum([len(f[1]) for f in found])
        sources = np.concatenate([np.zeros(0, np.int64), *(f[0] for f in found)]).astype(np.int64)
        rows = np.concatenate([np.zeros(0, np.int64), *(f[1] for f in found)]).astype(np.int64)
        scores = np.concatenate([np.zeros(0, np.float32), *(f[2] for f in found)])
        scores = np.ascontiguousarray(scores, np.float32)
        return cls(offsets, sources, rows, scores, image_ids(sources, rows))

    def moment_of(self) -> np.ndarray:
        """The moment each candidate belongs to."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))

    def first_per_source(self, k: int, n_sources: int) -> np.ndarray:
        """Where a candidate is among the first ``k`` of its source for its moment (each
        source's top ``k``, like Stark's ``db_searched_results``)."""
        group = self.moment_of() * max(n_sources, 1) + self.sources
        order = np.argsort(group, kind="stable")
        first = np.searchsorted(group[order], group[order], side="left")
        rank = np.empty(len(group), np.int64)
        rank[order] = np.arange(len(group)) - first
        return rank < k


@dataclass
class Choice:
    """What :func:`choose` chose: ``picked`` indexes the flat candidates (moment by
    moment, best first), ``counts[j]`` of them belong to moment ``j``, whose outcome
    is ``OUTCOMES[outcomes[j]]``; ``picked_vectors`` are the picked images' vectors."""

    candidates: Candidates
    picked: np.ndarray
    counts: np.ndarray
    outcomes: list[int]
    picked_vectors: np.ndarray

    def status(self, j: int) -> str:
        return OUTCOMES[self.outcomes[j]]


def choose(
    db: ImageDB,
    episodes: np.ndarray,
    ks: np.ndarray,
    search: SearchFn,
    *,
    rule: Rule,
    k_per_source: int,
    overfetch: int,
    max_fetch: int,
    used: np.ndarray | None = None,
    shown: Shown | None = None,
) -> Choice:
    """The alignment of moments (``episodes[j]``, wanting ``ks[j]`` images), in order.

    Moments of one episode must be adjacent. ``used``: image ids no moment may take
    with ``reuse="global"``; ``shown``: images episodes have shown already. The result
    equals the choice over every candidate of every source.
    """
    episodes = np.ascontiguousarray(episodes, np.uint64)
    ks = np.ascontiguousarray(ks, np.int64)
    n_sources = len(db.sources)
    base = max(k_per_source, 1) * overfetch
    fetch = np.maximum(base, ks * overfetch).astype(np.int64)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = [None] * len(ks)  # type: ignore[list-item]
    pending = np.arange(len(ks))
    while True:
        for size in np.unique(fetch[pending]).tolist():
            group = pending[fetch[pending] == size]
            res = search(group, int(size))
            valid = res.valid()
            for row, j in enumerate(group.tolist()):
                keep = valid[row]
                found[j] = (res.sources[row, keep], res.rows[row, keep], res.scores[row, keep])
        cands = Candidates.stack(found)
        choice = _select(db, episodes, ks, cands, rule, used, shown)
        starved = [
            j
            for j, outcome in enumerate(choice.outcomes)
            if outcome == _EXHAUSTED
            and fetch[j] < max_fetch
            and np.bincount(found[j][0], minlength=n_sources).max(initial=0) >= fetch[j]
        ]
        if not starved:
            return choice
        pending = np.asarray(starved)
        fetch[pending] = np.minimum(fetch[pending] * 2, max_fetch)


def _select(db, episodes, ks, cands: Candidates, rule: Rule, used, shown) -> Choice:
    """The Rust choice, reading candidate vectors only as needed.

    The greedy choice of a moment looks at its candidates in order and stops once it
    has its images or meets a score under ``min_score``; it never looks further. So it
    first runs on a short prefix of every list (vectors read for those rows only), and
    again with longer prefixes only for the moments whose prefix ran out: the result
    is the one over the full lists.
    """
    sizes = np.diff(cands.offsets)
    limit = np.minimum(sizes, np.maximum(SELECT_PREFIX, 2 * ks))
    # vectors read so far, compact: slot[i] is candidate i's row in `store` (-1: unread)
    store = np.zeros((0, db.dim), np.float32)
    slot = np.full(len(cands.rows), -1, np.int64)
    options: dict[str, object] = {}
    if used is not None:
        options["used"] = np.ascontiguousarray(used, np.uint64)
    if shown is not None and len(shown.ids):
        options.update(shown.core_options())
    while True:
        # flat indices of every moment's prefix, in moment order
        starts = np.repeat(cands.offsets[:-1], limit)
        within = np.arange(int(limit.sum())) - np.repeat(np.cumsum(limit) - limit, limit)
        idx = starts + within
        new = idx[slot[idx] < 0]
        slot[new] = len(store) + np.arange(len(new))
        store = np.concatenate([store, _read_vectors(db, cands, new)])
        offsets = np.zeros(len(ks) + 1, np.int64)
        offsets[1:] = np.cumsum(limit)
        picked, counts, outcomes = _core.select_images(
            episodes,
            ks,
            offsets,
            cands.ids[idx],
            cands.scores[idx],
            store[slot[idx]],
            reuse=rule.reuse,
            threshold=rule.threshold,
            min_score=rule.min_score,
            **options,
        )
        cut = [j for j, o in enumerate(outcomes) if o == _EXHAUSTED and limit[j] < sizes[j]]
        if not cut:
            chosen = idx[np.asarray(picked, np.int64)]
            return Choice(
                cands, chosen, np.asarray(counts, np.int64), outcomes, store[slot[chosen]]
            )
        limit[cut] = np.minimum(limit[cut] * 4, sizes[cut])


def _read_vectors(db: ImageDB, cands: Candidates, idx: np.ndarray) -> np.ndarray:
    """Vectors (float32) of candidates ``idx``, in that order."""
    out = np.empty((len(idx), db.dim), np.float32)
    for s, name in enumerate(db.sources):
        mine = np.flatnonzero(cands.sources[idx] == s)
        if len(mine):
            out[mine] = db.vectors(name, cands.rows[idx[mine]])
    return out
