"""Key -> row lookups for one source through sorted 64-bit hashes on disk.

``build-index`` hashes every image key (``cc12m/000012345``) and, for rows with a URL,
Stark's ``url:`` key (``url:https://...``) with a stable hash (``rust/keyindex.rs``),
sorts the hashes and stores them with the row each came from in
``index/key_hashes.npy`` and ``index/key_rows.npy``. A lookup memory-maps both,
binary-searches the hashes with numpy (about 25 page reads at 24M entries) and checks
the real key of every candidate row, so a hash collision costs one comparison and never
returns a wrong row. Nothing is held per row: opening costs two ``np.load`` headers.

A source built by an older version has no such files: the same arrays are then built in
memory on the first lookup (a pass over the metadata), with a warning to run
``build-index``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import starkret._core as _core
from starkret._io import atomic_write
from starkret.store.metadata import Metadata, warn_unindexed

__all__ = [
    "HASHES_FILE",
    "ROWS_FILE",
    "URL_PREFIX",
    "KeyIndex",
    "extend_key_index",
    "write_key_index",
]

HASHES_FILE = Path("index") / "key_hashes.npy"
ROWS_FILE = Path("index") / "key_rows.npy"
#: Stark refers to CC12M / RedCaps12M images by ``url:`` + their URL.
URL_PREFIX = "url:"


class KeyIndex:
    """Rows of image keys (DB keys or ``url:`` keys) in one source.

    >>> index = KeyIndex.open("db/cc12m", metadata, infos)  # doctest: +SKIP
    >>> index.lookup(["cc12m/000000012", "url:https://x/1.jpg", "nope"]).tolist()  # doctest: +SKIP
    [12, 40, -1]
    """

    def __init__(self, metadata: Metadata, hashes: np.ndarray | None, rows: np.ndarray | None):
        self.metadata = metadata
        self._hashes, self._rows = hashes, rows

    @classmethod
    def open(cls, source_dir: str | os.PathLike, metadata: Metadata, infos: dict) -> KeyIndex:
        """The on-disk index of ``source_dir`` if ``build-index`` wrote one for its rows."""
        source_dir = Path(source_dir)
        if infos.get("key_index_rows") == metadata.count:
            try:
                hashes = np.load(source_dir / HASHES_FILE, mmap_mode="r")
                rows = np.load(source_dir / ROWS_FILE, mmap_mode="r")
            except (FileNotFoundError, ValueError):
                hashes = rows = None
            if hashes is not None and hashes.shape == rows.shape and hashes.dtype == np.uint64:
                return cls(metadata, hashes, rows)
        return cls(metadata, None, None)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._hashes is None:
            warn_unindexed(
                self.metadata.source_dir,
                self.metadata.count,
                "its key index is built in memory on first use",
            )
            self._hashes, self._rows = build_key_arrays(self.metadata)
        return self._hashes, self._rows  # type: ignore[return-value]

    def lookup(self, keys: Sequence[str], *, every: bool = False):
        """Row of each key (-1 where absent), or with ``every`` all its rows.

        A DB key wins over a ``url:`` key of the same text, and the first row over later
        ones, like a dict built in row order. ``every=True`` returns
        ``(key positions, rows)``: one pair per matching row (used for exclusions).
        """
        keys = list(keys)
        hashes, rows = self._arrays()
        wanted = _core.key_hashes(keys)
        lo = np.searchsorted(hashes, wanted, side="left")
        hi = np.searchsorted(hashes, wanted, side="right")
        counts = hi - lo
        owner = np.repeat(np.arange(len(keys)), counts)
        positions = np.repeat(lo - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        candidates = np.asarray(rows[positions], dtype=np.int64)
        matches = self._verify(keys, owner, candidates)
        if every:
            return owner[matches], candidates[matches]
        out = np.full(len(keys), -1, np.int64)
        # Candidates of one key are in index order (DB keys, then url: keys, each by
        # row): the first confirmed one is the dict's answer.
        for o, r in zip(
            owner[matches][::-1].tolist(), candidates[matches][::-1].tolist(), strict=True
        ):
            out[o] = r
        return out

    def _verify(self, keys: list[str], owner: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros(0, bool)
        meta = self.metadata.take(rows, ("key", "url"))
        ok = np.zeros(len(rows), bool)
        for i, (o, key, url) in enumerate(
            zip(owner.tolist(), meta["key"], meta["url"], strict=True)
        ):
            wanted = keys[o]
            ok[i] = key == wanted or (
                url is not None
                and wanted.startswith(URL_PREFIX)
                and url == wanted[len(URL_PREFIX) :]
            )
        return ok


def build_key_arrays(metadata: Metadata) -> tuple[np.ndarray, np.ndarray]:
    """Sorted hashes of every key and ``url:`` key with their rows (DB keys first)."""
    return _key_arrays(metadata.batches(("key", "url")), 0)


def _key_arrays(batches, start: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`build_key_arrays` of record batches (``key``, ``url``) whose first row is
    global row ``start``."""
    key_hashes, url_hashes, url_rows = [], [], []
    first = start
    for batch in batches:
        n = batch.num_rows
        key_hashes.append(_string_hashes(batch.column(0), ""))
        url = batch.column(1)
        valid = np.asarray(url.is_valid()) & (np.asarray(_lengths(url)) > 0)
        url_hashes.append(_string_hashes(url, URL_PREFIX)[valid])
        url_rows.append(np.flatnonzero(valid) + start)
        start += n
    hashes = np.concatenate([*key_hashes, *url_hashes]).astype(np.uint64, copy=False)
    rows = np.concatenate([np.arange(first, start, dtype=np.int64), *url_rows]).astype(np.int64)
    order = np.argsort(hashes, kind="stable")
    return hashes[order], rows[order]


