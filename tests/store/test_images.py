"""The one reader of image bytes (store/images.py): keys and cells never read outside
their folder, tar keys cut as the Rust shard reader cuts them, limits kept."""

from __future__ import annotations

import io
import os
import tarfile
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starkret.ingest.shards import read_shards
from starkret.store.images import (
    ImageReader,
    media_type,
    member_key,
    part_input,
    read_file_inside,
)
from starkret.testing import encode, synthetic_photo

PNG = encode(synthetic_photo(16, 12, seed=1), "PNG")


@pytest.fixture
def folder(tmp_path):
    """``tmp_path/data`` with one image, and a secret beside it (outside the folder)."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    return data


@pytest.mark.parametrize(
    "key",
    ["../secret.png", "sub/../../secret.png", "{secret}", "sub/out.png", "", ".", "sub/\0x.png"],
)
def test_a_key_escaping_the_folder_returns_none(folder, key):
    (folder / "sub" / "out.png").symlink_to(folder.parent / "secret.png")
    key = key.replace("{secret}", str(folder.parent / "secret.png"))  # absolute
    reader = ImageReader()
    assert reader.read({"kind": "files", "path": str(folder)}, "sub/a.png") == PNG
    assert reader.read({"kind": "files", "path": str(folder)}, key) is None


def test_a_symlinked_folder_or_file_inside_the_root_still_reads(folder):
    (folder / "alias.png").symlink_to(folder / "sub" / "a.png")
    (folder / "dir").symlink_to(folder / "sub")
    reader = ImageReader()
    for key in ("alias.png", "dir/a.png"):
        assert reader.read({"kind": "files", "path": str(folder)}, key) == PNG


def test_fifos_directories_and_files_over_the_limit_are_refused_without_hanging(folder):
    os.mkfifo(folder / "pipe.png")
    done = []
    worker = threading.Thread(
        target=lambda: done.append(read_file_inside("pipe.png", str(folder))), daemon=True
    )
    worker.start()
    worker.join(timeout=10)
    assert done and done[0].startswith("unreadable:")
    assert read_file_inside("sub", str(folder)).startswith("unreadable:")
    assert read_file_inside("sub/a.png", str(folder), max_bytes=len(PNG) - 1).startswith(
        "too large:"
    )
    assert (
        ImageReader(max_bytes=len(PNG) - 1).read(
            {"kind": "files", "path": str(folder)}, "sub/a.png"
        )
        is None
    )


def test_a_table_cell_path_outside_the_dataset_folder_is_never_read(folder, tmp_path):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [
        {"bytes": None, "path": "sub/a.png"},
        {"bytes": None, "path": "../secret.png"},
        {"bytes": None, "path": str(tmp_path / "secret.png")},
    ]
    pq.write_table(
        pa.table({"key": ["in", "up", "abs"], "image": pa.array(cells, image)}),
        folder / "t.parquet",
    )
    reader = ImageReader()
    record = {"kind": "table", "path": f"{folder / 't.parquet'}###"}
    assert reader.read(record, "in") == PNG
    assert reader.read(record, "up") is None
    assert reader.read(record, "abs") is None
    assert reader.read(record, "missing") is None
    # the recorded root bounds it, not the table's folder
    assert reader.read({**record, "root": str(folder / "other")}, "in") is None


def test_tar_member_keys_are_cut_as_the_rust_shard_reader_cuts_them(tmp_path):
    names = [
        "./a.jpg",
        "./a.txt",
        "d/.x.JPG",
        "b.c.png",
        "e.seg.png",
        "f.txt",
        "f.jpg",
        ".hidden.jpg",
        "noext",
        "g.tar.gz.webp",
        "h.json",
        "h.JPEG",
        "a.jpg",
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, name in enumerate(names):
            data = f"{i}:{name}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = tmp_path / "s.tar"
    shard.write_bytes(buf.getvalue())
    expected = {s.key: s.image for s in read_shards(str(shard))}
    assert "./a" in expected and "a" in expected  # the ./ stays part of the key
    reader = ImageReader()
    for key, image in expected.items():
        assert reader.read({"kind": "shard", "path": str(shard)}, key) == image, key
    for key in ("a.jpg", ".hidden", "noext", "x", "./b"):
        assert reader.read({"kind": "shard", "path": str(shard)}, key) is None
    assert member_key("./000012.jpg") == ("./000012", "jpg")
    assert member_key("d.e/.x.jpg") is None


def test_an_input_that_vanished_or_is_damaged_reads_as_none(tmp_path):
    reader = ImageReader()
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    for record, key in (
        ({"kind": "shard", "path": str(tmp_path / "gone.tar")}, "a"),
        ({"kind": "shard", "path": str(tmp_path / "bad.tar")}, "a"),
        ({"kind": "table", "path": f"{tmp_path / 'bad.parquet'}###"}, "t/0"),
        ({"kind": "files", "path": str(tmp_path / "gone")}, "a.png"),
        ({"kind": "unknown", "path": str(tmp_path)}, "a"),
        ({"kind": "files"}, "a"),
    ):
        assert reader.read(record, key) is None


def test_part_input_takes_the_row_range_of_old_manifests_from_the_part_list():
    manifest = {
        "part_inputs": [{"kind": "table", "path": "/d/t.parquet###"}, "junk"],
        "parts": ["table:/d/t.parquet###:10:20", "x"],
    }
    assert part_input(manifest, 0) == {
        "kind": "table",
        "path": "/d/t.parquet###",
        "start": 10,
        "stop": 20,
    }
    assert part_input(manifest, 1) is None and part_input(manifest, 2) is None
    assert part_input({}, 0) is None


def test_media_type_comes_from_the_bytes():
    assert media_type(PNG) == "image/png"
    assert media_type(encode(synthetic_photo(8, 8), "JPEG")) == "image/jpeg"
    assert media_type(encode(synthetic_photo(8, 8), "WEBP")) == "image/webp"
    assert media_type(b"RIFF....AVI ") == "application/octet-stream"


def test_img2dataset_files_are_found_by_stem_with_or_without_the_recorded_layout(tmp_path):
    (tmp_path / "00000").mkdir()
    (tmp_path / "00000" / "000000003.jpg").write_bytes(PNG)
    (tmp_path / "00000" / "000000003.json").write_text("{}")
    reader = ImageReader()
    for record in (
        {"kind": "files", "path": str(tmp_path), "layout": "img2dataset"},
        {"kind": "files", "path": str(tmp_path)},  # a manifest from before layouts
    ):
        assert reader.read(record, "000000003") == PNG
        assert reader.read(record, "000000004") is None
        assert reader.read(record, "..") is None
