"""Conversations the service has shown images to, and its choice for their moments."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from starkret.index.db import Hit

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
