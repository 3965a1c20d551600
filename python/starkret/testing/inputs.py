"""Small inputs of every kind ``embed`` reads, each with the bytes of its images by key.

For the tests that read images back from a DB (``GET /image``, ``align --report``, the
stark-image export): image folders (nested, and img2dataset's files layout), webdataset
shards (members named ``./KEY.jpg``, and a gzipped shard), parquet and Arrow tables,
a ``DatasetDict`` saved with ``save_to_disk`` (several splits, positional keys), an
id-keyed table, a Stark source's Hugging Face schema (MathVision: the image in a struct
column beside a path string column) and a table whose image cells are ``{bytes: None,
path}`` with a path relative to the table.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from starkret.testing import encode, synthetic_photo

__all__ = ["InputKind", "embed_every_input_kind", "save_to_disk", "write_every_input_kind"]


@dataclass
class InputKind:
    """One source's inputs, what to pass to ``embed``, and its images' bytes by sample key."""

    source: str
    inputs: str
    images: dict[str, bytes] = field(default_factory=dict)
    embed_options: dict = field(default_factory=dict)


def save_to_disk(table, folder: Path) -> None:
    """What ``datasets.Dataset.save_to_disk`` writes: an Arrow stream plus its JSON files."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (folder / "dataset_info.json").write_text("{}")


