"""THE reader of image bytes: a DB image's bytes, read back from the input it was embedded from.

``embed`` records in its manifest where every part was read from (``part_inputs``: an
image folder, a webdataset shard, or a parquet / Arrow table, with the columns and
folders it used). :class:`ImageReader` takes one such record and a sample key and
returns that sample's bytes, exactly as ``embed`` found them: the same key rules (a
tar member's key is its path up to the first dot of the basename, as webdataset and the
Rust shard reader cut it), the same table columns, the same cell forms (raw bytes, a
Hugging Face ``{bytes, path}`` struct, a path string). The serve ``/image`` route, the
``align --report`` thumbnails and the stark-image export all read through it (via
:meth:`starkret.index.db.ImageDB.image_bytes`).

Inputs are untrusted, and nothing outside them is ever read: a key or a table cell
naming a path is read only if it names a file inside its folder and resolves, symlinks
included, to a regular file inside that folder (:func:`read_file_inside`, which ingest
uses too: one rule for ``embed`` and for every reader here), opened without following a
last symlink and without blocking on a FIFO, and never above a size limit. An input
embedded with ``follow_links=True`` (recorded in its ``part_inputs`` record) has its
links followed wherever they point, here as in ``embed``; a path that is outside the
folder by its name (``../x``, ``/etc/passwd``) is refused either way.
"""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from starkret._io import is_inside
from starkret.errors import InvalidInputError

__all__ = [
    "CAPTION_COLUMNS",
    "DEFAULT_MAX_IMAGE_BYTES",
    "IMAGE_COLUMNS",
    "IMAGE_SUFFIXES",
    "KEY_COLUMNS",
    "TAR_IMAGE_EXTENSIONS",
    "URL_COLUMNS",
    "ImageReader",
    "cell_image_bytes",
    "image_extension",
    "is_link_outside",
    "media_type",
    "member_key",
    "open_table",
    "part_input",
    "read_file_inside",
    "resolve_columns",
]

