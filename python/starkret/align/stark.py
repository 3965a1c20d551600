"""Stark's release conventions (the stark-dialogue, stark-image and stark-image-url cards).

* ``session<N>:images_key`` holds the shared image's own key: a UUID per shared image,
  prefixed ``url:`` when the image lives in stark-image-url (CC12M, RedCaps12M: only its
  URL is released). starkret derives the UUID from the moment (``uuid5`` of the
  episode's moment id and the image's position in the turn), so a re-run writes the
  same keys.
* stark-image-url records are ``{image_source, image_url, index}`` with ``index`` the
  UUID; stark-image holds the other sources' bytes as webdataset tars whose sample key
  is the UUID (:func:`export_images`).
* Only moments routed to retrieval are filled: a turn whose ``images_module_name`` is
  already ``p-t2i``, ``t2i`` or ``web`` keeps its image (``fill`` chooses the modules).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from starkret._io import atomic_path, atomic_write
from starkret.store.images import image_extension

__all__ = [
    "DEFAULT_FILL",
    "STARK_NAMESPACE",
    "export_images",
    "stark_image_key",
    "stark_record",
    "write_parquet",
]

#: Namespace of starkret's image UUIDs (uuid5 of a fixed name: the same on every machine).
STARK_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/starkret/images")
#: Modules whose turns align fills by default: retrieval, and turns with no module yet.
DEFAULT_FILL = ("retrieval", "")
#: Sources released in stark-image-url (URL only), keyed ``url:<uuid>``.
URL_SOURCES = frozenset({"cc12m", "redcaps12m"})


def stark_image_key(moment_id: str, position: int, source: str) -> str:
    """The images_key of the ``position``-th image of a moment (stable across runs)."""
    key = str(uuid.uuid5(STARK_NAMESPACE, f"{moment_id}#{position}"))
    return f"url:{key}" if source in URL_SOURCES else key


def stark_record(image_key: str, candidate) -> dict:
    """The image record of a chosen candidate: Stark's ``{image_source, image_url, index}``
    (``index`` = the UUID), plus ``key`` (the images_key) and ``db_key`` (where it is in
    the starkret DB)."""
    return {
        "key": image_key,
        "image_source": candidate.source,
        "image_url": candidate.url,
        "index": image_key.removeprefix("url:"),
        "db_key": candidate.key,
    }


# ==== stark-image-style tars of the chosen local images ====


def export_images(
    db,
    records: Iterable[dict],
    out_dir: str | os.PathLike,
    per_tar: int = 10_000,
    *,
    before_write: Callable[[Path], object] | None = None,
):
    """Write the chosen images of local sources (not CC12M/RedCaps12M) as stark-image-style
    webdataset tars: ``{uuid}.{ext}`` + ``{uuid}.json`` (``{image_source, index}``).

    ``before_write(path)`` is called with each tar's path before it is written (the CLI
    records it in the output's state file, which refuses a tar it did not write).
    Returns (written, problems): problems are one-line reasons for images whose bytes
    could not be found (the inputs moved since they were embedded).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, problems, tar, shard = 0, [], None, 0
    seen: set[str] = set()
    # Each tar appears under its name once complete (closed, then published by the stack).
    with contextlib.ExitStack() as open_tar:
        for record in records:
            if record["image_source"] in URL_SOURCES or record["index"] in seen:
                continue
            seen.add(record["index"])
            data = db.image_bytes(record["image_source"], record["db_key"])
            if data is None:
                problems.append(
                    f"{record['db_key']}: no local bytes (not in the DB's source "
                    f"{record['image_source']!r}, or its input changed since it was embedded)"
                )
                continue
            ext = image_extension(data)
            if tar is None or (written % per_tar == 0 and written):
                open_tar.close()  # the previous tar: closed and published
                target = out / f"{shard:05d}.tar"
                if before_write is not None:
                    before_write(target)
                tmp = open_tar.enter_context(atomic_path(target))
                tar = open_tar.enter_context(tarfile.open(tmp, "w"))
                shard += 1
            meta = json.dumps({"image_source": record["image_source"], "index": record["index"]})
            for name, body in (
                (f"{record['index']}.{ext}", data),
                (f"{record['index']}.json", meta.encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
            written += 1
    return written, problems


# ==== parquet ====


def write_parquet(jsonl_path: str | os.PathLike, parquet_path: str | os.PathLike) -> Path:
    """The aligned JSONL as one parquet file (stark-dialogue ships ``stark.parquet``).

    Columns whose values do not share one Arrow type (a turn with several images next
    to turns with one) are stored as JSON text.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    names: list[str] = []
    for row in rows:
        names.extend(n for n in row if n not in names)
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            columns[name] = pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False) for v in values],
                pa.string(),
            )
    table = pa.table(columns)
    return atomic_write(parquet_path, lambda f: pq.write_table(table, f))
