"""Exact top-k on a torch device (a GPU, or the CPU for tests): the recall-1.0 path.

Same contract as :func:`starkret.topk`: float32 scores in descending order, ties to the
lower row, padding ``(-inf, -1)`` where fewer than ``k`` rows are eligible, and row ids
global to the list of parts (part 0's rows first). Only the arithmetic differs: scores
come from a matrix product, so they may differ from the Rust scan's by float32 rounding
(a few ulps), never by float16 rounding.

How it works:

* **Scores.** Rows stay float16 (exact products with a float16 operand). On CUDA each
  float32 query is split into two float16 halves, ``hi = fp16(q)`` and
  ``lo = fp16((q - hi) * 2**12)``, and one float16 matrix product with float32
  accumulation *and float32 output* (``torch.mm(..., out_dtype=float32)``) scores both
  halves; ``hi + lo / 2**12`` carries ~22 bits of the query, so scores match a float32
  scan to ~1e-6. Without ``out_dtype`` (older torch) the tile is widened and multiplied
  in float32 with TF32 off. On the CPU the product is float32.
* **Tiles.** The query batch is cut in chunks and the rows in tiles sized from the
  device's free memory (``torch.cuda.mem_get_info``). Parts that fit in
  :data:`RESIDENT_FRACTION` of free memory are uploaded once and kept (the searcher is
  reusable); otherwise tiles stream from the memory maps through two pinned buffers.
* **Exclusions**: shared rows (``Exclusions.shared``, sorted) are uploaded once per
  shared set and kept (a DB's recorded near duplicates are the same set every batch);
  each tile sets its slice of them to ``-inf`` for all queries at once. Per-query ones
  are (query, row) pairs sorted by row (``Exclusions.pairs``), uploaded once per
  search; each tile sets its pairs to ``-inf`` with one indexed write on the device.
* **Exact merge.** Each tile's top-k comes from ``torch.topk`` on the scores; a query
  whose k-th score is tied with an unselected entry of the tile is redone with a
  composite int64 key (ordered float bits, then the complement of the row), so ties go
  to the lower row as in the Rust scan. Running results merge with the same key.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from starkret.errors import InvalidInputError
from starkret.index.topk import Exclude, Exclusions

__all__ = ["RESIDENT_FRACTION", "DeviceSearcher", "device_search"]

#: Parts are kept on the device when they take at most this fraction of its free memory.
RESIDENT_FRACTION = 0.6
#: Fraction of the (remaining) free memory one tile's scores and top-k may use.
WORK_FRACTION = 0.35
#: Bytes of working memory per (query, row) pair of a tile: float32 scores, the float32
#: copy topk and the tie test make, and slack.
_BYTES_PER_PAIR = 16
_LO_SCALE = 4096.0  # 2**12: keeps the low half of the query out of float16 subnormals
_LOW32 = 0xFFFFFFFF


class DeviceSearcher:
    """Exact search of a list of float16 (or float32) parts on one torch device.

    Keep one per (parts, device): parts that fit on the device are uploaded on the
    first search and reused by later ones.

    >>> import numpy as np
    >>> parts = [np.eye(3, dtype=np.float16), np.eye(3, dtype=np.float16)[:1]]
    >>> s = DeviceSearcher(parts, device="cpu")
    >>> s.search(np.array([[1.0, 0, 0]], np.float32), 2)[1].tolist()
    [[0, 3]]
    """

    def __init__(
        self,
        parts: Sequence[np.ndarray],
        *,
        device: str = "cuda",
        query_chunk: int | None = None,
        tile_rows: int | None = None,
        resident: bool | None = None,
    ) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.parts = list(parts)
        if not self.parts:
            raise ValueError("no parts to search")
        dims = {int(p.shape[1]) for p in self.parts}
        if len(dims) != 1:
            raise InvalidInputError(f"parts have different dimensions: {sorted(dims)}")
        self.dim = dims.pop()
        sizes = [int(p.shape[0]) for p in self.parts]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.count = int(self.offsets[-1])
        if self.count >= 1 << 32:
            raise InvalidInputError(f"{self.count} rows: device search handles < 2**32 rows")
        self.cuda = self.device.type == "cuda"
        self._query_chunk, self._tile_rows = query_chunk, tile_rows
        self._resident_wanted = resident
        self._resident: list | None = None
        if self.parts and not isinstance(self.parts[0], np.ndarray):
            # torch tensors (already on the device, e.g. generated there): search in place
            self._resident = [p.to(self.device, torch.float16) for p in self.parts]
        self._pinned: list | None = None
        #: The last shared exclusion set seen and its rows on the device.
        self._shared: tuple[np.ndarray, object] | None = None
        self._mm_out_dtype = self.cuda  # cleared if this torch has no mm(out_dtype=)

    # ==== memory plan ====

    def _free_bytes(self) -> int:
        if self.cuda:
            free, _ = self.torch.cuda.mem_get_info(self.device)
            return int(free)
        return 2 << 30  # CPU: plan as if 2 GiB were free

    def _ensure_resident(self) -> None:
        if self._resident is not None:
            return
        nbytes = sum(int(p.shape[0]) * self.dim * 2 for p in self.parts)
        keep = self._resident_wanted
        if keep is None:
            keep = self.cuda and nbytes <= RESIDENT_FRACTION * self._free_bytes()
        self._resident = [self._upload(p) for p in self.parts] if keep else []

    def _upload(self, array: np.ndarray):
        t = self.torch.from_numpy(np.array(array, dtype=np.float16))
        return t.to(self.device)

    def _plan(self, n_queries: int) -> tuple[int, int]:
        work = WORK_FRACTION * self._free_bytes()
        chunk = self._query_chunk or max(1, min(n_queries, 8192 if self.cuda else 1024))
        if self._tile_rows:
            return chunk, self._tile_rows
        per_row = chunk * _BYTES_PER_PAIR * (2 if self.cuda else 1) + self.dim * 2 * 3
        tile = int(work // per_row)
        tile = max(1024, min(tile, 1 << 22, max(self.count, 1)))
        return chunk, tile

    # ==== tiles ====

    def _tiles(self, tile_rows: int):
        """(first global row, float16 device tensor) for every tile of every part."""
        torch = self.torch
        if self._resident:
            for p, t in enumerate(self._resident):
                for start in range(0, t.shape[0], tile_rows):
                    yield int(self.offsets[p]) + start, t[start : start + tile_rows]
            return
        if not self.cuda:
            for p, array in enumerate(self.parts):
                for start in range(0, array.shape[0], tile_rows):
                    block = np.array(array[start : start + tile_rows], dtype=np.float16)
                    yield int(self.offsets[p]) + start, torch.from_numpy(block)
            return
        # CUDA streaming: two pinned buffers, so copying tile i+1 from the memory map
        # overlaps the device's work on tile i.
        if self._pinned is None or self._pinned[0].shape[0] < tile_rows:
            self._pinned = [
                torch.empty((tile_rows, self.dim), dtype=torch.float16).pin_memory()
                for _ in range(2)
            ]
        events = [None, None]
        for i, (first, p, start, stop) in enumerate(self._tile_spans(tile_rows)):
            slot = i % 2
            if events[slot] is not None:
                events[slot].synchronize()  # the copy that used this buffer is done
            buf = self._pinned[slot][: stop - start]
            buf.numpy()[:] = self.parts[p][start:stop]
            tile = buf.to(self.device, non_blocking=True)
            events[slot] = torch.cuda.Event()
            events[slot].record()
            yield first, tile

    def _tile_spans(self, tile_rows: int):
        for p, array in enumerate(self.parts):
            for start in range(0, array.shape[0], tile_rows):
                stop = min(start + tile_rows, array.shape[0])
                yield int(self.offsets[p]) + start, p, start, stop

    # ==== scoring ====

    def _query_operand(self, q32):
        """What multiplies the tiles: float32 queries (CPU), or stacked float16 halves."""
        if not self.cuda:
            return q32
        if not self._mm_out_dtype:
            return q32
        return split_halves(self.torch, q32)

    def _scores(self, qop, n: int, tile):
        torch = self.torch
        if not self.cuda:
            return qop @ tile.float().T
        if self._mm_out_dtype:
            try:
                both = torch.mm(qop, tile.T, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                self._mm_out_dtype = False
                raise _RetryInFloat32() from None
            return torch.add(both[:n], both[n:], alpha=1.0 / _LO_SCALE)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return qop @ tile.float().T
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous

    # ==== search ====

    def search(
        self, queries: np.ndarray, k: int, *, exclude: Exclusions | Exclude = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, rows)`` per query, as :func:`starkret.topk` returns them.

        ``exclude``: global rows never returned, an :class:`~starkret.index.topk.Exclusions`
        or any form :func:`starkret.topk` takes.
        """
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InvalidInputError(f"queries must have shape (n, {self.dim}), got {q.shape}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be a positive int, got {k!r}")
        k = int(k)
        n = q.shape[0]
        out_s = np.full((n, k), -np.inf, np.float32)
        out_r = np.full((n, k), -1, np.int64)
        if n == 0 or self.count == 0:
            return out_s, out_r
        exclusions = Exclusions.parse(exclude, n)
        pairs = exclusions.pairs(n, shared=False) if exclusions is not None else None
        shared = self._shared_rows(exclusions)
        self._ensure_resident()
        chunk, tile_rows = self._plan(n)
        with self.torch.inference_mode():
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                while True:
                    try:
                        s, r = self._search_chunk(
                            q[start:stop], k, (shared, pairs), start, tile_rows
                        )
                        break
                    except _RetryInFloat32:
                        continue
                out_s[start:stop], out_r[start:stop] = s, r
        return out_s, out_r

    def _shared_rows(self, exclusions: Exclusions | None):
        """The shared excluded rows on the device (None: none), uploaded once per set."""
        if exclusions is None or exclusions.shared is None or not len(exclusions.shared):
            return None
        rows = exclusions.shared  # sorted, read-only: the same set is the same array
        if self._shared is None or self._shared[0] is not rows:
            self._shared = (rows, self.torch.from_numpy(np.array(rows)).to(self.device))
        return self._shared[1]

    def _search_chunk(self, q: np.ndarray, k: int, exclude, first_query: int, tile_rows: int):
        torch = self.torch
        n = q.shape[0]
        q32 = torch.from_numpy(q).to(self.device)
        qop = self._query_operand(q32)
        shared, pairs = exclude
        ex_q, ex_r = _chunk_pairs(torch, pairs, first_query, n, self.device)
        best = torch.full((n, 0), 0, dtype=torch.int64, device=self.device)
        for first, tile in self._tiles(tile_rows):
            scores = self._scores(qop, n, tile)
            if shared is not None:  # one column mask for every query
                lo = int(torch.searchsorted(shared, first))
                hi = int(torch.searchsorted(shared, first + tile.shape[0]))
                if hi > lo:
                    scores[:, shared[lo:hi] - first] = -float("inf")
            if ex_r is not None:
                lo = int(torch.searchsorted(ex_r, first))
                hi = int(torch.searchsorted(ex_r, first + tile.shape[0]))
                if hi > lo:
                    scores[ex_q[lo:hi], ex_r[lo:hi] - first] = -float("inf")
            keys = _tile_top_keys(torch, scores, k, first)
            best = _top_keys(torch, torch.cat([best, keys], dim=1), k)
        return _decode(torch, best, k)


