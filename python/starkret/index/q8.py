"""The int8 copy of an exact source, and the exact search that runs its first pass on it.

``build-index`` writes, per embedding part, ``index/q8/q8_{i:05d}.npy``: the part's rows
as 8-bit codes with a per-row scale and two per-row error terms, in the block layout of
``rust/q8.rs`` (16 rows x 4 dimensions per 64 bytes, what one ``vpdpbusd`` serves). A
search scans the codes, bounds every row's float32 score from both sides, and re-scores
only the rows that can still be in the top-``k`` with the float32 scan's own kernel, so
its ids, scores and tie order are those of :func:`~starkret.index.topk.topk_parts`,
bit for bit (docs/index.md, "Exact search").

- :func:`write_q8`: write the copies of the parts that lack a current one (atomically).
- :class:`Q8Copy`: the memory-mapped copies of a source, if current.
- :func:`topk_q8_parts`: the search, with the rows re-ranked per query.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

import starkret._core as _core
from starkret._io import atomic_write
from starkret.errors import InvalidInputError
from starkret.index.topk import Exclude, Exclusions, _as_queries, _check_k, _check_threads
from starkret.store.layout import part_file, part_files

__all__ = [
    "FIRST_PASS",
    "FORMAT_VERSION",
    "Q8Copy",
    "Q8Result",
    "q8_folder",
    "topk_q8_parts",
    "write_q8",
]

_logger = logging.getLogger("starkret")

#: What ``infos.json`` records as ``first_pass`` for a source with an int8 copy.
FIRST_PASS = "int8"
#: Version of the block format (``rust/q8.rs``); a copy of another version is not used.
FORMAT_VERSION = int(_core.Q8_FORMAT_VERSION)
_SUB = "q8"
#: Sources whose missing or stale copy was already reported in this process.
_REPORTED: set[str] = set()


def q8_folder(source_dir: str | os.PathLike) -> Path:
    """Where a source's int8 copies live: ``SOURCE/index/q8``."""
    return Path(source_dir) / "index" / _SUB


#: Rows hashed by a part's fingerprint, evenly spaced, the first and the last included.
FINGERPRINT_ROWS = 64


def _fingerprint(rows: np.ndarray) -> str:
    """A cheap check that a part is the one its copy was made from: shape, dtype and
    :data:`FINGERPRINT_ROWS` evenly spaced rows (a few pages of the memory map)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{rows.shape}{rows.dtype}".encode())
    if len(rows):
        picks = np.unique(np.linspace(0, len(rows) - 1, FINGERPRINT_ROWS).round().astype(np.int64))
        h.update(np.ascontiguousarray(rows[picks]).tobytes())
    return h.hexdigest()


def _record(path: Path, rows: np.ndarray) -> dict:
    """What ties a copy to its part: file name and size, rows, sampled fingerprint."""
    return {
        "part": path.name,
        "bytes": path.stat().st_size,
        "rows": int(rows.shape[0]),
        "fingerprint": _fingerprint(rows),
    }


def write_q8(
    source_dir: str | os.PathLike,
    arrays: Sequence[np.ndarray],
    previous: dict | None = None,
    *,
    threads: int | None = None,
) -> dict:
    """Write the int8 copy of every part whose copy is missing or not current; returns
    the ``q8`` record for ``infos.json``.

    ``arrays`` are the source's parts in order; ``previous`` the infos of the last
    build: a part whose record there still matches (same file name and size, rows and
    sampled rows)
    and whose copy exists keeps it, so a build after an incremental add writes only
    the new parts. Each copy is published atomically.
    """
    source_dir = Path(source_dir)
    files = part_files(source_dir, "img_emb")
    if len(files) != len(arrays):
        raise InvalidInputError(f"{len(arrays)} arrays for {len(files)} parts of {source_dir}")
    old = (previous or {}).get("q8") or {}
    old_parts = old.get("parts", []) if old.get("version") == FORMAT_VERSION else []
    folder = q8_folder(source_dir)
    folder.mkdir(parents=True, exist_ok=True)
    records, written, total = [], 0, 0
    for i, (path, rows) in enumerate(zip(files, arrays, strict=True)):
        record = _record(path, rows)
        target = part_file(folder.parent, _SUB, i)
        if not (i < len(old_parts) and old_parts[i] == record and target.is_file()):
            view = rows.view(np.uint16) if rows.dtype == np.float16 else rows
            codes = _core.q8_quantize(np.ascontiguousarray(view), threads=threads)
            atomic_write(target, lambda f, codes=codes: np.save(f, codes))
            written += 1
        records.append(record)
        total += target.stat().st_size
    for stale in part_files_beyond(folder, len(files)):
        stale.unlink()
    count = sum(r["rows"] for r in records)
    return {
        "version": FORMAT_VERSION,
        "parts": records,
        "written": written,
        "bytes": total,
        "bytes_per_million_rows": round(total / count * 1e6) if count else 0,
    }


def part_files_beyond(folder: Path, count: int) -> list[Path]:
    """Copies of parts numbered ``count`` and above (left by a source that shrank)."""
    out = []
    for path in folder.glob(f"{_SUB}_*.npy"):
        digits = path.stem[len(_SUB) + 1 :]
        if digits.isdigit() and int(digits) >= count:
            out.append(path)
    return out


@dataclass
class Q8Copy:
    """The memory-mapped int8 copies of a source's parts (one uint8 array per part)."""

    codes: list[np.ndarray]
    #: Rows re-ranked per query by the last search through this copy (for benchmarks).
    last_reranked: np.ndarray | None = None

    @classmethod
    def open(
        cls, source_dir: str | os.PathLike, infos: dict, arrays: Sequence[np.ndarray]
    ) -> Q8Copy | None:
        """The source's copy if ``infos`` records a current one, else None (searches
        then scan float32), reported once per source with how to upgrade."""
        source_dir = Path(source_dir)
        why = _why_not_current(source_dir, infos, arrays)
        if why is None:
            folder = q8_folder(source_dir)
            codes = [
                np.load(part_file(folder.parent, _SUB, i), mmap_mode="r", allow_pickle=False)
                for i in range(len(arrays))
            ]
            return cls(codes)
        if str(source_dir) not in _REPORTED:
            _REPORTED.add(str(source_dir))
            _logger.info(
                "%s: exact search scans float32 (%s); `starkret build-index %s` adds the "
                "int8 first pass (same results, several times faster)",
                source_dir,
                why,
                source_dir,
            )
        return None


