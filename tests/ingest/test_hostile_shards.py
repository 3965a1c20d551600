"""Hostile and broken shards: every good sample is kept, every bad member is recorded.

Tars with a corrupt header after good samples, gzip-compressed shards, links and
devices, members without an extension, keys repeated inside a shard, and a panic on
a Rust background thread (injected with the test-only ``STARKRET_DEBUG_PANIC``
variable) which must raise, never look like the end of the data.
"""

from __future__ import annotations

import faulthandler
import gzip
import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest

import starkret
from starkret.ingest.shards import read_shards

JPEG = b"\xff\xd8\xff\xe0 not really a jpeg"


def tar_bytes(members, *, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar of ``members``: ``(name, bytes)`` pairs or ready ``TarInfo`` objects."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def header_offsets(data: bytes) -> dict[str, int]:
    """Where each member's own header starts (after any extended headers)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m.offset_data - 512 for m in tar.getmembers()}


def set_checksum(data: bytearray, at: int) -> None:
    header = data[at : at + 512]
    header[148:156] = b" " * 8
    data[at + 148 : at + 156] = b"%06o\0 " % sum(header)


def read(tmp_path: Path, data: bytes, name: str = "s.tar"):
    (tmp_path / name).write_bytes(data)
    it = read_shards(tmp_path / name)
    samples = [(s.key, s.image, s.caption) for s in it]
    return samples, it.failures


# ==== A corrupt header after good samples (item 7a) ====

TWO_SAMPLES = [
    ("0000.jpg", JPEG + b"0"),
    ("0000.txt", b"zero"),
    ("0001.jpg", JPEG + b"1"),
    ("0001.txt", b"one"),
]
THIRD = [("0002.jpg", JPEG + b"2"), ("0002.txt", b"two")]


def _bad_checksum(data: bytearray, at: int) -> None:
    data[at + 3] ^= 0x20


def _bad_size_field(data: bytearray, at: int) -> None:
    data[at + 124 : at + 136] = b"0000000009z\0"
    set_checksum(data, at)


def _negative_size(data: bytearray, at: int) -> None:
    data[at + 124 : at + 136] = b"\xff" * 12
    set_checksum(data, at)


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_bad_checksum, "corrupt tar: bad header checksum"),
        (_bad_size_field, "corrupt tar: "),
        (_negative_size, "corrupt tar: negative member size"),
    ],
)
def test_samples_before_a_corrupt_header_are_kept(tmp_path, corrupt, reason):
    data = bytearray(tar_bytes(TWO_SAMPLES + THIRD))
    corrupt(data, header_offsets(bytes(data))["0002.jpg"])
    samples, failures = read(tmp_path, bytes(data))
    assert samples == [("0000", JPEG + b"0", "zero"), ("0001", JPEG + b"1", "one")]
    ((shard, key, why),) = failures
    assert shard == "s.tar" and key is None
    assert why.startswith(reason), why
    assert "after key '0001'" in why
    assert "18446744073709551615" not in why


def test_a_bad_pax_record_keeps_the_samples_before_it(tmp_path):
    members = [*TWO_SAMPLES, ("größe/0002.jpg", JPEG)]
    data = bytearray(tar_bytes(members, fmt=tarfile.PAX_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        pax_header = tar.getmembers()[-1].offset
    record = data.index(b" path=", pax_header + 512)
    data[record - 2 : record] = b"99"  # the record's length no longer matches its text
    samples, failures = read(tmp_path, bytes(data))
    assert [key for key, _, _ in samples] == ["0000", "0001"]
    ((_, key, why),) = failures
    assert key is None and why.startswith("corrupt tar: pax header"), why


@pytest.mark.parametrize("cut", ["inside the header", "at the end-of-archive marker"])
def test_samples_before_a_cut_header_or_a_missing_end_marker_are_kept(tmp_path, cut):
    whole = tar_bytes(TWO_SAMPLES + THIRD)
    third = header_offsets(whole)["0002.jpg"]
    data = whole[: third + 100] if cut == "inside the header" else whole[:third]
    samples, failures = read(tmp_path, data)
    assert samples == [("0000", JPEG + b"0", "zero"), ("0001", JPEG + b"1", "one")]
    ((_, key, why),) = failures
    assert key is None and why.startswith("truncated tar: ") and "after key '0001'" in why


def test_a_sample_cut_inside_a_member_is_dropped_and_named(tmp_path):
    whole = tar_bytes([*TWO_SAMPLES, ("0002.jpg", JPEG * 40), ("0002.txt", b"two")])
    inside = header_offsets(whole)["0002.jpg"] + 512 + 100
    samples, failures = read(tmp_path, whole[:inside])
    assert [key for key, _, _ in samples] == ["0000", "0001"]
    ((_, key, why),) = failures
    assert key == "0002" and why.startswith("truncated tar: cut inside member '0002.jpg'")


# ==== gzip-compressed shards (item 7b) ====


@pytest.mark.parametrize("name", ["s.tar.gz", "s.tgz", "gzip-named.tar"])
def test_gzipped_shards_read_like_plain_ones(tmp_path, name):
    plain = tar_bytes(TWO_SAMPLES + THIRD)
    samples, failures = read(tmp_path, gzip.compress(plain), name)
    assert (samples, failures) == read(tmp_path, plain)
    assert len(samples) == 3 and failures == []


def test_concatenated_gzip_members_are_one_stream(tmp_path):
    plain = tar_bytes(TWO_SAMPLES + THIRD)
    data = gzip.compress(plain[:2048]) + gzip.compress(plain[2048:])
    samples, failures = read(tmp_path, data, "s.tar.gz")
    assert [key for key, _, _ in samples] == ["0000", "0001", "0002"] and failures == []


@pytest.mark.parametrize("tail", [b"\0" * 512, b"junk after the stream"])
def test_padding_or_junk_after_a_gzip_stream_is_ignored_like_tarfile_does(tmp_path, tail):
    plain = tar_bytes(TWO_SAMPLES + THIRD)
    samples, failures = read(tmp_path, gzip.compress(plain) + tail, "s.tgz")
    assert (samples, failures) == read(tmp_path, plain)


def test_truncated_or_corrupt_gzip_is_a_recorded_failure_and_reading_goes_on(tmp_path):
    packed = gzip.compress(tar_bytes(TWO_SAMPLES + THIRD))
    good = tmp_path / "z-good.tgz"
    good.write_bytes(packed)
    mutants = [packed[:cut] for cut in range(0, len(packed), 7)]
    mutants += [packed[:40] + bytes([b ^ 0x55 for b in packed[40:60]]) + packed[60:]]
    mutants += [packed[:-8] + b"\0" * 8]  # CRC and length of the gzip trailer wrong
    for i, data in enumerate(mutants):
        (tmp_path / f"m-{i:03d}.tgz").write_bytes(data)
        it = read_shards([tmp_path / f"m-{i:03d}.tgz", good])
        samples = list(it)
        assert [s.shard for s in samples][-3:] == ["z-good.tgz"] * 3, i
        bad = [s for s in samples if s.shard != "z-good.tgz"]
        assert [s.key for s in bad] == ["0000", "0001", "0002"][: len(bad)]
        assert len(it.failures) == 1, (i, it.failures)
        reason = it.failures[0][2]
        assert reason.startswith(("truncated", "corrupt")), (i, reason)


def test_other_compressions_are_named_not_called_corrupt_tars(tmp_path):
    samples, failures = read(tmp_path, b"BZh91AY&SY" + b"\0" * 600, "s.tar.bz2")
    assert samples == []
    assert failures == [("s.tar.bz2", None, "unsupported format: bzip2-compressed shard")]


# ==== Members that cannot be samples (items 7c, 7d) ====


def _special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_links_devices_and_names_without_extension_are_recorded_failures(tmp_path):
    directory = _special("0001", tarfile.DIRTYPE)
    members = [
        directory,
        ("0001.jpg", JPEG),
        _special("0001.png", tarfile.SYMTYPE, "../../etc/passwd"),
        _special("0002.jpg", tarfile.LNKTYPE, "0001.jpg"),
        _special("dev.jpg", tarfile.CHRTYPE),
        _special("disk.jpg", tarfile.BLKTYPE),
        _special("pipe.jpg", tarfile.FIFOTYPE),
        ("README", b"no dot"),
        (".jpg", b"no key"),
        ("__key__.json", b"{}"),
        ("0003.jpg", JPEG),
    ]
    samples, failures = read(tmp_path, tar_bytes(members))
    assert [key for key, _, _ in samples] == ["0001", "0003"]
    assert failures == [
        ("s.tar", "0001", "unsupported member: symlink '0001.png' -> '../../etc/passwd'"),
        ("s.tar", "0002", "unsupported member: hard link '0002.jpg' -> '0001.jpg'"),
        ("s.tar", "dev", "unsupported member: character device 'dev.jpg'"),
        ("s.tar", "disk", "unsupported member: block device 'disk.jpg'"),
        ("s.tar", "pipe", "unsupported member: fifo 'pipe.jpg'"),
        ("s.tar", None, "member without extension: 'README'"),
        ("s.tar", None, "member without a key: '.jpg'"),
    ]


def test_nothing_is_extracted_to_disk(tmp_path, monkeypatch):
    members = [
        ("../escape.jpg", JPEG),
        ("/abs/path.jpg", JPEG),
        _special("link.jpg", tarfile.SYMTYPE, "/etc/passwd"),
    ]
    shard = tmp_path / "shard" / "s.tar"
    shard.parent.mkdir()
    shard.write_bytes(tar_bytes(members))
    monkeypatch.chdir(shard.parent)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    it = read_shards(shard)
    assert [s.key for s in it] == ["../escape", "/abs/path"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ==== Keys repeated inside one shard (item 9) ====


def test_a_key_repeated_later_in_a_shard_is_a_duplicate_key_failure(tmp_path):
    members = [
        ("a.jpg", JPEG + b"a"),
        ("a.txt", b"first a"),
        ("b.jpg", JPEG + b"b"),
        ("a.jpg", JPEG + b"again"),
        ("a.txt", b"second a"),
        ("c.jpg", JPEG + b"c"),
    ]
    samples, failures = read(tmp_path, tar_bytes(members))
    assert samples == [
        ("a", JPEG + b"a", "first a"),
        ("b", JPEG + b"b", None),
        ("c", JPEG + b"c", None),
    ]
    assert failures == [("s.tar", "a", "duplicate key: a (already in this shard)")]


def test_the_same_key_in_two_shards_is_left_to_the_pipeline(tmp_path):
    data = tar_bytes([("a.jpg", JPEG)])
    (tmp_path / "0.tar").write_bytes(data)
    (tmp_path / "1.tar").write_bytes(data)
    it = read_shards(tmp_path / "*.tar")
    assert [(s.shard, s.key) for s in it] == [("0.tar", "a"), ("1.tar", "a")]
    assert it.failures == []


# ==== A panic on a background thread (item 6) ====


@pytest.fixture
def hang_guard():
    """Ends the run with a traceback if a test here hangs (no pytest-timeout needed)."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def shard_dir(tmp_path, hang_guard):
    from starkret.testing import encode, synthetic_photo

    members = []
    for i in range(6):
        members += [
            (f"{i:04d}.jpg", encode(synthetic_photo(40, 30, seed=i), "JPEG")),
            (f"{i:04d}.txt", f"caption {i}".encode()),
        ]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "s.tar").write_bytes(tar_bytes(members))
    return tmp_path / "shards"


