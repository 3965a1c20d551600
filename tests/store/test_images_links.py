"""The link rule of the one reader of image bytes (store/images.py, issue 24 item 5):
a symlink out of an input is ``outside input`` and never read, unless the input was
embedded with ``follow_links=True``; a path that leaves the input by its name is
``unsafe path`` either way. serve's ``/image``, the report and the export read through
:class:`ImageReader` (``ImageDB.image_bytes``), so they serve exactly what embed read."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starkret.store.images import ImageReader, cell_image_bytes, read_file_inside
from starkret.testing import encode, synthetic_photo

PNG = encode(synthetic_photo(16, 12, seed=1), "PNG")
SECRET = b"\x89PNG\r\n\x1a\nsecret"


@pytest.fixture
def folder(tmp_path):
    """``tmp_path/data`` with an image, a link inside, and links to a file outside."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(SECRET)
    (data / "alias.png").symlink_to(data / "sub" / "a.png")
    (data / "out.png").symlink_to(tmp_path / "secret.png")
    (data / "dir").symlink_to(tmp_path)
    return data


def test_a_link_out_of_the_folder_is_outside_input_unless_followed(folder):
    root = str(folder)
    for key in ("out.png", "dir/secret.png"):
        assert read_file_inside(key, root).startswith("outside input: "), key
        assert read_file_inside(key, root, follow_links=True) == SECRET
    assert read_file_inside("alias.png", root) == PNG  # inside: followed as ever
    for key in ("../secret.png", str(folder.parent / "secret.png")):  # out by its name
        assert read_file_inside(key, root, follow_links=True).startswith("unsafe path: ")


def test_the_reader_serves_a_link_out_only_for_an_input_embedded_following_links(folder):
    reader = ImageReader()
    record = {"kind": "files", "path": str(folder)}
    assert reader.read(record, "alias.png") == PNG
    assert reader.read(record, "out.png") is None
    assert reader.read({**record, "follow_links": True}, "out.png") == SECRET
    assert reader.read({**record, "follow_links": "yes"}, "out.png") is None  # only True
    assert reader.read({**record, "follow_links": True}, "../secret.png") is None


def test_table_cells_follow_the_same_rule(folder):
    struct = {"bytes": None, "path": "out.png"}
    assert cell_image_bytes(struct, str(folder), str(folder)).startswith("outside input: ")
    assert cell_image_bytes("out.png", str(folder), str(folder), follow_links=True) == SECRET
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": None, "path": "sub/a.png"}, {"bytes": None, "path": "out.png"}]
    pq.write_table(
        pa.table({"key": ["in", "link"], "image": pa.array(cells, image)}), folder / "t.parquet"
    )
    record = {"kind": "table", "path": f"{folder / 't.parquet'}###", "root": str(folder)}
    reader = ImageReader()
    assert reader.read(record, "in") == PNG
    assert reader.read(record, "link") is None
    assert reader.read({**record, "follow_links": True}, "link") == SECRET


def test_a_shard_listed_from_a_folder_is_not_read_through_a_link_out(tmp_path):
    import io
    import tarfile

    (tmp_path / "elsewhere").mkdir()
    with tarfile.open(tmp_path / "elsewhere" / "s.tar", "w") as tar:
        info = tarfile.TarInfo("k.png")
        info.size = len(PNG)
        tar.addfile(info, io.BytesIO(PNG))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "s.tar").symlink_to(tmp_path / "elsewhere" / "s.tar")
    record = {"kind": "shard", "path": str(tmp_path / "shards" / "s.tar")}
    reader = ImageReader()
    assert reader.read(record, "k") == PNG  # named by the user: read where it points
    listed = {**record, "root": str(tmp_path / "shards")}
    assert reader.read(listed, "k") is None
    assert reader.read({**listed, "follow_links": True}, "k") == PNG
