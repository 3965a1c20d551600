"""Bytes of DB images, read only from the inputs the DB's manifests record."""

from __future__ import annotations

import os
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

from starkret.index.db import ImageDB
from starkret.serve.schema import RequestError

# ==== Local image bytes ====


_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class ImageStore:
    """Bytes of DB images, read only from the inputs the DB's manifests record."""

    def __init__(self, db: ImageDB, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.db, self.max_bytes = db, max_bytes
        self._tar_index: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
        self._tables: OrderedDict[str, _Table] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, source: str, key: str) -> bytes | None:
        located = self.db.locate(key, [source])
        if located is None:
            raise RequestError(404, f"not found: no image {key!r} in source {source!r}")
        row = located[1]
        part, _ = self.db.part_of(source, row)
        inputs = self.db.source_manifest(source).get("part_inputs") or []
        if part >= len(inputs) or not isinstance(inputs[part], dict):
            return None
        kind, path = inputs[part].get("kind"), inputs[part].get("path")
        if not isinstance(path, str):
            return None
        # embed-shards stores ``{source}/{sample key}``.
        sample_key = key[len(source) + 1 :] if key.startswith(f"{source}/") else key
        try:
            if kind == "files":
                return self._file(path, sample_key)
            if kind == "shard":
                return self._shard(path, sample_key)
            if kind == "table":
                return self._table(path, sample_key)
        except (OSError, ValueError, ImportError):
            return None  # an input that changed or vanished since the DB was built
        return None

    def url(self, source: str, key: str) -> str | None:
        located = self.db.locate(key, [source])
        if located is None:
            return None
        # One row of the source's metadata, read on demand (never the whole column).
        return self.db.metadata(source).take([located[1]], columns=("url",))["url"][0]

    def _file(self, root: str, relative: str) -> bytes | None:
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(real_root, relative))
        if os.path.commonpath([real, real_root]) != real_root or real == real_root:
            return None  # a key naming a file outside the folder the DB was built from
        return _read_regular(real, self.max_bytes)

    def _shard(self, path: str, sample_key: str) -> bytes | None:
        with self._lock:
            index = self._tar_index.get(path)
            if index is None:
                index = self._tar_index[path] = _index_tar(path)
                while len(self._tar_index) > 64:
                    self._tar_index.popitem(last=False)
            self._tar_index.move_to_end(path)
        found = index.get(sample_key)
        if found is None:
            return None
        offset, size = found
        if size > self.max_bytes:
            return None
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _table(self, spec: str, sample_key: str) -> bytes | None:
        file, image_col, _caption_col, key_col = spec.rsplit("#", 3)
        with self._lock:
            table = self._tables.get(file)
            if table is None:
                table = self._tables[file] = _Table(Path(file), image_col, key_col)
                while len(self._tables) > 8:
                    self._tables.popitem(last=False)
            self._tables.move_to_end(file)
        value = table.image_cell(sample_key)
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"])
            if isinstance(value.get("path"), str) and "\0" not in value["path"]:
                return self._file(str(Path(file).parent), value["path"])
        return None


class _Table:
    """A parquet or Arrow table's image cells, found by sample key (row groups read on demand)."""

    def __init__(self, path: Path, image_col: str, key_col: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.stem = path, path.stem
        if path.suffix == ".parquet":
            self._parquet = pq.ParquetFile(path)
            self._table = None
            names = self._parquet.schema_arrow.names
        else:
            self._parquet = None
            with pa.memory_map(str(path)) as source:
                try:
                    self._table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    self._table = None
            if self._table is None:
                with pa.memory_map(str(path)) as source:
                    self._table = pa.ipc.open_file(source).read_all()
            names = self._table.column_names
        self.image_col = image_col if image_col in names else _auto_column(names, "image")
        self.key_col = key_col if key_col in names else _auto_column(names, "key")
        self._rows: dict[str, int] | None = None

    def _row_of(self, sample_key: str) -> int | None:
        if self.key_col is None:
            # embed-shards names rows of a table without key column ``{stem}/{row}``.
            prefix = f"{self.stem}/"
            tail = sample_key[len(prefix) :]
            return int(tail) if sample_key.startswith(prefix) and tail.isdigit() else None
        if self._rows is None:
            if self._parquet is not None:
                keys = self._parquet.read(columns=[self.key_col]).column(0).to_pylist()
            else:
                keys = self._table.column(self.key_col).to_pylist()
            self._rows = {}
            for i, k in enumerate(keys):
                self._rows.setdefault(str(k), i)
        return self._rows.get(sample_key)

    def image_cell(self, sample_key: str):
        row = self._row_of(sample_key)
        if row is None or self.image_col is None:
            return None
        if self._parquet is None:
            return (
                self._table.column(self.image_col)[row].as_py() if row < len(self._table) else None
            )
        metadata = self._parquet.metadata
        start = 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if row < start + rows:
                cells = self._parquet.read_row_group(group, columns=[self.image_col]).column(0)
                return cells[row - start].as_py()
            start += rows
        return None


def _auto_column(names: list[str], kind: str) -> str | None:
    """The column embed-shards picks when none is named (its candidates, in order)."""
    from starkret.ingest import sources

    candidates = {
        "image": getattr(sources, "_IMAGE_COLUMNS", ("image", "img", "jpg", "png")),
        "key": getattr(sources, "_KEY_COLUMNS", ("key", "id", "image_id", "filename")),
    }[kind]
    return next((name for name in candidates if name in names), None)


def _read_regular(path: str, limit: int) -> bytes | None:
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        return f.read(limit + 1)


def _index_tar(path: str) -> dict[str, tuple[int, int]]:
    """``sample key -> (offset, size)`` of the image member of every sample of a shard."""
    out: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            slash = name.rfind("/")
            dot = name.find(".", slash + 1)
            if dot < 0:
                continue
            key, ext = name[:dot], name[dot + 1 :].lower()
            if ext in _IMAGE_EXTS and key not in out:
                out[key] = (member.offset_data, member.size)
                if key.startswith("./"):
                    out.setdefault(key[2:], (member.offset_data, member.size))
    return out


def _media_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:2] == b"BM":
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return "application/octet-stream"
