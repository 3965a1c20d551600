"""Image sources cut into parts: webdataset shards, image folders, parquet / Arrow tables.

A *part* is the unit of work of ``starkret.embed``: it becomes one output file pair
(``img_emb_{i}.npy`` + ``metadata_{i}.parquet``), is written atomically, and is what a
resumed run skips or redoes. A shard is one part; folders and tables are cut into
parts of ``chunk_size`` images, in a stable order, so part ``i`` always means the
same images.

Inputs are untrusted, and nothing outside an input is read unless the user says so
(one rule, :func:`starkret.store.images.read_file_inside`, which the readers of image
bytes behind ``serve`` apply too):

- an image folder's file (and its ``.txt`` / ``.json`` sidecar) that is a symlink
  resolving outside the folder is a per-sample failure ``outside input: ...`` and is
  never opened (a sidecar is then simply absent); links that stay inside are followed;
- a table cell's path (a Hugging Face image struct ``{"bytes": null, "path": P}`` or a
  path string, relative to the table file's folder, or absolute) is read only if it
  resolves to a regular file inside the dataset's own folder (the folder given as
  input, or the table file's folder): ``unsafe path: ...`` when ``P`` itself leaves it,
  ``outside input: ...`` when a link inside it leads out;
- a shard found by listing a folder (an img2dataset webdataset folder, or the wildcards
  of a glob: the folder before the first wildcard) that links out of it is one failure
  ``outside input: ...`` for the shard; shards named by path or brace range are the
  user's own choice and read wherever they point.

``follow_links=True`` (``embed --follow-links``) follows every such link instead; each
part's ``part_inputs`` record in the manifest says so, and ``serve`` then reads the same
files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import starkret._core as _core
from starkret.errors import InvalidInputError, NotFoundError
from starkret.ingest.preprocess import OutputPool, ShardBatch, preprocess, preprocess_shards
from starkret.ingest.shards import DEFAULT_MAX_MEMBER_BYTES, expand_shard_paths
from starkret.store.images import (
    IMAGE_SUFFIXES,
    cell_image_bytes,
    is_link_outside,
    open_table,
    read_file_inside,
    resolve_columns,
)

__all__ = ["IMAGE_SUFFIXES", "Part", "PreprocessOptions", "input_format", "plan_parts"]

_TABLE_SUFFIXES = (".parquet", ".arrow")


@dataclass(frozen=True)
class PreprocessOptions:
    """How a part's images are turned into model input."""

    size: int = 336
    mode: str = "exact"
    dtype: str = "float32"
    batch_size: int = 256
    threads: int | None = None
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    #: "chw" (3, S, S) or, for uint8 crops only, "hwc" (S, S, 3): the Rust core's layout,
    #: for towers that normalise on the device (``embedder.accepts_uint8``).
    layout: str = "chw"

    def preprocess_kwargs(self) -> dict:
        """The keyword arguments ``preprocess`` and ``preprocess_shards`` share."""
        return {
            "size": self.size,
            "mode": self.mode,
            "dtype": self.dtype,
            "threads": self.threads,
            "mean": self.mean,
            "std": self.std,
            "layout": self.layout,
        }

    def for_model(self, embedder) -> PreprocessOptions:
        """These options with the pixel format (:func:`input_format`) and batch size of
        ``embedder`` (a worker's, built from the driver's settings)."""
        dtype, layout = input_format(embedder)
        batch_size = getattr(embedder, "batch_size", None) or self.batch_size
        return replace(self, dtype=dtype, layout=layout, batch_size=batch_size)


def input_format(embedder) -> tuple[str, str]:
    """The pixels ``embedder`` is fed: ``(dtype, layout)`` of :class:`PreprocessOptions`.

    On CUDA, uint8 crops in the Rust core's HWC layout when the tower normalises on
    the device (``embedder.accepts_uint8``: a quarter of float32's bytes over the bus,
    no CPU normalisation), else float16 (half the bytes; the model runs in half
    precision there anyway). On CPU float32: the model reads it as is (a uint8 lookup
    costs more there than it saves).
    """
    if getattr(embedder.device, "type", "cpu") != "cuda":
        return "float32", "chw"
    if getattr(embedder, "accepts_uint8", False):
        return "uint8", "hwc"
    return "float16", "chw"