def _why_not_current(source_dir: Path, infos: dict, arrays: Sequence[np.ndarray]) -> str | None:
    if infos.get("first_pass") != FIRST_PASS:
        return "the index has no int8 copy"
    record = infos.get("q8") or {}
    if record.get("version") != FORMAT_VERSION:
        version = record.get("version")
        return f"its int8 copy has format {version}, this version reads {FORMAT_VERSION}"
    parts = record.get("parts", [])
    files = part_files(source_dir, "img_emb")
    if len(parts) != len(arrays) or len(files) != len(arrays):
        return "the parts changed since the int8 copy was written"
    for i, (path, rows, rec) in enumerate(zip(files, arrays, parts, strict=True)):
        if "bytes" not in rec:
            return "its int8 copy was recorded with an older check of its parts"
        if rec != _record(path, rows):
            return f"part {i} changed since the int8 copy was written"
        if not part_file(q8_folder(source_dir).parent, _SUB, i).is_file():
            return f"the int8 copy of part {i} is missing"
    return None


class Q8Result(NamedTuple):
    """Top-``k`` scores and ids (as :func:`~starkret.index.topk.topk_parts`), the rows
    re-ranked in float32 per query, and the first pass that ran."""

    scores: np.ndarray
    ids: np.ndarray
    reranked: np.ndarray
    first_pass: str


def topk_q8_parts(
    queries: np.ndarray,
    parts: Sequence[np.ndarray],
    codes: Sequence[np.ndarray],
    k: int,
    *,
    exclude: Exclude | Exclusions = None,
    threads: int | None = None,
    first_pass: str = "auto",
) -> Q8Result:
    """:func:`~starkret.index.topk.topk_parts` through the int8 first pass: the same
    ids, scores and tie order, bit for bit.

    ``codes[i]`` is part ``i``'s copy (:func:`write_q8`, or ``_core.q8_quantize``);
    ``first_pass`` is ``auto`` (VNNI, else AVX2, else the float32 scan), ``vnni``,
    ``avx2``, ``scalar`` or ``float32``.

    >>> import numpy as np, starkret._core as core
    >>> db = np.array([[1, 0], [0, 1], [1, 1], [1, 0]], dtype=np.float16)
    >>> copy = core.q8_quantize(db.view(np.uint16))
    >>> topk_q8_parts(np.array([[1.0, 0.0]]), [db], [copy], k=3).ids.tolist()
    [[0, 2, 3]]
    """
    if len(codes) != len(parts):
        raise InvalidInputError(f"{len(codes)} int8 copies for {len(parts)} parts")
    q = _as_queries(queries)
    k = _check_k(k)
    _check_threads(threads)
    options: dict[str, object] = {"threads": threads, "first_pass": first_pass}
    exclusions = Exclusions.parse(exclude, q.shape[0])
    if exclusions is not None:
        options.update(exclusions.core_options())
    views = [a.view(np.uint16) if a.dtype == np.float16 else a for a in parts]
    scores, ids, reranked, ran = _core.q8_search_parts(q, views, list(codes), k, **options)
    return Q8Result(scores, ids, reranked.astype(np.int64), ran)
