"""The metadata of one embedded source (key, id, url, caption per row), read only where asked.

``embed-shards`` writes one ``metadata/metadata_{i}.parquet`` per part. ``build-index``
copies the columns a search returns into one uncompressed Arrow IPC file,
``index/metadata.arrow``, which :class:`Metadata` memory-maps: opening it reads a
footer, and a hit costs a lookup in the mapped pages of its row, so a 12M-row source
opens in milliseconds and holds no Python object per row. A source indexed by an older
version (no Arrow file, or one for another row count) falls back to reading the
parquet part that holds each wanted row, with a warning to run ``build-index``.

A source grown by ``build-index`` (new parts added to an existing index, see
:mod:`starkret.index.grow`) keeps ``metadata.arrow`` as it was and gets one more file per
add, ``index/metadata.pNNNNN.arrow`` holding the rows of parts ``NNNNN`` on; the
source's ``infos.json`` lists them (``metadata_segments``) and :class:`Metadata` maps
them as one sequence of rows.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from starkret._io import atomic_path
from starkret.errors import InvalidInputError, NotFoundError
from starkret.store.layout import part_files

__all__ = [
    "COLUMNS",
    "METADATA_FILE",
    "Metadata",
    "arrow_rows",
    "segment_name",
    "write_metadata_arrow",
]

#: The columns a hit carries (``Hit.key``, ``id``, ``url``, ``caption``).
COLUMNS = ("key", "id", "url", "caption")
#: The memory-mapped copy ``build-index`` writes, relative to the source folder.
METADATA_FILE = Path("index") / "metadata.arrow"
#: Rows per record batch of the Arrow file: few batches (a short footer to read at open),
#: each small enough to write from memory.
BATCH_ROWS = 1 << 18
#: Parquet parts kept decoded by the fallback reader.
_PARQUET_CACHE = 8

_logger = logging.getLogger("starkret")


#: Sources from this many rows up get a warning when they lack build-index's files
#: (below it the parquet fallback costs little).
WARN_UNINDEXED_ROWS = 100_000
_warned: set[Path] = set()


def warn_unindexed(source_dir: Path, count: int, consequence: str) -> None:
    """Tell (once per source) that ``build-index`` would make this source faster."""
    if count < WARN_UNINDEXED_ROWS or source_dir in _warned:
        return
    _warned.add(source_dir)
    _logger.warning(
        "%s: %d rows without build-index's metadata and key files (built by an older "
        "version, or the source changed): %s; run `starkret build-index %s` once",
        source_dir,
        count,
        consequence,
        source_dir,
    )


class Metadata:
    """Rows of a source's metadata, materialised only for the rows asked for.

    >>> meta = Metadata.open("db/cc12m", part_offsets)  # doctest: +SKIP
    >>> meta.take([12, 5])["key"]  # doctest: +SKIP
    ['cc12m/000000012', 'cc12m/000000005']
    """

    def __init__(
        self,
        source_dir: Path,
        offsets: np.ndarray,
        arrow_path: Path | None,
        segments: Sequence[Path] = (),
    ) -> None:
        self.source_dir, self.offsets, self.arrow_path = source_dir, offsets, arrow_path
        #: Arrow files after ``arrow_path`` holding the rows of parts added since.
        self.segments = list(segments)
        self._batches: list | None = None  # record batches of the mapped Arrow file
        self._batch_offsets: np.ndarray | None = None
        self._parquet: OrderedDict[int, object] = OrderedDict()
        self._parquet_files: list[Path] | None = None  # listed on the first parquet read

    @classmethod
    def open(cls, source_dir: str | os.PathLike, offsets: np.ndarray, infos: dict) -> Metadata:
        """Metadata of ``source_dir`` whose parts start at global rows ``offsets``.

        ``infos`` is the source's ``index/infos.json``: its ``metadata_rows`` says for how
        many rows ``build-index`` wrote the Arrow file (a mismatch means the source
        changed since, and the parquet parts are read instead).
        """
        source_dir = Path(source_dir)
        count = int(offsets[-1])
        path = source_dir / METADATA_FILE
        segments = [path.parent / name for name in infos.get("metadata_segments", ())]
        if (
            path.exists()
            and infos.get("metadata_rows") == count
            and all(p.exists() for p in segments)
        ):
            return cls(source_dir, offsets, path, segments)
        return cls(source_dir, offsets, None)

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    # ==== Reading rows ====

    def take(self, rows: Sequence[int] | np.ndarray, columns: Sequence[str] = COLUMNS) -> dict:
        """``{column: [value per row]}`` for global ``rows`` (any order, repeats allowed)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out: dict[str, list] = {c: [None] * len(rows) for c in columns}
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.count:
            raise IndexError(f"rows outside 0..{self.count} of {self.source_dir}")
        if self.arrow_path is not None:
            self._open_batches()
            starts = self._batch_offsets
            source = self._batches
        else:
            warn_unindexed(self.source_dir, self.count, "hits are read from the parquet parts")
            starts, source = self.offsets, None
        group = np.searchsorted(starts, rows, side="right") - 1
        order = np.argsort(group, kind="stable")
        bounds = np.flatnonzero(np.diff(group[order])) + 1
        for positions in np.split(order, bounds):
            g = int(group[positions[0]])
            local = rows[positions] - starts[g]
            batch = source[g] if source is not None else self._parquet_part(g)
            local = local.tolist()
            for c in columns:
                # Scalar reads touch only the wanted rows' bytes; pyarrow's ``take``
                # would load the compute module (a second, once) to copy them.
                column = batch.column(c)
                target = out[c]
                for p, i in zip(positions.tolist(), local, strict=True):
                    target[p] = column[i].as_py()
        return out

    def batches(self, columns: Sequence[str] = COLUMNS) -> Iterator:
        """Record batches (pyarrow) of ``columns`` over every row, in row order."""
        if self.arrow_path is not None:
            self._open_batches()
            for batch in self._batches:
                yield batch.select(list(columns))
            return
        for part in range(len(self.offsets) - 1):
            yield from self._parquet_part(part).select(list(columns)).to_batches()

    def _open_batches(self) -> None:
        if self._batches is not None:
            return
        import pyarrow as pa

        batches = []
        for path in (self.arrow_path, *self.segments):
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            batches += [reader.get_batch(i) for i in range(reader.num_record_batches)]
        sizes = [b.num_rows for b in batches]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if offsets[-1] != self.count:
            raise InvalidInputError(
                f"{self.arrow_path} holds {offsets[-1]} rows for {self.count} embeddings: "
                f"the file is damaged; run `starkret build-index {self.source_dir}` again"
            )
        self._batches, self._batch_offsets = batches, offsets

    def _parquet_part(self, part: int):
        table = self._parquet.get(part)
        if table is not None:
            self._parquet.move_to_end(part)
            return table
        import pyarrow.parquet as pq

        if self._parquet_files is None:
            self._parquet_files = part_files(self.source_dir, "metadata")
        files = self._parquet_files
        # Part i is the i-th file in part order, whatever its name's padding.
        path = files[part] if part < len(files) else self.source_dir / "metadata" / f"part {part}"
        try:
            # ParquetFile.read, not read_table: the latter imports pyarrow.dataset (~1 s)
            table = pq.ParquetFile(path).read(columns=list(COLUMNS))
        except FileNotFoundError:
            raise NotFoundError(
                f"{path} not found: {self.source_dir} is damaged, re-run embed-shards"
            ) from None
        expected = int(self.offsets[part + 1] - self.offsets[part])
        if table.num_rows != expected:
            raise InvalidInputError(
                f"{path}: {table.num_rows} metadata rows for {expected} embeddings of "
                f"part {part}; the folder is damaged, re-run embed-shards"
            )
        self._parquet[part] = table
        if len(self._parquet) > _PARQUET_CACHE:
            self._parquet.popitem(last=False)
        return table