def test_a_panic_in_the_shard_reader_thread_raises_naming_the_shard(shard_dir, monkeypatch):
    monkeypatch.setenv("STARKRET_DEBUG_PANIC", "shard-reader:0003")
    it = read_shards(shard_dir / "s.tar")
    got = []
    with pytest.raises(
        RuntimeError, match=r"shard reader thread panicked while reading '[^']*s\.tar'"
    ):
        for sample in it:
            got.append(sample.key)
    assert got == ["0000", "0001", "0002"]


@pytest.mark.parametrize("where", ["shard-reader", "batch-feeder"])
def test_a_panic_behind_preprocess_shards_raises_not_ends(shard_dir, monkeypatch, where):
    monkeypatch.setenv("STARKRET_DEBUG_PANIC", f"{where}:0003")
    it = starkret.preprocess_shards(shard_dir / "s.tar", batch_size=2, size=32)
    with pytest.raises(RuntimeError, match=r"thread panicked while reading '[^']*s\.tar'"):
        for _batch in it:
            pass


def test_embed_leaves_the_part_unfinished_when_the_feeder_panics(
    shard_dir, tmp_path, monkeypatch, tiny_embedder
):
    out = tmp_path / "out"
    args = dict(source_name="t", embedder=tiny_embedder, batch_size=2, progress=False)
    monkeypatch.setenv("STARKRET_DEBUG_PANIC", "batch-feeder:0004")
    with pytest.raises(RuntimeError, match="panicked"):
        starkret.embed(str(shard_dir / "s.tar"), out, **args)
    assert not (out / "metadata" / "metadata_00000.parquet").exists()
    assert not json.loads((out / "starkret.json").read_text())["complete"]

    monkeypatch.delenv("STARKRET_DEBUG_PANIC")
    report = starkret.embed(str(shard_dir / "s.tar"), out, **args)
    assert (report.embedded, report.failed, report.parts_done) == (6, 0, 1)