def _photo(seed: int, fmt: str = "PNG") -> bytes:
    return encode(synthetic_photo(40, 32, seed=seed), fmt)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_every_input_kind(root: Path) -> list[InputKind]:
    """Write one small source of every input kind under ``root`` (distinct images
    everywhere: no two sources share bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seeds = iter(range(1000, 2000))
    kinds: list[InputKind] = []

    # An image folder, nested, JPEG and PNG.
    folder = InputKind("folder", str(root / "folder"))
    for rel, fmt in (("a.jpg", "JPEG"), ("png/b.png", "PNG"), ("png/deep/c.png", "PNG")):
        path = root / "folder" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(folder.images.setdefault(rel, _photo(next(seeds), fmt)))
    kinds.append(folder)

    # img2dataset's files layout: NNNNN/KEY.jpg + KEY.json, NNNNN_stats.json; key = stem.
    i2d = InputKind("i2dfiles", str(root / "i2dfiles"))
    (root / "i2dfiles" / "00000").mkdir(parents=True)
    (root / "i2dfiles" / "00000_stats.json").write_text("{}")
    for i in range(2):
        key = f"00000{i:04d}"
        base = root / "i2dfiles" / "00000" / key
        base.with_suffix(".jpg").write_bytes(i2d.images.setdefault(key, _photo(next(seeds))))
        base.with_suffix(".json").write_text(json.dumps({"url": f"https://x.test/{key}"}))
    kinds.append(i2d)

    # webdataset shards: members named ./KEY.jpg, and a gzipped shard.
    shards = InputKind("shards", f"{root}/shards/{{00000..00001}}.tar*")
    (root / "shards").mkdir()
    dotted = []
    for i in range(3):
        data = shards.images.setdefault(f"./s{i}", _photo(next(seeds), "JPEG"))
        dotted += [(f"./s{i}.jpg", data), (f"./s{i}.txt", f"shard photo {i}".encode())]
    (root / "shards" / "00000.tar").write_bytes(_tar(dotted))
    plain = [(f"g{i}.png", shards.images.setdefault(f"g{i}", _photo(next(seeds)))) for i in (0, 1)]
    (root / "shards" / "00001.tar.gz").write_bytes(gzip.compress(_tar(plain)))
    kinds.append(shards)

    # A parquet table without key column (keys ``photos/ROW``), several row groups and parts.
    table = InputKind("parquet", str(root / "photos.parquet"), embed_options={"chunk_size": 2})
    photos = [_photo(next(seeds)) for _ in range(5)]
    table.images = {f"photos/{i}": p for i, p in enumerate(photos)}
    pq.write_table(
        pa.table({"image": photos, "caption": [f"p{i}" for i in range(5)]}),
        root / "photos.parquet",
        row_group_size=2,
    )
    kinds.append(table)

    # An Arrow IPC *file* keyed by an integer id column.
    ids = InputKind("arrow", str(root / "keyed.arrow"))
    id_photos = [_photo(next(seeds)) for _ in range(3)]
    ids.images = {str(100 + i): p for i, p in enumerate(id_photos)}
    keyed = pa.table({"id": [100, 101, 102], "jpg": id_photos})
    with (
        pa.OSFile(str(root / "keyed.arrow"), "wb") as sink,
        pa.ipc.new_file(sink, keyed.schema) as writer,
    ):
        writer.write_table(keyed)
    kinds.append(ids)

    # A DatasetDict saved with save_to_disk: two splits, Image structs, positional keys.
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    dd = InputKind("datasetdict", str(root / "chartqa"), embed_options={"chunk_size": 2})
    (root / "chartqa").mkdir()
    (root / "chartqa" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for split in ("train", "test"):
        cells = [{"bytes": _photo(next(seeds)), "path": f"{i}.png"} for i in range(3)]
        for i, cell in enumerate(cells):
            dd.images[f"{split}/data-00000-of-00001/{i}"] = cell["bytes"]
        save_to_disk(
            pa.table(
                {
                    "image": pa.array(cells, image_type),
                    "query": [f"{split} chart {i}" for i in range(3)],
                }
            ),
            root / "chartqa" / split,
        )
    kinds.append(dd)

    # MathVision's schema: id key, ``image`` a path string, ``decoded_image`` the struct.
    mv = InputKind("mathvision", str(root / "testmini.parquet"))
    cells = [{"bytes": _photo(next(seeds)), "path": f"{i}.png"} for i in range(2)]
    mv.images = {str(i + 1): c["bytes"] for i, c in enumerate(cells)}
    pq.write_table(
        pa.table(
            {
                "id": [str(i + 1) for i in range(2)],
                "question": ["area?", "angle?"],
                "image": [f"images/{i + 1}.jpg" for i in range(2)],
                "decoded_image": pa.array(cells, image_type),
            }
        ),
        root / "testmini.parquet",
    )
    kinds.append(mv)

    # Image cells {bytes: None, path} relative to the table, inside the dataset folder.
    rel = InputKind("relpath", str(root / "relpath"))
    (root / "relpath" / "data").mkdir(parents=True)
    (root / "relpath" / "files").mkdir()
    names = []
    for i in range(2):
        data = _photo(next(seeds))
        (root / "relpath" / "files" / f"r{i}.png").write_bytes(data)
        rel.images[f"r{i}"] = data
        names.append(f"r{i}")
    pq.write_table(
        pa.table(
            {
                "key": names,
                "image": pa.array(
                    [{"bytes": None, "path": f"../files/{n}.png"} for n in names], image_type
                ),
            }
        ),
        root / "relpath" / "data" / "train.parquet",
    )
    kinds.append(rel)
    return kinds


def embed_every_input_kind(root: Path, embedder) -> tuple[Path, dict[str, dict[str, bytes]]]:
    """:func:`write_every_input_kind` under ``root/inputs``, each embedded as its own source
    of the DB ``root/db``: ``(db folder, {source: {DB key: image bytes}})``."""
    from starkret.ingest.embed import embed

    images: dict[str, dict[str, bytes]] = {}
    for kind in write_every_input_kind(root / "inputs"):
        report = embed(
            kind.inputs,
            root / "db" / kind.source,
            source_name=kind.source,
            embedder=embedder,
            progress=False,
            **kind.embed_options,
        )
        if (report.embedded, report.failed) != (len(kind.images), 0):
            counts = f"{report.embedded} embedded, {report.failed} failed"
            raise AssertionError(f"{kind.source}: {counts} of {len(kind.images)}")
        images[kind.source] = {f"{kind.source}/{k}": v for k, v in kind.images.items()}
    return root / "db", images