def arrow_rows(path: str | os.PathLike) -> int:
    """Rows of an Arrow IPC file (its footer and batch headers only), 0 if unreadable."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (OSError, pa.ArrowInvalid):
        return 0


def segment_name(first_part: int) -> str:
    """The file name of the metadata segment holding parts ``first_part`` on.

    >>> segment_name(12)
    'metadata.p00012.arrow'
    """
    return f"metadata.p{first_part:05d}.arrow"


def write_metadata_arrow(
    source_dir: str | os.PathLike, offsets: np.ndarray, *, first_part: int = 0
) -> int:
    """Copy the metadata parts of ``source_dir`` into ``index/metadata.arrow``; returns rows.

    Parts are read one at a time (memory stays that of one batch), checked against the
    embedding part sizes ``offsets``, and written uncompressed so the file can be
    memory-mapped; the file appears under its name only once complete.
    ``first_part > 0`` writes only the parts from ``first_part`` on, to the segment
    :func:`segment_name` names (an add to an existing index).
    """
    import pyarrow as pa

    source_dir = Path(source_dir)
    reader = Metadata(source_dir, offsets, None)
    path = source_dir / METADATA_FILE
    if first_part:
        path = path.with_name(segment_name(first_part))
    path.parent.mkdir(exist_ok=True)
    schema = pa.schema(
        [("key", pa.string()), ("id", pa.int64()), ("url", pa.string()), ("caption", pa.string())]
    )
    pending: list = []
    pending_rows = 0
    rows = 0
    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, schema) as writer,
    ):

        def flush(final: bool) -> None:
            # Batches of exactly BATCH_ROWS rows (the last one shorter).
            nonlocal pending, pending_rows
            if not pending:
                return
            table = pa.Table.from_batches(pending, schema).combine_chunks()
            full = table.num_rows if final else table.num_rows // BATCH_ROWS * BATCH_ROWS
            for batch in table.slice(0, full).to_batches(max_chunksize=BATCH_ROWS):
                writer.write_batch(batch)
            rest = table.slice(full)
            pending, pending_rows = rest.to_batches(), rest.num_rows

        for part in range(first_part, len(offsets) - 1):
            table = reader._parquet_part(part)
            table = pa.table({c: table.column(c).cast(schema.field(c).type) for c in COLUMNS})
            for batch in table.to_batches():
                pending.append(batch)
                pending_rows += batch.num_rows
            rows += table.num_rows
            reader._parquet.clear()
            if pending_rows >= BATCH_ROWS:
                flush(final=False)
        flush(final=True)
    return rows
