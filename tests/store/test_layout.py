"""starkret.store.layout: the one place part files are named and their numbers read."""

from __future__ import annotations

import doctest

import pytest

from starkret import _io
from starkret.store import layout
from starkret.store.layout import pad_part_names, part_file, part_files, part_name, part_number


def test_names_are_zero_padded_and_numbers_read_back_padded_or_not(tmp_path):
    assert part_file(tmp_path, "img_emb", 12) == tmp_path / "img_emb" / "img_emb_00012.npy"
    assert part_name("failures", 100_000) == "failures_100000.parquet"
    for sub in layout.SUBFOLDERS:
        for i in (0, 7, 12345, 123456):
            assert part_number(part_file(tmp_path, sub, i)) == i
            assert part_number(part_name(sub, i, padded=False)) == i


@pytest.mark.parametrize(
    "name",
    [
        "img_emb_1.parquet",
        "metadata_1.npy",
        "img_emb_.npy",
        "img_emb_x.npy",
        "emb_1.npy",
        ".img_emb_00001.npy.tmp-5",
        "img_emb_00001.npy.bak",
        "part_00001",
    ],
)
def test_other_names_are_not_parts(name):
    assert part_number(name) is None


def test_part_files_are_in_number_order_whatever_the_padding(tmp_path):
    folder = tmp_path / "img_emb"
    folder.mkdir()
    names = ["img_emb_2.npy", "img_emb_00010.npy", "img_emb_1.npy", ".img_emb_00003.npy.tmp-1"]
    for name in names:
        (folder / name).write_bytes(b"")
    assert [p.name for p in part_files(tmp_path, "img_emb")] == [
        "img_emb_1.npy",
        "img_emb_2.npy",
        "img_emb_00010.npy",
    ]
    assert part_files(tmp_path, "metadata") == []
    (folder / "img_emb_old.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"img_emb_old\.npy is not a part file name"):
        part_files(tmp_path, "img_emb")


def test_padding_renames_only_unpadded_part_files(tmp_path):
    for sub in layout.SUBFOLDERS:
        (tmp_path / sub).mkdir()
        (tmp_path / sub / part_name(sub, 7, padded=False)).write_bytes(sub.encode())
    (tmp_path / "img_emb" / "img_emb_8.parquet").write_bytes(b"foreign")
    assert pad_part_names(tmp_path) == 3
    for sub in layout.SUBFOLDERS:
        assert part_file(tmp_path, sub, 7).read_bytes() == sub.encode()
    assert (tmp_path / "img_emb" / "img_emb_8.parquet").exists()


def test_the_docstring_examples_run():
    for module in (layout, _io):
        failed, attempted = doctest.testmod(module)
        assert attempted > 0 and failed == 0, module.__name__