# ==== Agreement with the webdataset library (property test) ====

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp"}
_name_chars = st.sampled_from("abcXYZ019-_äß猫")
_dir = st.text(_name_chars | st.just("."), min_size=1, max_size=5).filter(
    lambda d: d not in (".", "..") and not d.startswith("__")
)
_base = st.text(_name_chars, min_size=1, max_size=6).filter(lambda b: not b.startswith("__"))
_key = st.builds(lambda dirs, base: "/".join([*dirs, base]), st.lists(_dir, max_size=2), _base)
_image_ext = st.sampled_from(["jpg", "JPG", "jpeg", "png", "webp", "seg.png", "0.Jpg"])
_sample = st.fixed_dictionaries(
    {
        "image_ext": _image_ext,
        "image": st.binary(max_size=40),
        "caption": st.none() | st.text(max_size=12),
        "url": st.none() | st.text(max_size=12),
        "extra": st.lists(st.sampled_from(["cls", "npy", "Json2", "seg.txt"]), unique=True),
        "order": st.randoms(use_true_random=False),
    }
)


def _members(keys, samples) -> list[tuple[str, bytes]]:
    """Tar members for ``keys``, each sample's members in a random order."""
    members = []
    for key, sample in zip(keys, samples, strict=False):
        group = [(f"{key}.{sample['image_ext']}", sample["image"])]
        if sample["caption"] is not None:
            group.append((f"{key}.txt", sample["caption"].encode()))
        if sample["url"] is not None:
            group.append((f"{key}.json", json.dumps({"url": sample["url"], "k": key}).encode()))
        group += [(f"{key}.{ext}", b"x") for ext in sample["extra"]]
        sample["order"].shuffle(group)
        members += group
    return members