#: Largest image read into memory (the Rust shard reader's default member limit too).
DEFAULT_MAX_IMAGE_BYTES = 64 << 20
#: File suffixes taken as images in folders (the bytes decide the format, not the name).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
#: Extensions (the last dot-separated part, lowercased) that make a tar member the
#: sample's image: the Rust shard reader's ``IMAGE_EXTENSIONS``.
TAR_IMAGE_EXTENSIONS = frozenset(("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "jxl"))
#: Table columns tried, in order, when none is named (see :func:`resolve_columns`).
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "text", "txt", "description", "question", "query")
KEY_COLUMNS = ("key", "id", "image_id", "filename", "file_name")
URL_COLUMNS = ("url", "image_url")

#: Shards whose member tables are kept, and tables kept open, by one reader.
_CACHED_SHARDS = 64
_CACHED_TABLES = 8
_CACHED_KEY_RANGES = 64
#: What reading an input that changed, vanished or was damaged since it was embedded
#: raises (pyarrow's errors derive from these too).
_INPUT_CHANGED = (
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    EOFError,
    NotImplementedError,
    tarfile.TarError,
    zlib.error,
)


# ==== Reading a file inside a folder ====


def read_file_inside(
    path: object,
    root: str,
    *,
    base: str | None = None,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    follow_links: bool = False,
) -> bytes | str:
    """The bytes of the file ``path`` names (relative to ``base``, default ``root``) if it
    is a regular file inside ``root``, else the reason why not.

    The rule ``embed`` and every reader of image bytes share: a path that resolves
    outside ``root`` is ``unsafe path`` when its name already leaves ``root`` (``..``,
    an absolute path elsewhere), else ``outside input`` (a symlink inside ``root``
    pointing out of it), which ``follow_links`` (the user's opt-in, ``embed
    --follow-links``) follows instead. Links that stay inside ``root`` are followed.
    The resolved file is opened with ``O_NOFOLLOW`` and ``O_NONBLOCK`` (a FIFO never
    hangs).

    >>> read_file_inside("../../etc/passwd", "/data/charts")  # doctest: +SKIP
    "unsafe path: '../../etc/passwd' is outside the dataset folder /data/charts"
    """
    if not isinstance(path, str) or not path or "\0" in path:
        return f"unsafe path: {str(path)[:200]!r} is not a file path"
    joined = os.path.join(root if base is None else base, path)
    real = os.path.realpath(joined)
    if not is_inside(real, root):
        if not is_inside(joined, root, resolve=False):
            return f"unsafe path: {path[:200]!r} is outside the dataset folder {root}"
        if not follow_links:
            return (
                f"outside input: {path[:200]!r} is a link to a file outside {root} "
                "(follow_links / --follow-links follows it)"
            )
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return f"unreadable: {path[:200]}: {exc.strerror or exc}"
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # checked before fdopen, which refuses directories
        os.close(fd)
        return f"unreadable: {path[:200]} is not a regular file"
    with os.fdopen(fd, "rb") as f:
        if info.st_size > max_bytes:
            return f"too large: {path[:200]} has {info.st_size:,} bytes (limit {max_bytes:,})"
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since fstat
        return f"too large: {path[:200]} has over {max_bytes:,} bytes (limit {max_bytes:,})"
    return data


def is_link_outside(path: str, root: str) -> bool:
    """``path`` (inside ``root`` by its name) resolves, symlinks followed, outside ``root``:
    the shard form of :func:`read_file_inside`'s ``outside input`` rule."""
    return not is_inside(path, root)


# ==== Tables: columns and cells ====


def open_table(path: Path):
    """A parquet file, or an Arrow IPC stream (``datasets.save_to_disk``) or file, whole
    (Arrow ones memory-mapped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_table(path)
    # datasets.save_to_disk writes Arrow IPC *streams*; plain Arrow files also exist.
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            pass
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _is_image_type(kind) -> bool:
    """A Hugging Face ``Image`` struct ({bytes, path}) or a binary column."""
    import pyarrow as pa

    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    if pa.types.is_struct(kind):
        names = [kind.field(i).name for i in range(kind.num_fields)]
        return "bytes" in names
    return False


def resolve_columns(schema, columns: Mapping, hints: Mapping, path: Path) -> tuple[str | None, ...]:
    """(image, caption, key, url, status) columns of a table.

    The named ``columns`` win; then ``hints`` (a known source's columns) where present;
    then by type (a Hugging Face ``Image`` struct or a binary column holds the image,
    before a string column named ``image``) and by name.
    """
    import pyarrow as pa

    names = list(schema.names)
    typed = [n for n in names if _is_image_type(schema.field(n).type)]
    image = columns.get("image")
    if image is None and hints.get("image") in names:
        image = hints["image"]
    if image is None and typed:
        image = next((n for n in IMAGE_COLUMNS if n in typed), typed[0])
    image = _pick(names, image, IMAGE_COLUMNS, "image", path, required=True)
    caption, key = columns.get("caption"), columns.get("key")
    if caption is None and hints.get("caption") in names:
        caption = hints["caption"]
    if key is None and hints.get("key") in names:
        key = hints["key"]
    caption = _pick(names, caption, CAPTION_COLUMNS, "caption", path, required=False)
    key = _pick(names, key, KEY_COLUMNS, "key", path, required=False)
    url = next((n for n in URL_COLUMNS if n in names and n != image), None)
    if url is not None and not pa.types.is_string(schema.field(url).type):
        url = None
    # img2dataset's parquet output keeps the rows it could not download (status != success)
    status = "status" if {"status", "error_message"} <= set(names) else None
    return image, caption, key, url, status


def _pick(
    names: list[str],
    wanted: str | None,
    candidates: tuple[str, ...],
    what: str,
    path: Path,
    required: bool,
) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise InvalidInputError(f"{path}: no column {wanted!r} ({what}); columns: {names}")
        return wanted
    for name in candidates:
        if name in names:
            return name
    if required:
        raise InvalidInputError(
            f"{path}: cannot tell which column holds the {what} ({names}); "
            f"name it with --{what}-column"
        )
    return None


def cell_image_bytes(
    value,
    table_dir: str,
    root: str,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    *,
    follow_links: bool = False,
) -> bytes | str:
    """A cell of an image column (raw bytes, Hugging Face's {"bytes", "path"} struct, or a
    path string) as its image bytes, or the failure reason. Paths are relative to
    ``table_dir`` and must stay inside ``root`` (:func:`read_file_inside`)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    path = None
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return bytes(data)
        path = value.get("path") or None
    elif isinstance(value, str) and value:  # a column of image file paths
        path = value
    if path is not None:
        return read_file_inside(
            path, root, base=table_dir, max_bytes=max_bytes, follow_links=follow_links
        )
    return "empty: no image bytes in the row"


# ==== Shards: member names ====


def member_key(name: str) -> tuple[str, str] | None:
    """A tar member path as webdataset's (key, lowercased extension), or None for paths
    webdataset ignores: the Rust shard reader's ``split_member_name``.

    >>> member_key("./000012.jpg"), member_key("d/.x.JPG"), member_key(".x.jpg")
    (('./000012', 'jpg'), ('d/', 'x.jpg'), None)
    """
    base_start = name.rfind("/") + 1
    dot = name.find(".", base_start)
    if dot < 0:
        return None
    if dot == base_start:
        # An empty basename part: the key is the directory, slash included, which must
        # then hold no dot of its own.
        folder = name[:base_start]
        last_dir = folder[:-1].rsplit("/", 1)[-1]
        if not folder or "." in last_dir:
            return None
    return name[:dot], name[dot + 1 :].lower()


def _shard_members(shard) -> dict[str, tuple[int, int]]:
    """``sample key -> (offset, size)`` of each sample's image member in the open shard
    file ``shard``, as the Rust reader picks it: the first image member of the key's first
    run of members (a key that comes back later in the shard is a duplicate the reader
    skips)."""
    out: dict[str, tuple[int, int]] = {}
    seen: set[str] = set()
    current = None
    shard.seek(0)
    with tarfile.open(fileobj=shard, mode="r:*") as tar:
        for member in tar:
            split = member_key(member.name)
            if split is None:
                continue
            key, ext = split
            if key != current:
                if key in seen:
                    current = None  # a duplicate run: none of its members count
                    continue
                seen.add(key)
                current = key
            if (
                member.isfile()
                and key not in out
                and ext.rsplit(".", 1)[-1] in TAR_IMAGE_EXTENSIONS
            ):
                out[key] = (member.offset_data, member.size)
    return out


def _is_gzip(shard) -> bool:
    shard.seek(0)
    return shard.read(2) == b"\x1f\x8b"


def _stamp(info: os.stat_result) -> tuple[int, ...]:
    """What tells a file apart from the one a cache entry was made of: a file rewritten
    in place changes size, mtime or ctime; one replaced by another is another inode."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


# ==== Formats ====

_SIGNATURES = (
    (b"\xff\xd8\xff", 0, "image/jpeg", "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png", "png"),
    (b"WEBP", 8, "image/webp", "webp"),
    (b"GIF87a", 0, "image/gif", "gif"),
    (b"GIF89a", 0, "image/gif", "gif"),
    (b"BM", 0, "image/bmp", "bmp"),
    (b"II*\x00", 0, "image/tiff", "tiff"),
    (b"MM\x00*", 0, "image/tiff", "tiff"),
)


def _format(data: bytes) -> tuple[str, str] | None:
    for magic, at, kind, ext in _SIGNATURES:
        # the one signature not at the start (WebP) sits inside a RIFF container
        if data[at : at + len(magic)] == magic and (at == 0 or data[:4] == b"RIFF"):
            return kind, ext
    return None


def media_type(data: bytes) -> str:
    """The media type of image bytes, from the bytes (never from a file name)."""
    found = _format(data)
    return found[0] if found else "application/octet-stream"


def image_extension(data: bytes, default: str = "jpg") -> str:
    """The file extension of image bytes, from the bytes (``default`` when unknown)."""
    found = _format(data)
    return found[1] if found else default


# ==== The reader ====


def part_input(manifest: Mapping, part: int) -> dict | None:
    """Where part ``part`` of an embedded source was read from: its ``part_inputs``
    record, with the table row range of the part (from the manifest's part list when
    the record does not hold it), or None when the manifest does not say."""
    inputs = manifest.get("part_inputs") or []
    if not 0 <= part < len(inputs) or not isinstance(inputs[part], Mapping):
        return None
    record = dict(inputs[part])
    if not isinstance(record.get("path"), str):
        return None
    if record.get("kind") == "table" and "start" not in record:
        parts = manifest.get("parts") or []
        described = parts[part] if part < len(parts) else None
        if isinstance(described, str) and described.startswith("table:"):
            start, stop = described.rsplit(":", 2)[1:]
            if start.isdigit() and stop.isdigit():
                record["start"], record["stop"] = int(start), int(stop)
    return record


class ImageReader:
    """Image bytes of samples, read from the inputs their parts were embedded from.

    Safe to share between threads. It keeps bounded caches: the image members of the
    last shards read, the last tables opened, and the keys of the last table row ranges
    searched; each entry is checked against its file (device, inode, size, mtime, ctime) at
    every read and made again when the file changed, so a rewritten shard never serves
    another member's bytes.

    >>> reader = ImageReader()
    >>> reader.read({"kind": "files", "path": "/data/charts"}, "png/c1.png")  # doctest: +SKIP
    b'\\x89PNG...'
    """

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._shards = _Cache(_CACHED_SHARDS)  # path -> {sample key: (offset, size)}
        self._tables = _Cache(_CACHED_TABLES)  # path -> _Table
        self._key_ranges = _Cache(_CACHED_KEY_RANGES)  # (path, column, start, stop) -> keys

    def read(self, record: Mapping, sample_key: str) -> bytes | None:
        """The bytes of sample ``sample_key`` of the part ``record`` describes (see
        :func:`part_input`), or None: not there, unsafe, too large, or the input changed
        or vanished since it was embedded."""
        kind, path = record.get("kind"), record.get("path")
        if not isinstance(path, str) or not isinstance(sample_key, str):
            return None
        try:
            if kind == "files":
                return self._file(record, path, sample_key)
            if kind == "shard":
                if _refused_shard(record, path):
                    return None  # what embed refused (a link out of a listed folder)
                return self._shard(path, sample_key)
            if kind == "table":
                return self._table(record, path, sample_key)
        except _INPUT_CHANGED:
            return None  # an input that changed or vanished since the DB was built
        return None

    # ==== Folders ====

    def _file(self, record: Mapping, root: str, sample_key: str) -> bytes | None:
        if record.get("layout") == "img2dataset":
            # img2dataset's files layout: key = file stem, the file in a shard folder
            return self._img2dataset_file(root, sample_key, _follows(record))
        data = read_file_inside(
            sample_key, root, max_bytes=self.max_bytes, follow_links=_follows(record)
        )
        if isinstance(data, bytes):
            return data
        if "layout" not in record and "." not in sample_key:
            # A manifest from before layouts were recorded: a key without suffix can only
            # be an img2dataset stem.
            return self._img2dataset_file(root, sample_key, _follows(record))
        return None

    def _img2dataset_file(self, root: str, stem: str, follow_links: bool) -> bytes | None:
        if not stem or "/" in stem or stem.startswith("."):
            return None
        # Its keys start with their shard folder's name (``00001`` holds ``000010042``).
        with os.scandir(root) as entries:
            folders = sorted(
                e.name
                for e in entries
                if stem.startswith(e.name) and e.is_dir(follow_symlinks=False)
            )
        for folder in folders:
            for suffix in IMAGE_SUFFIXES:
                data = read_file_inside(
                    f"{folder}/{stem}{suffix}",
                    root,
                    max_bytes=self.max_bytes,
                    follow_links=follow_links,
                )
                if isinstance(data, bytes):
                    return data
        return None

    # ==== Shards ====

    def _shard(self, path: str, sample_key: str) -> bytes | None:
        # The member table and the bytes come from one open file, checked against the
        # file the table was made of: a shard rewritten or replaced meanwhile is read anew.
        with open(path, "rb") as shard:
            stamp = _stamp(os.fstat(shard.fileno()))
            _, members = self._shards.get(
                path,
                lambda: (stamp, _shard_members(shard)),
                fresh=lambda entry: entry[0] == stamp,
            )
            found = members.get(sample_key)
            if found is None:
                return None
            offset, size = found
            if size > self.max_bytes:
                return None
            if _is_gzip(shard):
                shard.seek(0)
                with gzip.GzipFile(fileobj=shard) as f:
                    f.seek(offset)
                    data = f.read(size)
            else:
                shard.seek(offset)
                data = shard.read(size)
        return data if len(data) == size else None

    # ==== Tables ====

    def _table(self, record: Mapping, spec: str, sample_key: str) -> bytes | None:
        file, image_col, _caption, key_col = spec.rsplit("#", 3)
        stamp = _stamp(os.stat(file))
        table = self._tables.get(
            file, lambda: _Table(Path(file), stamp), fresh=lambda t: t.stamp == stamp
        )
        columns = record.get("columns")
        if isinstance(columns, Mapping):  # what embed resolved (known-source hints included)
            image_col, key_col = columns.get("image"), columns.get("key")
        else:  # a manifest from before they were recorded: resolve as embed did
            image_col, _, key_col, _, _ = resolve_columns(
                table.schema, {"image": image_col or None, "key": key_col or None}, {}, table.path
            )
        start, stop = record.get("start", 0), record.get("stop", table.num_rows)
        if not isinstance(start, int) or not isinstance(stop, int):
            return None
        start, stop = max(start, 0), min(stop, table.num_rows)
        if key_col:
            row = self._keyed_row(table, key_col, start, stop, sample_key)
        else:
            row = _positional_row(record, table.path, sample_key, start, stop)
        if row is None or not isinstance(image_col, str):
            return None
        table_dir = str(table.path.parent)
        root = record.get("root") if isinstance(record.get("root"), str) else table_dir
        data = cell_image_bytes(
            table.cell(image_col, row),
            table_dir,
            root,
            self.max_bytes,
            follow_links=_follows(record),
        )
        if isinstance(data, str) or len(data) > self.max_bytes:
            return None
        return data

    def _keyed_row(
        self, table: _Table, key_col: str, start: int, stop: int, sample_key: str
    ) -> int | None:
        import pyarrow as pa
        import pyarrow.compute as pc

        def load():
            keys = table.column_range(key_col, start, stop)
            if not pa.types.is_string(keys.type):
                keys = keys.cast(pa.string())  # embed keys rows by ``str(value)``
            return pc.fill_null(keys, "None") if keys.null_count else keys

        keys = self._key_ranges.get((str(table.path), table.stamp, key_col, start, stop), load)
        at = pc.index(keys, pa.scalar(sample_key, pa.string())).as_py()
        return None if at is None or at < 0 else start + at


def _follows(record: Mapping) -> bool:
    """The input was embedded with ``follow_links=True``: its links are followed here too."""
    return record.get("follow_links") is True


def _refused_shard(record: Mapping, path: str) -> bool:
    """A shard found by listing a folder (``root``: the folder or a glob's) that links out
    of it, without ``follow_links``: embed refused it, so nothing of it is read."""
    root = record.get("root")
    return isinstance(root, str) and not _follows(record) and is_link_outside(path, root)


class _Cache:
    """A bounded least-recently-used map, safe to share between threads (a value is
    loaded outside the lock; two threads may both load it, one copy is kept)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, load, fresh=None):
        """The value of ``key``, loaded with ``load()`` when missing or when ``fresh``
        (given the cached value) says it is stale."""
        with self._lock:
            if key in self._items and (fresh is None or fresh(self._items[key])):
                self._items.move_to_end(key)
                return self._items[key]
        value = load()
        with self._lock:
            cached = self._items.get(key)
            if cached is None or (fresh is not None and not fresh(cached)):
                self._items[key] = cached = value
            value = cached
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


def _positional_row(
    record: Mapping, path: Path, sample_key: str, start: int, stop: int
) -> int | None:
    """The row of a key ``{prefix}/{row}`` embed gives rows of a table without key column
    (the prefix: the table's name, or its path in a ``DatasetDict``)."""
    prefix, _, tail = sample_key.rpartition("/")
    if not tail.isdigit() or not tail.isascii():
        return None
    recorded = record.get("key_prefix")
    if isinstance(recorded, str) and recorded:
        if prefix != recorded:
            return None
    elif prefix != path.stem and not prefix.endswith(f"/{path.stem}"):
        return None
    row = int(tail)
    return row if start <= row < stop else None


class _Table:
    """One parquet or Arrow table, read a column range or a cell at a time (parquet by
    row group, Arrow memory-mapped)."""

    def __init__(self, path: Path, stamp: tuple[int, ...] = ()) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.stamp = stamp  # the file's (device, inode, size, mtime, ctime) when opened
        if path.suffix == ".parquet":
            self._parquet = pq.ParquetFile(path)
            self._arrow = None
            self.schema = self._parquet.schema_arrow
            self.num_rows = self._parquet.metadata.num_rows
        else:
            self._parquet = None
            self._arrow = open_table(path)
            self.schema = self._arrow.schema
            self.num_rows = self._arrow.num_rows

    def column_range(self, column: str, start: int, stop: int):
        """Rows ``start:stop`` of ``column`` as one Arrow array."""
        import pyarrow as pa

        if self._arrow is not None:
            return self._arrow.column(column).slice(start, stop - start).combine_chunks()
        pieces, first = [], 0
        metadata = self._parquet.metadata
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if first < stop and first + rows > start:
                cells = self._parquet.read_row_group(group, columns=[column]).column(0)
                lo, hi = max(start - first, 0), min(stop - first, rows)
                pieces.append(cells.slice(lo, hi - lo))
            first += rows
        if not pieces:
            return pa.array([], self.schema.field(column).type)
        return pa.chunked_array(pieces, self.schema.field(column).type).combine_chunks()

    def cell(self, column: str, row: int):
        """The Python value of one cell."""
        return self.column_range(column, row, row + 1)[0].as_py()