@dataclass(frozen=True)
class Part:
    """One unit of work: a shard, a chunk of a folder, or a row range of a table."""

    kind: str  # "shard" | "files" | "table"
    path: str  # the shard, the folder root, or the table file
    name: str  # what the metadata's `shard` column says
    members: tuple[str, ...] = ()  # files: relative paths
    start: int = 0  # table: first row
    stop: int = 0  # table: one past the last row
    #: table: the dataset folder its image paths must stay inside; shard: the folder it
    #: was listed from (a webdataset folder, a glob's), "" for a shard named by the user
    root: str = ""
    # Not part of the identity (``describe``), so folders embedded before them resume:
    #: table: resolved (image, caption, key, url, status) columns; files: unused
    columns: tuple[str | None, ...] = ()
    #: table: what positional keys start with (``train/data-00000-of-00001``)
    key_prefix: str = ""
    #: files: "img2dataset" -> key = file stem, url from the KEY.json sidecar
    layout: str = ""
    #: follow links out of the input (``embed(follow_links=True)``), else they fail
    follow_links: bool = False

    def describe(self) -> str:
        """A stable one-line identity, recorded in the manifest to detect changed inputs."""
        if self.kind == "files":
            return f"files:{self.path}:{self.members[0]}..{self.members[-1]}:{len(self.members)}"
        if self.kind == "table":
            return f"table:{self.path}:{self.start}:{self.stop}"
        return f"shard:{self.path}"

    def input_record(self) -> dict:
        """Where this part's images are, for the manifest's ``part_inputs``: what
        :class:`starkret.store.images.ImageReader` needs to read one back by key."""
        record: dict = {"kind": self.kind, "path": self.path}
        if self.kind == "files" and self.layout:
            record["layout"] = self.layout
        if self.kind == "shard" and self.root:
            record["root"] = self.root
        if self.follow_links:
            record["follow_links"] = True
        if self.kind == "table":
            record.update(start=self.start, stop=self.stop, root=self.root)
            if self.columns:
                record["columns"] = {"image": self.columns[0], "key": self.columns[2]}
            record["key_prefix"] = self.key_prefix or Path(self.path.rsplit("#", 3)[0]).stem
        return record

    def batches(self, options: PreprocessOptions) -> Iterator[ShardBatch]:
        """Preprocessed batches of this part, prepared ahead of the consumer."""
        if self.kind == "shard":
            if self.root and not self.follow_links and is_link_outside(self.path, self.root):
                return iter([_refused_shard(self, options)])
            return iter(
                preprocess_shards(
                    self.path,
                    batch_size=options.batch_size,
                    per_shard=True,
                    **options.preprocess_kwargs(),
                )
            )
        return _prefetched(self._raw_batches(options.batch_size), options)

    def _raw_batches(self, batch_size: int) -> Iterator[_RawBatch]:
        if self.kind == "files":
            yield from _file_batches(self, batch_size)
        else:
            yield from _table_batches(self, batch_size)


@dataclass
class _RawBatch:
    """Encoded images and their metadata, before preprocessing."""

    images: list[bytes]
    keys: list[str]
    captions: list[str | None]
    shard: str
    failures: list[tuple[str, str | None, str]]
    urls: list[str | None] = field(default_factory=list)