def write_key_index(source_dir: str | os.PathLike, metadata: Metadata) -> int:
    """Build the key index of ``source_dir`` on disk; returns the rows it covers."""
    source_dir = Path(source_dir)
    hashes, rows = build_key_arrays(metadata)
    for name, array in ((HASHES_FILE, hashes), (ROWS_FILE, rows)):
        atomic_write(source_dir / name, lambda f, a=array: np.save(f, a))
    return metadata.count


def extend_key_index(source_dir: str | os.PathLike, batches, start: int) -> int:
    """Add the keys of rows ``start`` on (record ``batches`` of ``key``, ``url``) to the
    key index of ``source_dir``; returns the rows it covers now.

    The new hashes are merged into the sorted arrays (equal hashes keep the older row
    first, as a build from scratch orders them), without reading the old rows'
    metadata. Entries of rows ``start`` on already there (a killed add wrote the files
    but not the infos) are dropped first, so running it again is harmless.
    """
    source_dir = Path(source_dir)
    batches = list(batches)
    new_hashes, new_rows = _key_arrays(batches, start)
    old_hashes = np.load(source_dir / HASHES_FILE, mmap_mode="r")
    old_rows = np.load(source_dir / ROWS_FILE, mmap_mode="r")
    keep = np.asarray(old_rows) < start
    if not keep.all():
        old_hashes, old_rows = old_hashes[keep], old_rows[keep]
    at = np.searchsorted(old_hashes, new_hashes, side="right")
    hashes = np.insert(old_hashes, at, new_hashes)
    rows = np.insert(np.asarray(old_rows, np.int64), at, new_rows)
    for name, array in ((HASHES_FILE, hashes), (ROWS_FILE, rows)):
        atomic_write(source_dir / name, lambda f, a=array: np.save(f, a))
    return start + sum(b.num_rows for b in batches)


def _string_hashes(array, prefix: str) -> np.ndarray:
    """Hashes of a pyarrow string array's values, read from its buffers (no str objects)."""
    import pyarrow as pa

    if pa.types.is_large_string(array.type):
        offset_type = np.int64
    elif pa.types.is_string(array.type):
        offset_type = np.int32
    else:
        array = array.cast(pa.string())
        offset_type = np.int32
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[
        array.offset : array.offset + len(array) + 1
    ]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    return _core.string_hashes(np.ascontiguousarray(offsets), data, prefix=prefix)


def _lengths(array):
    import pyarrow.compute as pc

    return pc.fill_null(pc.binary_length(array), 0)
