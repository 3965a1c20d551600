"""read_shards: webdataset grouping, patterns, and broken input reported, not fatal."""

from __future__ import annotations

import doctest
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

import starkret
from starkret.ingest import shards as shards_module
from starkret.ingest.shards import ShardIterator, read_shards

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg"


def write_tar(path: Path, members, *, fmt: int = tarfile.PAX_FORMAT) -> Path:
    """Write ``members`` (``(name, bytes)`` pairs or ready TarInfo objects) as a tar."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def keys(samples) -> list[str]:
    return [s.key for s in samples]


# ==== Grouping ====


def test_members_group_by_webdataset_key_with_directories_and_multi_dot_names(tmp_path):
    meta = {"url": "https://example.com/a.jpg", "width": 640, "height": 480, "key": "0001"}
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("0001.jpg", JPEG),
            ("0001.txt", b"a dog on a beach"),
            ("0001.json", json.dumps(meta).encode()),
            ("0001.npy", b"other extensions are ignored"),
            ("part/0002.PNG", b"png bytes"),
            ("part/0002.TXT", b"upper-case extension"),
            ("a/b.c.d.jpg", b"multi-dot"),
        ],
    )
    samples = list(read_shards(str(shard)))
    assert keys(samples) == ["0001", "part/0002", "a/b"]
    first, second, third = samples
    assert (first.shard, first.image, first.image_ext) == ("s.tar", JPEG, "jpg")
    assert first.caption == "a dog on a beach"
    assert json.loads(first.json) == meta
    assert (first.url, first.width, first.height) == (meta["url"], 640, 480)
    assert (second.image_ext, second.caption, second.json, second.url) == (
        "png",
        "upper-case extension",
        None,
        None,
    )
    assert (third.image_ext, third.image) == ("c.d.jpg", b"multi-dot")
    assert "key='a/b'" in repr(third) and "<9 bytes>" in repr(third)


def test_webdataset_tarwriter_shards_read_back(tmp_path):
    webdataset = pytest.importorskip("webdataset")
    path = tmp_path / "wds-000.tar"
    with webdataset.TarWriter(str(path)) as sink:
        for i in range(5):
            meta = {"url": f"https://img/{i}.jpg", "width": 10 + i, "height": 20 + i}
            sink.write(
                {"__key__": f"{i:09d}", "jpg": JPEG + bytes([i]), "txt": f"cap {i}", "json": meta}
            )
    samples = list(read_shards(path))
    assert keys(samples) == [f"{i:09d}" for i in range(5)]
    assert [s.caption for s in samples] == [f"cap {i}" for i in range(5)]
    assert [(s.url, s.width, s.height) for s in samples][4] == ("https://img/4.jpg", 14, 24)
    assert samples[2].image == JPEG + b"\x02"


def test_keys_and_order_match_webdataset_on_the_same_tar(tmp_path):
    tariterators = pytest.importorskip("webdataset.tariterators")
    directory = tarfile.TarInfo("dir")
    directory.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("dir/link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "x.jpg"
    shard = write_tar(
        tmp_path / "mixed.tar",
        [
            ("__key__.json", b"{}"),
            directory,
            ("dir/00.jpg", b"0"),
            ("dir/00.txt", b"zero"),
            link,
            ("x.y/01.Jpeg", b"1"),
            ("a/b.c.d.jpg", b"2"),
            ("größe/猫.png", b"3"),
            ("größe/猫.txt", "ein Kätzchen".encode()),
            ("README", b"no dot: not a sample"),
            ("only-text.txt", b"no image"),
            ("dir/00.webp", b"same key again, later"),
            ("sub/.hidden.jpg", b"key 'sub/'"),
        ],
    )

    with open(shard, "rb") as stream:
        members = tariterators.tar_file_expander([{"url": str(shard), "stream": stream}])
        theirs = [
            (s["__key__"], s.get("txt"))
            for s in tariterators.group_by_keys(members)
            if any(k.split(".")[-1] in {"jpg", "jpeg", "png", "webp"} for k in s)
        ]
    it = read_shards(shard)
    ours = [(s.key, None if s.caption is None else s.caption.encode()) for s in it]
    # webdataset yields a key that comes back later again; starkret records it instead.
    assert ours == [s for i, s in enumerate(theirs) if s[0] not in {k for k, _ in theirs[:i]}]
    assert [(key, reason.split(":")[0]) for _, key, reason in it.failures] == [
        ("dir/link", "unsupported member"),
        (None, "member without extension"),
        ("only-text", "no image member (has"),
        ("dir/00", "duplicate key"),
    ]


def test_a_sample_without_an_image_is_a_logged_failure(tmp_path, caplog):
    shard = write_tar(
        tmp_path / "s.tar",
        [("0001.txt", b"t"), ("0001.json", b"{}"), ("0002.jpg", JPEG)],
    )
    it = read_shards(shard)
    with caplog.at_level(logging.WARNING, logger="starkret"):
        assert keys(it) == ["0002"]
    assert it.failures == [("s.tar", "0001", "no image member (has: txt, json)")]
    assert "s.tar [0001]: no image member" in caplog.text


def test_duplicate_extension_keeps_the_first_and_a_key_repeated_later_is_recorded(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("a.jpg", b"first"),
            ("a.jpg", b"second"),
            ("b.jpg", b"b"),
            ("a.jpg", b"again"),
        ],
    )
    it = read_shards(shard)
    samples = list(it)
    assert [(s.key, s.image) for s in samples] == [("a", b"first"), ("b", b"b")]
    assert len(it.failures) == 2
    shard_name, key, reason = it.failures[0]
    assert (shard_name, key) == ("s.tar", "a")
    assert reason.startswith("duplicate extension 'jpg'")
    assert it.failures[1] == ("s.tar", "a", "duplicate key: a (already in this shard)")


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_unicode_keys_survive_pax_and_gnu_tars(tmp_path, fmt):
    deep = "ü" * 70 + "/" + "猫" * 20
    shard = write_tar(
        tmp_path / "u.tar",
        [("größe/猫.jpg", b"i"), ("größe/猫.txt", "Käse 🧀".encode()), (deep + ".png", b"j")],
        fmt=fmt,
    )
    samples = list(read_shards(shard))
    assert keys(samples) == ["größe/猫", deep]
    assert samples[0].caption == "Käse 🧀"


def test_double_underscore_members_and_directories_are_skipped_links_recorded(tmp_path):
    directory = tarfile.TarInfo("0001")
    directory.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("0002.png")
    link.type, link.linkname = tarfile.SYMTYPE, "0001.jpg"
    shard = write_tar(
        tmp_path / "s.tar",
        [("__key__.json", b"{}"), directory, ("0001.jpg", b"i"), ("0001/__meta__.txt", b"m"), link],
    )
    it = read_shards(shard)
    assert keys(it) == ["0001"]
    assert it.failures == [
        ("s.tar", "0002", "unsupported member: symlink '0002.png' -> '0001.jpg'")
    ]


def test_invalid_json_and_non_utf8_captions_do_not_crash(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [("k.jpg", b"i"), ("k.txt", b"caf\xe9"), ("k.json", b'{"url": "http://x", oops')],
    )
    (sample,) = read_shards(shard)
    assert sample.caption == "caf\ufffd"
    assert sample.json == '{"url": "http://x", oops'
    assert (sample.url, sample.width, sample.height) == (None, None, None)


# ==== Paths and patterns ====


def make_shards(directory: Path, count: int) -> list[Path]:
    return [
        write_tar(directory / f"{i:05d}.tar", [(f"{i:05d}{j}.jpg", b"i") for j in range(2)])
        for i in range(count)
    ]


def test_brace_ranges_globs_and_lists_expand_in_order_without_repeats(tmp_path):
    make_shards(tmp_path, 4)
    it = read_shards(f"{tmp_path}/{{00001..00002}}.tar")
    assert [Path(p).name for p in it.shards] == ["00001.tar", "00002.tar"]
    assert keys(it) == ["000010", "000011", "000020", "000021"]

    it = read_shards([tmp_path / "00003.tar", f"{tmp_path}/*.tar", f"{tmp_path}/0000[0].tar"])
    assert [Path(p).name for p in it.shards] == ["00003.tar", "00000.tar", "00001.tar", "00002.tar"]
    assert len(list(it)) == 8

    names = shards_module.expand_shard_paths(f"{tmp_path}/{{00000,00002}}.t?r")
    assert [Path(p).name for p in names] == ["00000.tar", "00002.tar"]


@pytest.mark.parametrize(
    "pattern", ["{a,b}-{08..11}.tar", "x{1..3}{y,z{0,1}}.tar", "{9..11}.tar", "{3..1}.tar"]
)
def test_brace_expansion_matches_braceexpand(tmp_path, pattern):
    braceexpand = pytest.importorskip("braceexpand")
    theirs = list(braceexpand.braceexpand(pattern))
    for name in theirs:
        (tmp_path / name).write_bytes(b"")
    ours = shards_module.expand_shard_paths(f"{tmp_path}/{pattern}")
    assert [Path(p).name for p in ours] == theirs


def test_bad_arguments_raise_naming_the_offending_pattern(tmp_path):
    make_shards(tmp_path, 2)
    missing = f"{tmp_path}/{{00000..00002}}.tar"
    with pytest.raises(FileNotFoundError, match=r"00002\.tar"):
        read_shards(missing)
    with pytest.raises(FileNotFoundError, match=r"no shard file matches .*\*\.zip"):
        read_shards(f"{tmp_path}/*.zip")
    with pytest.raises(FileNotFoundError, match=r"nope\.tar"):
        read_shards([tmp_path / "00000.tar", tmp_path / "nope.tar"])
    with pytest.raises(ValueError, match=r"unbalanced '\{'"):
        read_shards(f"{tmp_path}/{{00000..00001.tar")
    with pytest.raises(ValueError, match="max_member_bytes"):
        read_shards(tmp_path / "00000.tar", max_member_bytes=-1)
    with pytest.raises(ValueError, match="no shard paths"):
        read_shards([])


# ==== Broken shards ====


def test_truncated_tar_keeps_samples_before_the_cut_and_reads_the_next_shard(tmp_path):
    members = [(f"{i:04d}{ext}", bytes([i]) * 700) for i in range(4) for ext in (".jpg", ".txt")]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    # Each member is a 512-byte header and 1024 bytes of data: sample i starts at 3072 * i.
    (tmp_path / "a-0.tar").write_bytes(whole[: 3072 * 2 + 512 + 300])  # inside 0002.jpg
    (tmp_path / "a-1.tar").write_bytes(whole[: 3072 * 3 + 100])  # inside 0003.jpg's header
    (tmp_path / "a-2.tar").write_bytes(whole)

    it = read_shards(f"{tmp_path}/a-{{0..2}}.tar")
    got = [(s.shard, s.key) for s in it]
    assert got == [
        ("a-0.tar", "0000"),
        ("a-0.tar", "0001"),
        ("a-1.tar", "0000"),
        ("a-1.tar", "0001"),
        # every member of 0002 was read whole before the cut header: kept
        ("a-1.tar", "0002"),
        ("a-2.tar", "0000"),
        ("a-2.tar", "0001"),
        ("a-2.tar", "0002"),
        ("a-2.tar", "0003"),
    ]
    assert [(shard, key) for shard, key, _ in it.failures] == [
        ("a-0.tar", "0002"),
        ("a-1.tar", None),
    ]
    first, second = (reason for _, _, reason in it.failures)
    assert first.startswith("truncated tar: cut inside member '0002.jpg' (300 of 700 bytes)")
    assert first.endswith("sample '0002' dropped")
    assert second.startswith("truncated tar: cut inside the header")
    assert second.endswith("(after key '0002')")


def test_a_shard_missing_at_read_time_is_a_failure_and_reading_goes_on(tmp_path):
    good = make_shards(tmp_path, 1)[0]
    it = ShardIterator(
        [str(tmp_path / "gone.tar"), str(good)], max_member_bytes=1 << 20, prefetch=2
    )
    assert keys(it) == ["000000", "000001"]
    ((shard, key, reason),) = it.failures
    assert (shard, key) == ("gone.tar", None)
    assert reason.startswith("cannot open shard") and "gone.tar" in reason


def test_an_oversized_member_is_skipped_and_reported(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("big.jpg", b"x" * 5000),
            ("big.txt", b"c"),
            ("ok.jpg", b"y" * 100),
            ("ok.txt", b"z" * 5000),
        ],
    )
    it = read_shards(shard, max_member_bytes=1000)
    samples = list(it)
    assert [(s.key, s.caption) for s in samples] == [("ok", None)]
    assert [(key, reason.split(":")[0]) for _, key, reason in it.failures] == [
        ("big", "member too large"),
        ("ok", "member too large"),
    ]
    assert "5000 bytes, the limit is 1000" in it.failures[0][2]


def test_the_docstring_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failed, attempted = doctest.testmod(
        shards_module, extraglobs={"read_shards": read_shards}, optionflags=doctest.ELLIPSIS
    )
    assert attempted > 0 and failed == 0


def test_read_shards_is_exported_from_the_package():
    assert starkret.read_shards is read_shards
    assert starkret.Sample is shards_module.Sample
