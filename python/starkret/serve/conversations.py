"""Conversations the service has shown images to.

The choice for a conversation's moments is the aligner's (:func:`starkret.align.choice.choose`),
the conversation being one episode whose earlier turns' images are already shown.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from starkret.align.choice import Shown, image_ids

# ==== Conversations ====


@dataclass
class _Conversation:
    shown: OrderedDict[tuple[str, int], dict] = field(default_factory=OrderedDict)
    vectors: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    moments: int = 0
    touched: float = field(default_factory=time.monotonic)
    #: Held by the one /align request of this conversation that is choosing: turns are
    #: chosen one after the other, each seeing the images the one before showed.
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    def shown_images(self, sources: list[str], dim: int) -> tuple[Shown, dict[str, np.ndarray]]:
        """The images shown so far, for the choice (episode 0), and their rows per source."""
        number = {name: i for i, name in enumerate(sources)}
        images = [image for image in self.shown if image[0] in number]
        source = np.array([number[s] for s, _ in images], np.int64)
        rows = np.array([r for _, r in images], np.int64)
        vectors = np.zeros((len(images), dim), np.float32)
        for i, image in enumerate(images):
            vectors[i] = self.vectors[image]
        shown = Shown(np.zeros(len(images), np.uint64), image_ids(source, rows), vectors)
        per_source = {name: rows[source == i] for name, i in number.items() if (source == i).any()}
        return shown, per_source


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
