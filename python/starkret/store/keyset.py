"""The sample keys already written to an output folder, for duplicate detection.

Each key costs 8 bytes: one ``uint64`` holding the top 40 bits of the key's hash and,
in the low 24 bits, the part that holds it (96 MB at 12M keys, no Python object per
key; a merge briefly needs 64 MB more). The values live in a few sorted arrays, merged
as they grow up to :data:`MERGE_CAP` keys, and searched with ``np.searchsorted``. A
hash match is confirmed against the real keys of that part, read from its metadata
file, so a hash collision never turns a good sample into a "duplicate". The set is
rebuilt from the finished parts' ``sample_key`` columns, so it survives a resume and
sees parts written by other workers on the same folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from starkret.store.layout import part_name, part_number

__all__ = ["MAX_PARTS", "KeySet"]

PART_BITS = 24
#: Parts one output folder can hold (part numbers are stored in ``PART_BITS`` bits).
MAX_PARTS = 1 << PART_BITS
_PART_MASK = np.uint64(MAX_PARTS - 1)
_HASH_MASK = ~_PART_MASK
#: Runs are not merged beyond this many keys (32 MB), which bounds the extra memory
#: a merge needs; a folder of 12M keys then holds about eight runs.
MERGE_CAP = 1 << 22


def process_local_hashes(keys: Sequence[str]) -> np.ndarray:
    """64-bit hashes of ``keys`` that hold in this process only: Python's string hash,
    salted per process (fast, and all this needs since every process rebuilds the set).
    Not :func:`starkret._core.key_hashes`, the stable hashes the on-disk key index uses."""
    return np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys)).view(np.uint64)


class KeySet:
    """Which finished part holds a key, for the parts under ``metadata_dir``."""

    def __init__(self, metadata_dir: Path) -> None:
        self.metadata_dir = Path(metadata_dir)
        self._runs: list[np.ndarray] = []
        self._loaded: set[int] = set()

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(run.nbytes for run in self._runs)

    def refresh(self) -> None:
        """Take in the keys of parts finished since the last call (by any worker)."""
        for path in sorted(self.metadata_dir.glob("metadata_*.parquet")):
            part = part_number(path)
            if part is None or part in self._loaded:
                continue
            self.add(part, self._keys_of(part))

    def add(self, part: int, keys: Sequence[str]) -> None:
        """Record the keys of ``part``, just written by this worker."""
        self._loaded.add(part)
        if len(keys):
            self._push(self._packed(process_local_hashes(keys), part))

    def first_parts(self, keys: Sequence[str]) -> list[int | None]:
        """For every key, the lowest finished part that holds it, or None."""
        found: list[int | None] = [None] * len(keys)
        if not self._runs or not len(keys):
            return found
        wanted = process_local_hashes(keys) & _HASH_MASK
        candidates: dict[int, set[int]] = {}  # part -> positions in keys
        for run in self._runs:
            lo = np.searchsorted(run, wanted, side="left")
            hi = np.searchsorted(run, wanted | _PART_MASK, side="right")
            for position in np.flatnonzero(hi > lo).tolist():
                for value in run[lo[position] : hi[position]].tolist():
                    candidates.setdefault(value & int(_PART_MASK), set()).add(position)
        for part in sorted(candidates):
            real = set(self._keys_of(part))
            for position in candidates[part]:
                if found[position] is None and keys[position] in real:
                    found[position] = part
        return found

    # ==== internals ====

    def _keys_of(self, part: int) -> list[str]:
        import pyarrow.parquet as pq

        path = self.metadata_dir / part_name("metadata", part)
        if not path.exists():  # a folder from before zero-padded names
            path = self.metadata_dir / part_name("metadata", part, padded=False)
        table = pq.read_table(path, columns=["sample_key"])
        return table.column("sample_key").to_pylist()

    @staticmethod
    def _packed(hashes: np.ndarray, part: int) -> np.ndarray:
        if not 0 <= part < MAX_PARTS:
            raise ValueError(f"part {part} is beyond the {MAX_PARTS:,} parts a folder can hold")
        return (hashes & _HASH_MASK) | np.uint64(part)

    def _push(self, values: np.ndarray) -> None:
        self._runs.append(np.sort(values))
        # Keep run sizes decreasing geometrically: O(log n) runs, O(n log n) merging.
        while (
            len(self._runs) > 1
            and len(self._runs[-2]) <= 2 * len(self._runs[-1])
            and len(self._runs[-2]) + len(self._runs[-1]) <= MERGE_CAP
        ):
            merged = np.concatenate([self._runs.pop(-2), self._runs.pop()])
            merged.sort(kind="stable")  # timsort: a linear merge of the two sorted runs
            self._runs.append(merged)