class _RetryInFloat32(Exception):
    """This torch cannot multiply float16 into float32 output: rescore in float32."""


def split_halves(torch, q32):
    """float32 queries -> ``[hi; lo]`` float16 rows with ``q ~= hi + lo / 2**12`` (~22 bits).

    Multiplying both halves by float16 rows with float32 accumulation gives float32
    scores at the cost of two float16 products (still far faster than float32 ones).
    """
    hi = q32.half()
    lo = ((q32 - hi.float()) * _LO_SCALE).half()
    return torch.cat([hi, lo], dim=0)


def device_search(
    queries: np.ndarray,
    parts: Sequence[np.ndarray] | np.ndarray,
    k: int,
    *,
    exclude: Exclusions | Exclude = None,
    device: str = "cuda",
    **options,
) -> tuple[np.ndarray, np.ndarray]:
    """One-off exact top-k on ``device`` (``"cuda"``, ``"cuda:1"`` or ``"cpu"``).

    ``parts``: one ``(n, d)`` float16 array or a list of them (memory maps are read
    in place). For repeated searches keep a :class:`DeviceSearcher`.

    >>> import numpy as np
    >>> db = np.array([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=np.float16)
    >>> device_search(np.array([[1.0, 0.0]]), db, 3, device="cpu")[1].tolist()
    [[0, 2, 3]]
    """
    if isinstance(parts, np.ndarray):
        parts = [parts]
    return DeviceSearcher(parts, device=device, **options).search(queries, k, exclude=exclude)


