"""Conversations the service has shown images to.

The choice for a conversation's moments is the aligner's (:func:`starkret.align.choice.choose`),
the conversation being one episode whose earlier turns' images are already shown.

Their memory is bounded in bytes: every remembered image is counted (its record's
strings and numbers, its vector, the dictionary entries holding them) and, past
``max_bytes`` for all conversations together, the least recently used conversations are
forgotten whole. A forgotten (evicted, expired or reset) conversation starts fresh on its
next ``/align``: images shown before may be shown again.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from starkret.align.choice import Shown, image_ids
from starkret.defaults import DEFAULTS

#: Bytes a remembered image costs beyond its record's values and its vector: the record
#: dict, the (source, row) key tuple and the entries of the two dicts that hold it
#: (measured with tracemalloc, see tests/serve/test_hostile_clients.py).
IMAGE_OVERHEAD_BYTES = 640
#: Bytes of a conversation with nothing shown: its object, lock, dicts, id and entry.
CONVERSATION_OVERHEAD_BYTES = 650


def image_bytes(record: dict, vector: np.ndarray) -> int:
    """The bytes remembering one shown image costs (an estimate within a few percent)."""
    values = sum(sys.getsizeof(v) for v in record.values() if not isinstance(v, bool))
    return IMAGE_OVERHEAD_BYTES + values + vector.nbytes


# ==== Conversations ====


@dataclass
class _Conversation:
    shown: OrderedDict[tuple[str, int], dict] = field(default_factory=OrderedDict)
    vectors: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    moments: int = 0
    touched: float = field(default_factory=time.monotonic)
    #: What its shown images cost (``image_bytes``), and what each one costs.
    bytes: int = 0
    costs: dict[tuple[str, int], int] = field(default_factory=dict)
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
    """Per-conversation shown images: LRU-bounded in number and in bytes, expiring,
    resettable. The caller holds :attr:`lock` around every call."""

    def __init__(
        self,
        max_conversations: int,
        ttl_s: float,
        max_shown: int,
        clock=time.monotonic,
        max_bytes: int = DEFAULTS.max_conversation_bytes,
    ) -> None:
        self.max, self.ttl, self.max_shown = max_conversations, ttl_s, max_shown
        self.max_bytes = max_bytes
        self.clock = clock
        self._items: OrderedDict[str, _Conversation] = OrderedDict()
        self.lock = threading.Lock()
        self.evicted = 0
        self.expired = 0
        #: Bytes all conversations hold (their overhead and their shown images).
        self.bytes = 0

    def get(self, cid: str, create: bool = True) -> _Conversation | None:
        now = self.clock()
        self._expire(now)
        conv = self._items.get(cid)
        if conv is None:
            if not create:
                return None
            conv = self._items[cid] = _Conversation(touched=now)
            self.bytes += CONVERSATION_OVERHEAD_BYTES + sys.getsizeof(cid)
            while len(self._items) > self.max:
                self._evict_oldest()
        self._items.move_to_end(cid)
        conv.touched = now
        self._fit(conv)
        return conv

    def reset(self, cid: str) -> bool:
        conv = self._items.pop(cid, None)
        if conv is None:
            return False
        self._forget(cid, conv)
        return True

    def remember(self, conv: _Conversation, image: tuple[str, int], record: dict, vector) -> None:
        """Remembers that ``conv`` was shown ``image``; its oldest images, then the least
        recently used conversations, are forgotten past the limits."""
        vector = np.array(vector, np.float32)  # a copy: a view would keep its whole batch
        cost = image_bytes(record, vector)
        if image in conv.shown:
            self._drop_image(conv, image)
        conv.shown[image] = record
        conv.vectors[image] = vector
        conv.costs[image] = cost
        conv.bytes += cost
        self.bytes += cost
        while len(conv.shown) > self.max_shown:
            self._drop_image(conv, next(iter(conv.shown)))
        self._fit(conv)

    def _fit(self, keep: _Conversation) -> None:
        """Forgets the least recently used conversations but ``keep`` while over
        ``max_bytes``; then ``keep``'s oldest images if it alone is over."""
        while self.bytes > self.max_bytes and len(self._items) > 1:
            cid, oldest = next(iter(self._items.items()))
            if oldest is keep:
                self._items.move_to_end(cid)
            self._evict_oldest()
        while self.bytes > self.max_bytes and keep.shown:
            self._drop_image(keep, next(iter(keep.shown)))

    def _drop_image(self, conv: _Conversation, image: tuple[str, int]) -> None:
        conv.shown.pop(image, None)
        conv.vectors.pop(image, None)
        cost = conv.costs.pop(image, 0)
        conv.bytes -= cost
        self.bytes -= cost

    def _evict_oldest(self) -> None:
        cid, conv = self._items.popitem(last=False)
        self._forget(cid, conv)
        self.evicted += 1

    def _forget(self, cid: str, conv: _Conversation) -> None:
        self.bytes -= conv.bytes + CONVERSATION_OVERHEAD_BYTES + sys.getsizeof(cid)

    def _expire(self, now: float) -> None:
        while self._items:
            cid, conv = next(iter(self._items.items()))
            if now - conv.touched <= self.ttl:
                break
            del self._items[cid]
            self._forget(cid, conv)
            self.expired += 1

    def __len__(self) -> int:
        return len(self._items)