def plan_parts(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    chunk_size: int = 10_000,
    image_column: str | None = None,
    caption_column: str | None = None,
    key_column: str | None = None,
    source: str | None = None,
    follow_links: bool = False,
) -> list[Part]:
    """Cut ``inputs`` into parts, in a stable order.

    Each input is a shard pattern (paths, globs, brace ranges of ``.tar`` files), an
    image folder (searched recursively; key = path relative to the folder; a
    ``KEY.txt`` beside an image is its caption), a ``.parquet``/``.arrow`` file, a
    folder of them (a Hugging Face dataset or ``DatasetDict`` saved with
    ``save_to_disk`` or exported to parquet), or a folder img2dataset wrote (any
    output format, :mod:`starkret.ingest.known`).

    Table columns: the flags win; then the columns of a known ``source``
    (``KNOWN_SOURCES``) where present; then by type (a Hugging Face ``Image`` struct
    or a binary column holds the image, before a string column named ``image``) and
    by name.

    ``follow_links`` follows symlinks that lead out of an input (see the module's
    docstring); by default such a file is a failure ``outside input``.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise InvalidInputError("no input given")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InvalidInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
    from starkret.ingest.known import KNOWN_SOURCES, img2dataset_format

    columns = {"image": image_column, "caption": caption_column, "key": key_column}
    known = KNOWN_SOURCES.get(source or "")
    hints = {"image": known.image, "caption": known.caption, "key": known.key} if known else {}
    parts: list[Part] = []
    for item in inputs:
        text = os.fspath(item)
        path = Path(text)
        layout = img2dataset_format(path) if path.is_dir() else None
        if layout == "webdataset":
            for shard in sorted(path.glob("*.tar")):
                parts.append(
                    Part("shard", os.path.abspath(shard), shard.name, root=os.path.abspath(path))
                )
        elif layout == "files":
            parts.extend(_folder_parts(path, chunk_size, layout="img2dataset"))
        elif layout == "parquet":
            tables = sorted(path.glob("*.parquet"))
            prefixes = _key_prefixes(tables, path)
            for table in tables:
                parts.extend(_table_parts(table, chunk_size, columns, hints, path, prefixes[table]))
        elif path.is_dir():
            tables = sorted(p for p in path.rglob("*") if p.suffix in _TABLE_SUFFIXES)
            if tables:
                prefixes = _key_prefixes(tables, path)
                for table in tables:
                    parts.extend(
                        _table_parts(table, chunk_size, columns, hints, path, prefixes[table])
                    )
            else:
                parts.extend(_folder_parts(path, chunk_size))
        elif path.suffix in _TABLE_SUFFIXES and path.is_file():
            parts.extend(_table_parts(path, chunk_size, columns, hints, path.parent, path.stem))
        else:
            listed = _glob_root(text)
            for shard in expand_shard_paths(text):
                root = os.path.abspath(listed) if listed is not None else ""
                parts.append(Part("shard", os.path.abspath(shard), Path(shard).name, root=root))
    seen: set[str] = set()
    unique = []
    for part in parts:
        if part.describe() not in seen:
            seen.add(part.describe())
            unique.append(replace(part, follow_links=True) if follow_links else part)
    return unique


def _glob_root(pattern: str) -> str | None:
    """The folder a shard glob lists (its path before the first component with a
    wildcard or brace), or None for a pattern without wildcards (paths and brace ranges
    name their files)."""
    if not any(c in pattern for c in "*?["):
        return None
    fixed = []
    for component in pattern.split("/"):
        if any(c in component for c in "*?[{"):
            break
        fixed.append(component)
    return "/".join(fixed) or ("/" if pattern.startswith("/") else ".")


def _refused_shard(part: Part, options: PreprocessOptions) -> ShardBatch:
    """The one batch of a shard that links out of the folder it was listed from."""
    import numpy as np

    size = options.size
    shape = (0, size, size, 3) if options.layout == "hwc" else (0, 3, size, size)
    reason = (
        f"outside input: {part.name!r} is a link to a file outside {part.root} "
        "(follow_links / --follow-links follows it)"
    )
    return ShardBatch(
        pixels=np.zeros(shape, options.dtype),
        keys=[],
        shards=[],
        captions=[],
        urls=[],
        jsons=[],
        widths=[],
        heights=[],
        failures=[(part.name, None, reason)],
    )


# ==== Image folders ====


def _key_prefixes(tables: list[Path], root: Path) -> dict[Path, str]:
    """Positional keys start with the table's name (``data-00000-of-00001``), or with its
    path under ``root`` where names repeat (a ``DatasetDict``: ``train/data-...``)."""
    stems = [t.stem for t in tables]
    if len(set(stems)) == len(stems):
        return {t: t.stem for t in tables}
    return {t: t.relative_to(root).with_suffix("").as_posix() for t in tables}


def _folder_parts(root: Path, chunk_size: int, layout: str = "") -> list[Part]:
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise NotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    root_text = os.path.abspath(root)
    return [
        Part(
            "files",
            root_text,
            f"{root.name}/{i // chunk_size:05d}",
            tuple(files[i : i + chunk_size]),
            layout=layout,
        )
        for i in range(0, len(files), chunk_size)
    ]


def _file_batches(part: Part, batch_size: int) -> Iterator[_RawBatch]:
    for start in range(0, len(part.members), batch_size):
        batch = _RawBatch([], [], [], part.name, [])
        for rel in part.members[start : start + batch_size]:
            data = _read_inside(part, rel, DEFAULT_MAX_MEMBER_BYTES)
            if isinstance(data, str):
                batch.failures.append((part.name, rel, data))
                continue
            stem = os.path.splitext(rel)[0]
            caption = _read_inside(part, f"{stem}.txt", DEFAULT_MAX_MEMBER_BYTES)
            url = None
            if part.layout == "img2dataset":  # key without folder and extension, as in its tars
                url = _sidecar_url(_read_inside(part, f"{stem}.json", _MAX_SIDECAR_BYTES))
            batch.images.append(data)
            batch.keys.append(Path(rel).stem if part.layout == "img2dataset" else rel)
            batch.captions.append(_text(caption) if isinstance(caption, bytes) else None)
            batch.urls.append(url)
        yield batch


#: Largest img2dataset ``KEY.json`` sidecar read.
_MAX_SIDECAR_BYTES = 1 << 20


def _read_inside(part: Part, rel: str, max_bytes: int) -> bytes | str:
    """A file of a folder part (by the one rule: :func:`read_file_inside`), or the reason."""
    return read_file_inside(rel, part.path, max_bytes=max_bytes, follow_links=part.follow_links)


def _text(data: bytes) -> str:
    """A caption sidecar as text, as ``Path.read_text`` reads it (newlines universal)."""
    text = data.decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _sidecar_url(data: bytes | str) -> str | None:
    """The ``url`` of an img2dataset ``KEY.json`` sidecar (None if absent or unreadable)."""
    import json

    if isinstance(data, str):
        return None
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    url = meta.get("url") if isinstance(meta, dict) else None
    return url if isinstance(url, str) else None


# ==== Tables (parquet, Arrow / Hugging Face save_to_disk) ====


def _table_parts(
    path: Path,
    chunk_size: int,
    columns: dict[str, str | None],
    hints: dict[str, str | None],
    root: Path,
    prefix: str,
) -> list[Part]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            rows = pq.ParquetFile(path).metadata.num_rows
            schema = pq.ParquetFile(path).schema_arrow
        else:
            table = open_table(path)
            rows, schema = table.num_rows, table.schema
    except pa.ArrowException as exc:  # ArrowInvalid: not parquet / Arrow, or damaged
        raise InvalidInputError(f"{path}: not a readable table ({exc})"[:300]) from None
    resolved = resolve_columns(schema, columns, hints, path)
    return [
        Part(
            "table",
            f"{os.path.abspath(path)}#{columns['image'] or ''}#{columns['caption'] or ''}"
            f"#{columns['key'] or ''}",
            f"{prefix}/{i // chunk_size:05d}",
            start=i,
            stop=min(i + chunk_size, rows),
            root=os.path.abspath(root),
            columns=resolved,
            key_prefix=prefix,
        )
        for i in range(0, rows, chunk_size)
    ]


def _table_batches(part: Part, batch_size: int) -> Iterator[_RawBatch]:
    file, image_col, caption_col, key_col = part.path.rsplit("#", 3)
    path = Path(file)
    table_dir, root = str(path.parent), part.root or str(path.parent)
    table = open_table(path).slice(part.start, part.stop - part.start)
    if part.columns:
        image_col, caption_col, key_col, url_col, status_col = part.columns
    else:  # a Part made by hand
        explicit = {"image": image_col or None, "caption": caption_col or None}
        explicit["key"] = key_col or None
        image_col, caption_col, key_col, url_col, status_col = resolve_columns(
            table.schema, explicit, {}, path
        )
    prefix = part.key_prefix or path.stem
    for start in range(0, table.num_rows, batch_size):
        chunk = table.slice(start, batch_size)
        n = chunk.num_rows
        images = chunk.column(image_col).to_pylist()
        captions = chunk.column(caption_col).to_pylist() if caption_col else [None] * n
        urls = chunk.column(url_col).to_pylist() if url_col else [None] * n
        status = chunk.column(status_col).to_pylist() if status_col else ["success"] * n
        keys = (
            [str(k) for k in chunk.column(key_col).to_pylist()]
            if key_col
            else [f"{prefix}/{part.start + start + i}" for i in range(n)]
        )
        batch = _RawBatch([], [], [], part.name, [])
        for key, value, caption, url, state in zip(
            keys, images, captions, urls, status, strict=True
        ):
            if state != "success":  # never downloaded: not in the webdataset form either
                continue
            data = cell_image_bytes(
                value, table_dir, root, DEFAULT_MAX_MEMBER_BYTES, follow_links=part.follow_links
            )
            if isinstance(data, str):
                batch.failures.append((part.name, key, data))
                continue
            batch.images.append(data)
            batch.keys.append(key)
            batch.captions.append(None if caption is None else str(caption))
            batch.urls.append(url)
        yield batch


# ==== Prefetching for Python-side sources ====


def _prefetched(
    raw: Iterator[_RawBatch], options: PreprocessOptions, depth: int = 2
) -> Iterator[ShardBatch]:
    """Preprocess raw batches on a helper thread, ``depth`` ahead of the consumer.

    ``preprocess`` releases the GIL, so decoding overlaps the consumer's work. Batches
    are written into pooled arrays (:class:`~starkret.ingest.preprocess.OutputPool`)
    that are reused once the consumer has dropped them, so a long stream does not fault
    in and zero fresh memory for every batch.
    """
    from concurrent.futures import ThreadPoolExecutor

    kwargs = options.preprocess_kwargs()
    pooled = not (kwargs["dtype"] == "uint8" and kwargs["layout"] == "chw")
    outputs = OutputPool(
        size=kwargs["size"], dtype=kwargs["dtype"], layout=kwargs["layout"], limit=depth + 4
    )

    def work(batch: _RawBatch) -> ShardBatch:
        target = outputs.take(len(batch.images)) if pooled and batch.images else None
        out = preprocess(batch.images, **kwargs, out=target)
        del target
        idx = out.index.tolist()
        sizes = [_core.image_dimensions(batch.images[i]) or (None, None) for i in idx]
        failures = list(batch.failures)
        failures += [(batch.shard, batch.keys[pos], reason) for pos, reason in out.failures]
        return ShardBatch(
            pixels=out.pixels,
            keys=[batch.keys[i] for i in idx],
            shards=[batch.shard] * len(idx),
            captions=[batch.captions[i] for i in idx],
            urls=[batch.urls[i] for i in idx] if batch.urls else [None] * len(idx),
            jsons=[None] * len(idx),
            widths=[w for w, _ in sizes],
            heights=[h for _, h in sizes],
            failures=failures,
            fallbacks=[batch.keys[i] for i in out.fallbacks],
        )

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="starkret-prefetch") as pool:
        pending = []
        for batch in raw:
            pending.append(pool.submit(work, batch))
            if len(pending) > depth:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