# ==== keys: float32 score and row in one int64, larger = better ====


def _ordered_bits(torch, scores):
    """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    bits = scores.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _keys(torch, scores, rows):
    """int64 keys ordered by score, then by lower row: ``ordered(score) << 32 | ~row``."""
    return (_ordered_bits(torch, scores).to(torch.int64) << 32) | (_LOW32 - rows)


def _decode(torch, keys, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = keys.shape[0]
    scores = np.full((n, k), -np.inf, np.float32)
    rows = np.full((n, k), -1, np.int64)
    if keys.shape[1]:
        ordered = (keys >> 32).to(torch.int32)
        bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
        s = bits.view(torch.float32).cpu().numpy()
        r = (_LOW32 - (keys & _LOW32)).cpu().numpy()
        m = keys.shape[1]
        scores[:, :m] = s
        rows[:, :m] = np.where(np.isneginf(s), -1, r)
        scores[:, :m][rows[:, :m] < 0] = -np.inf
    return scores, rows


def _top_keys(torch, keys, k: int):
    if keys.shape[1] <= k:
        return torch.sort(keys, dim=1, descending=True).values
    return torch.topk(keys, k, dim=1, sorted=True).values


def _tile_top_keys(torch, scores, k: int, first: int):
    """Keys of a tile's top-k entries per query, ties at the k-th score to the lower row."""
    _n, t = scores.shape
    m = min(k, t)
    top = torch.topk(scores, m, dim=1, sorted=False)
    rows = top.indices.to(torch.int64) + first
    keys = _keys(torch, top.values, rows)
    if m == t:
        return keys
    # The selection is exact unless the k-th score also occurs outside it (a tie that
    # topk may have broken towards a higher row): redo those queries with full keys.
    kth = top.values.min(dim=1, keepdim=True).values
    selected = (top.values == kth).sum(dim=1)
    present = (scores == kth).sum(dim=1)
    tied = torch.nonzero(present > selected).flatten()
    if tied.numel():
        sub = scores[tied]
        all_rows = torch.arange(first, first + t, device=scores.device, dtype=torch.int64)
        full = _keys(torch, sub, all_rows.expand(sub.shape[0], t))
        keys[tied] = torch.topk(full, m, dim=1, sorted=False).values
    return keys


# ==== exclusions ====


def _chunk_pairs(torch, pairs, first_query: int, n: int, device):
    if pairs is None:
        return None, None
    qs, rows = pairs
    mine = (qs >= first_query) & (qs < first_query + n)
    if not mine.any():
        return None, None
    return (
        torch.from_numpy(qs[mine] - first_query).to(device),
        torch.from_numpy(rows[mine]).to(device),
    )