@hypothesis.settings(
    max_examples=100, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
@hypothesis.given(
    keys=st.lists(_key, min_size=1, max_size=6, unique=True),
    samples=st.lists(_sample, min_size=6, max_size=6),
    fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    compress=st.sampled_from([None, "s.tar.gz", "s.tar"]),
)
def test_read_shards_agrees_with_webdataset_on_generated_tars(keys, samples, fmt, compress):
    tariterators = pytest.importorskip("webdataset.tariterators")
    data = tar_bytes(_members(keys, samples), fmt=fmt)
    name = "s.tar" if compress is None else compress
    if compress is not None:
        data = gzip.compress(data, mtime=0)

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        with open(path, "rb") as stream:
            expanded = tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
            theirs = []
            for s in tariterators.group_by_keys(expanded):
                image = next(v for k, v in s.items() if k.split(".")[-1] in IMAGE_EXTENSIONS)
                caption = s["txt"].decode() if "txt" in s else None
                url = json.loads(s["json"])["url"] if "json" in s else None
                theirs.append((s["__key__"], image, caption, url))
        it = read_shards(path)
        ours = [(s.key, s.image, s.caption, s.url) for s in it]
    assert ours == theirs
    assert it.failures == []


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    keys=st.lists(_key, min_size=1, max_size=4, unique=True),
    samples=st.lists(_sample, min_size=4, max_size=4),
    cut=st.floats(0, 1),
    gzipped=st.booleans(),
)
def test_a_cut_shard_yields_a_prefix_of_its_whole_samples_and_one_failure(
    keys, samples, cut, gzipped
):
    data = tar_bytes(_members(keys, samples))
    if gzipped:
        data = gzip.compress(data, mtime=0)
    cut_data = data[: int(cut * (len(data) - 1))]
    with tempfile.TemporaryDirectory() as folder:
        whole, cut_shard = Path(folder) / "whole.tar", Path(folder) / "cut.tar"
        whole.write_bytes(data)
        cut_shard.write_bytes(cut_data)
        expected = [(s.key, s.image) for s in read_shards(whole)]
        it = read_shards(cut_shard)
        got = [(s.key, s.image) for s in it]
    assert got == expected[: len(got)]
    # A plain tar cut after its end-of-archive marker is whole; a gzip stream
    # cut anywhere misses its trailer. Before the stop, the sample in progress
    # may be reported for lacking its image.
    if gzipped or len(cut_data) < _end_marker(data) + 512:
        *before, stop = it.failures
        assert stop[2].startswith(("truncated", "corrupt")), it.failures
        assert all(f[2].startswith("no image member") for f in before), it.failures
    else:
        assert it.failures == []


def _end_marker(data: bytes) -> int:
    """Where the end-of-archive marker of a plain tar starts."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512
