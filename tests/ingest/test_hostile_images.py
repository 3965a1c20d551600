"""Hostile and broken images: each input is decoded on its own, failures are specific,
memory and work stay bounded, and accept/reject follows Pillow (the reference)."""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import zlib

import numpy as np
import PIL.Image
import pytest

import starkret
from starkret.ingest.preprocess import OPENAI_MEAN, OPENAI_STD, normalisation_table, reference_crop
from starkret.testing import encode, synthetic_photo

SIZE = 16  # small crops keep thousands of decodes fast


def _jpeg(w=48, h=40, seed=0, **options) -> bytes:
    return encode(PIL.Image.fromarray(synthetic_photo(w, h, seed)), "JPEG", **options)


def _png(image: PIL.Image.Image, **options) -> bytes:
    return encode(image, "PNG", **options)


def _segments(data: bytes) -> list[tuple[int, bytes]]:
    """A well-formed JPEG as (marker, bytes) segments; a scan includes its entropy data."""
    out, pos = [(0xD8, data[:2])], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, data[pos : pos + 2]))
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        end = pos + 2 + length
        if marker == 0xDA:
            while not (data[end] == 0xFF and data[end + 1] not in (0, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, data[pos:end]))
        pos = end
    return out


def _join(segments) -> bytes:
    return b"".join(body for _, body in segments)


def _patch(data: bytes, marker: int, edit) -> bytes:
    return _join((m, bytes(edit(bytearray(s))) if m == marker else s) for m, s in _segments(data))


def _set(offset: int, value: bytes):
    def edit(seg: bytearray) -> bytearray:
        seg[offset : offset + len(value)] = value
        return seg

    return edit


def _chunk(kind: bytes, body: bytes, crc: bytes | None = None) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + body)) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + crc


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    out, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        out.append(
            (kind, data[pos + 8 : pos + 8 + length], data[pos + 8 + length : pos + 12 + length])
        )
        pos += 12 + length
    return out


def _rebuild_png(data: bytes, edit) -> bytes:
    """PNG bytes with every chunk replaced by ``edit(kind, body, crc)`` (bytes)."""
    return b"\x89PNG\r\n\x1a\n" + b"".join(edit(*c) for c in _png_chunks(data))


def _same(kind, body, crc) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + crc


def _outcomes(batch, n: int) -> list:
    """Per input: the crop as bytes, or the failure reason."""
    out: list = [None] * n
    for pos, reason in batch.failures:
        out[pos] = reason
    for pos, pixels in zip(batch.index.tolist(), batch.pixels, strict=True):
        out[pos] = pixels.tobytes()
    return out


def _pillow_decodes(data: bytes) -> bool:
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # any failure is a rejection
        return False


GOOD = _jpeg()
GOOD_PROGRESSIVE = _jpeg(seed=1, progressive=True)

# The reproducers of issue 9, item 1: each used to leave the thread's decoder broken.
BAD_JPEGS = {
    "zero size": _patch(GOOD, 0xC0, _set(5, b"\0\0\0\0")),
    "12-bit": _patch(GOOD, 0xC0, _set(4, b"\x0c")),
    "65535x1": _patch(GOOD, 0xC0, _set(5, struct.pack(">HH", 1, 65535))),
    "two SOI": GOOD[:2] + GOOD,
    "bogus DQT": _patch(GOOD, 0xDB, _set(4, b"\x07")),
    "bogus DHT": _patch(GOOD, 0xC4, _set(4, b"\x3f")),
    "SOS before SOF": _join(
        [(m, s) for m, s in _segments(GOOD) if m == 0xD8]
        + [(m, s) for m, s in _segments(GOOD) if m == 0xDA]
        + [(m, s) for m, s in _segments(GOOD) if m not in (0xD8, 0xDA)]
    ),
    "lossless SOF3": _patch(GOOD, 0xC0, _set(1, b"\xc3")),
    "hierarchical SOF5": _patch(GOOD, 0xC0, _set(1, b"\xc5")),
    "no DQT": _join((m, s) for m, s in _segments(GOOD) if m != 0xDB),
    "cut to 20 bytes": GOOD[:20],
}


# ==== Item 1: every image decoded independently ====


@pytest.mark.parametrize("name", sorted(BAD_JPEGS))
def test_bad_jpeg_does_not_poison_the_next_images(name):
    bad = BAD_JPEGS[name]
    alone = starkret.preprocess([bad], threads=1, size=SIZE, dtype="uint8")
    assert len(alone) == 0, f"{name} decoded"
    after = starkret.preprocess([GOOD, bad, GOOD, GOOD], threads=1, size=SIZE, dtype="uint8")
    assert after.index.tolist() == [0, 2, 3], after.failures
    assert after.fallbacks == []
    assert _outcomes(after, 4)[1] == _outcomes(alone, 1)[0]


def test_jpeg_without_its_tables_fails_after_another_jpeg():
    # libjpeg keeps tables in the decompressor between images: a shared handle
    # decoded this with the previous image's quantisation tables.
    no_dqt = BAD_JPEGS["no DQT"]
    batch = starkret.preprocess([GOOD, no_dqt], threads=1, size=SIZE, dtype="uint8")
    assert batch.index.tolist() == [0]
    assert batch.failures == [(1, "corrupt: JPEG: Quantization table 0x00 was not defined")]


def test_failure_reasons_of_the_reproducers_are_specific():
    reasons = {
        name: starkret.preprocess([data], size=SIZE).failures[0][1]
        for name, data in BAD_JPEGS.items()
    }
    assert reasons["12-bit"] == "unsupported format: 12-bit JPEG"
    assert reasons["cut to 20 bytes"] == "truncated: JPEG data ends before its frame header"
    assert reasons["two SOI"] == "corrupt: JPEG: Invalid JPEG file structure: two SOI markers"
    assert reasons["SOS before SOF"] == "corrupt: JPEG: Invalid JPEG file structure: SOS before SOF"
    assert reasons["zero size"].startswith("corrupt: JPEG: Empty JPEG image")
    assert reasons["65535x1"].startswith("corrupt: JPEG: Maximum supported image dimension")
    # Pillow (the fallback for processes libjpeg-turbo 2 lacks) rejects these too
    assert reasons["lossless SOF3"].startswith("corrupt:")
    assert reasons["hierarchical SOF5"].startswith("corrupt:")


def _mutants(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    photo = PIL.Image.fromarray(synthetic_photo(20, 16, seed))
    bases = [
        encode(photo, "JPEG", quality=80),
        encode(photo, "JPEG", progressive=True),
        encode(photo.convert("L"), "JPEG"),
        _png(photo),
        _png(photo.quantize(8)),
        _png(photo.convert("RGBA")),
    ]

    def mutate(data: bytes) -> bytes:
        b = bytearray(data)
        kind = rng.randrange(5)
        if kind == 0:  # bit flips
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # byte sets
            for _ in range(rng.randrange(1, 3)):
                b[rng.randrange(len(b))] = rng.choice([0, 0xFF, rng.randrange(256)])
        elif kind == 2:  # truncation
            del b[rng.randrange(len(b)) :]
        elif kind == 3:  # duplicated run (segment duplication)
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randrange(1, 64))
            b[j:j] = b[i:j]
        else:  # deleted run
            i = rng.randrange(len(b))
            del b[i : i + rng.randrange(1, 8)]
        return bytes(b)

    return [mutate(rng.choice(bases)) for _ in range(count)]


def test_mutants_decode_the_same_alone_and_in_mixed_batches():
    mutants = _mutants(seed=9, count=2500)
    alone = [
        _outcomes(starkret.preprocess([m], threads=1, size=SIZE, dtype="uint8"), 1)[0]
        for m in mutants
    ]
    # good images between the mutants, so that each mutant follows another input
    mixed = [x for m in mutants for x in (m, GOOD)]
    good = _outcomes(starkret.preprocess([GOOD], size=SIZE, dtype="uint8"), 1)[0]
    for threads in (1, 2):
        batch = starkret.preprocess(mixed, threads=threads, size=SIZE, dtype="uint8")
        got = _outcomes(batch, len(mixed))
        assert got[1::2] == [good] * len(mutants), f"a good image failed with {threads} threads"
        differ = [i for i, (a, b) in enumerate(zip(alone, got[0::2], strict=True)) if a != b]
        assert differ == [], f"{len(differ)} mutants differ in a batch, e.g. #{differ[:5]}"
    reasons = {r.split(":")[0] for r in alone if isinstance(r, str)}
    assert reasons <= {
        "empty",
        "truncated",
        "corrupt",
        "not an image",
        "unsupported format",
        "too large",
    }
    for reason in (r for r in alone if isinstance(r, str)):
        assert "ChunkType" not in reason and "decoder error" not in reason, reason
        assert "{" not in reason, reason


# ==== Item 3: scan bombs and ancillary PNG chunks ====


def _with_scans(data: bytes, extra: int) -> bytes:
    """A progressive JPEG with its last scan (and the table before it) repeated."""
    segments = _segments(data)
    last = max(i for i, (m, _) in enumerate(segments) if m == 0xDA)
    repeat = (
        segments[last - 1 : last + 1]
        if segments[last - 1][0] == 0xC4
        else segments[last : last + 1]
    )
    return _join(segments[: last + 1] + repeat * extra + segments[last + 1 :])


def test_jpeg_scan_bomb_is_refused_before_decoding():
    bomb = _with_scans(GOOD_PROGRESSIVE, 600)
    batch = starkret.preprocess([bomb, GOOD_PROGRESSIVE], size=SIZE)
    assert batch.failures == [(0, "corrupt: JPEG has more than 500 scans (limit 500)")]
    assert batch.index.tolist() == [1]


def test_jpeg_scan_count_skips_stuffed_bytes_and_restart_markers():
    # restart markers and 0xFF00 stuffing inside the entropy data are not markers: a
    # JPEG with a restart interval of one MCU still has its few scans
    data = encode(PIL.Image.fromarray(synthetic_photo(64, 64, 3)), "JPEG", restart_marker_blocks=1)
    assert b"\xff\xd0" in data and b"\xff\x00" in data
    many = _with_scans(
        encode(PIL.Image.fromarray(synthetic_photo(64, 64, 3)), "JPEG", progressive=True), 450
    )
    batch = starkret.preprocess([data, many], size=SIZE, dtype="uint8")
    assert batch.failures == [] and len(batch) == 2


def _deflate_zeros(n: int) -> bytes:
    """zlib data of ``n`` zero bytes, compressed without holding them in memory."""
    comp, block = zlib.compressobj(9), bytes(1 << 20)
    out = [comp.compress(block) for _ in range(n >> 20)]
    return b"".join(out) + comp.flush()


def test_png_icc_profile_bomb_is_refused_without_inflating_it():
    # 256 MiB of profile in a 260 KB file: it used to be inflated into memory
    png = _png(PIL.Image.fromarray(synthetic_photo(20, 16, 1)))
    bomb = _rebuild_png(
        png,
        lambda k, b, c: (
            _same(k, b, c)
            + (_chunk(b"iCCP", b"icc\0\0" + _deflate_zeros(256 << 20)) if k == b"IHDR" else b"")
        ),
    )
    assert len(bomb) < 1 << 20
    assert starkret.preprocess([bomb]).failures == [
        (0, "corrupt: PNG: iCCP profile decompresses to more than 1 MiB")
    ]
    assert not _pillow_decodes(bomb)


@pytest.mark.parametrize("where", ["before the image data", "after the image data"])
def test_png_text_bomb_is_refused_like_pillow(where):
    png = _png(PIL.Image.fromarray(synthetic_photo(20, 16, 1)))
    ztxt = _chunk(b"zTXt", b"comment\0\0" + _deflate_zeros(8 << 20))
    anchor = b"IHDR" if where == "before the image data" else b"IEND"

    def edit(k, b, c):
        if k != anchor:
            return _same(k, b, c)
        return _same(k, b, c) + ztxt if k == b"IHDR" else ztxt + _same(k, b, c)

    bomb = _rebuild_png(png, edit)
    assert starkret.preprocess([bomb]).failures == [
        (0, "corrupt: PNG: zTXt text decompresses to more than 1 MiB")
    ]
    assert not _pillow_decodes(bomb)


# ==== Item 2: thin images ====


def _thin_png(height: int) -> bytes:
    """A 1 x height grayscale PNG, written row by row (19 KB for 10 million rows)."""
    comp = zlib.compressobj(9)
    rows = b"".join(comp.compress(b"\0\x80" * 65536) for _ in range(height // 65536))
    rows += comp.compress(b"\0\x80" * (height % 65536)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", 1, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")
    )


def test_thin_png_is_too_large_not_a_crash(tmp_path):
    # 1 x 10,000,000 used to make the resampler allocate 53 GB and abort the
    # process, so this runs in a child process.
    path = tmp_path / "thin.png"
    path.write_bytes(_thin_png(10_000_000))
    assert path.stat().st_size < 32_000
    code = (
        f"import starkret; print(starkret.preprocess([open({str(path)!r}, 'rb').read()]).failures)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "too large: 1x10000000 resizes to 336x3360000000, over 67108864 pixels"
    assert done.stdout.strip() == str([(0, expected)])


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "PNG"])
def test_thin_image_is_too_large_in_every_path(fmt):
    # GIF, BMP and TIFF go through Pillow, which resizes the whole image: this one
    # used to raise MemoryError out of preprocess (or take gigabytes)
    data = encode(PIL.Image.fromarray(np.full((65535, 1), 128, np.uint8)), fmt)
    batch = starkret.preprocess([data, GOOD])
    assert batch.failures == [
        (0, "too large: 1x65535 resizes to 336x22019760, over 67108864 pixels")
    ]
    assert batch.index.tolist() == [1]


def test_thin_webp_is_too_large_not_a_memory_error():
    data = encode(PIL.Image.fromarray(np.full((16383, 1, 3), 90, np.uint8)), "WEBP")
    assert starkret.preprocess([data]).failures == [
        (0, "too large: 1x16383 resizes to 336x5504688, over 67108864 pixels")
    ]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_thin_image_under_the_bound_matches_the_reference(fmt):
    # the Rust path computes only the crop window's taps; the result is the same
    strip = np.arange(0, 250, 5, dtype=np.uint8).repeat(3)[:150].reshape(150, 1)
    data = encode(PIL.Image.fromarray(strip), fmt)
    batch = starkret.preprocess([data], dtype="uint8")
    assert batch.failures == []
    np.testing.assert_array_equal(batch.pixels[0].transpose(1, 2, 0), reference_crop(data))


def test_pillow_failures_never_escape(monkeypatch):
    gif = encode(PIL.Image.fromarray(synthetic_photo(40, 30, 2)).quantize(16), "GIF")

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(PIL.Image.Image, "resize", out_of_memory)
    batch = starkret.preprocess([gif, GOOD])
    assert batch.failures == [(0, "too large: Pillow ran out of memory")]
    assert batch.index.tolist() == [1]

    def broken(*args, **kwargs):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(PIL.Image.Image, "resize", broken)
    assert starkret.preprocess([gif]).failures == [
        (0, "corrupt: Pillow failed (RuntimeError: unexpected)")
    ]


def test_pillow_fallback_does_not_import_torch():
    code = (
        "import sys, starkret; from starkret.testing import encode, synthetic_photo; "
        "import PIL.Image; "
        "gif = encode(PIL.Image.fromarray(synthetic_photo(40, 30)).quantize(9), 'GIF'); "
        "b = starkret.preprocess([gif]); b16 = starkret.preprocess([gif], dtype='float16'); "
        "assert b.fallbacks == [0] and b16.fallbacks == [0], (b.failures, b16.failures); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("mean", "std"),
    [
        (OPENAI_MEAN, OPENAI_STD),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ],
)
def test_normalisation_table_equals_torchvision(mean, std):
    import torch
    from torchvision.transforms import functional as F

    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    expected = F.normalize(F.to_tensor(ramp), list(mean), list(std))[:, 0, :]
    np.testing.assert_array_equal(normalisation_table(mean, std, "float32"), expected.numpy())
    np.testing.assert_array_equal(
        normalisation_table(mean, std, "float16"), expected.to(torch.float16).numpy()
    )


# ==== Agreement with Pillow ====


def _assert_like_pillow(data: bytes) -> None:
    batch = starkret.preprocess([data], dtype="uint8")
    assert batch.failures == [] and batch.fallbacks == []
    np.testing.assert_array_equal(batch.pixels[0].transpose(1, 2, 0), reference_crop(data))


def test_jpeg_with_extraneous_bytes_before_a_marker_decodes_like_pillow():
    # libjpeg only warns ("3 extraneous bytes before marker 0xc4")
    data = _join((m, b"\0\x12\x34" + s if m == 0xC4 else s) for m, s in _segments(GOOD))
    _assert_like_pillow(data)


def test_jpeg_fatal_error_after_a_warning_is_not_taken_for_a_warning():
    # 0xFF of the DQT marker damaged: libjpeg warns about extraneous bytes, then
    # fails for the missing table; TurboJPEG still calls the whole call a warning
    gray = encode(PIL.Image.fromarray(synthetic_photo(24, 20, 2)).convert("L"), "JPEG")
    at = gray.index(b"\xff\xdb")
    data = gray[:at] + b"\xf7" + gray[at + 1 :]
    assert not _pillow_decodes(data)
    assert starkret.preprocess([data]).failures == [
        (0, "corrupt: JPEG: Quantization table 0x00 was not defined")
    ]


@pytest.mark.parametrize("cut", [2, 40, 300])
def test_truncated_progressive_jpeg_is_truncated_like_pillow(cut):
    data = GOOD_PROGRESSIVE[:-cut]
    assert not _pillow_decodes(data)
    (reason,) = [r for _, r in starkret.preprocess([data]).failures]
    assert reason.startswith("truncated:")


def _photo_png(mode="RGB", **options) -> bytes:
    image = PIL.Image.fromarray(synthetic_photo(40, 30, 5))
    return _png(image.quantize(16) if mode == "P" else image, **options)


PNG_PILLOW_DECODES = {
    "bad IDAT CRC": lambda: _rebuild_png(
        _photo_png(), lambda k, b, c: _same(k, b, b"\0\0\0\0" if k == b"IDAT" else c)
    ),
    "missing IEND": lambda: _rebuild_png(
        _photo_png(), lambda k, b, c: b"" if k == b"IEND" else _same(k, b, c)
    ),
    "IEND cut": lambda: _photo_png()[:-5],
    "empty PLTE": lambda: _rebuild_png(
        _photo_png("P"), lambda k, b, c: _chunk(k, b"") if k == b"PLTE" else _same(k, b, c)
    ),
    "IHDR compression method 1": lambda: _rebuild_png(
        _photo_png(),
        lambda k, b, c: _chunk(k, b[:10] + b"\1" + b[11:]) if k == b"IHDR" else _same(k, b, c),
    ),
}


@pytest.mark.parametrize("name", sorted(PNG_PILLOW_DECODES))
def test_damaged_png_that_pillow_decodes_is_decoded(name):
    data = PNG_PILLOW_DECODES[name]()
    assert _pillow_decodes(data)
    _assert_like_pillow(data)


def _after_ihdr(extra: bytes):
    return lambda k, b, c: _same(k, b, c) + (extra if k == b"IHDR" else b"")


PNG_PILLOW_REJECTS = {
    "bad IHDR CRC": (
        lambda k, b, c: _same(k, b, b"\0\0\0\0" if k == b"IHDR" else c),
        "corrupt: PNG: bad checksum in IHDR chunk",
    ),
    "zTXt compression method 1": (
        _after_ihdr(_chunk(b"zTXt", b"k\0\1" + zlib.compress(b"text"))),
        "corrupt: PNG: unknown compression method 1 in zTXt chunk",
    ),
    "APNG frame sequence error": (
        _after_ihdr(
            _chunk(b"acTL", struct.pack(">II", 1, 0))
            + _chunk(b"fcTL", struct.pack(">IIIIIHHBB", 5, 40, 30, 0, 0, 1, 10, 0, 0))
        ),
        "corrupt: PNG: APNG contains frame sequence errors",
    ),
    "chunk type not a name": (
        _after_ihdr(_chunk(b"\1\2\3\4", b"xx")),
        "corrupt: PNG: chunk type '\\x01\\x02\\x03\\x04' is not a name",
    ),
    "IDAT Adler-32 wrong": (
        lambda k, b, c: _same(k, b[:-1] + bytes([b[-1] ^ 1]) if k == b"IDAT" else b, c),
        "corrupt: PNG: image data is not valid deflate data (wrong checksum)",
    ),
}


@pytest.mark.parametrize("name", sorted(PNG_PILLOW_REJECTS))
def test_damaged_png_that_pillow_rejects_is_rejected(name):
    edit, reason = PNG_PILLOW_REJECTS[name]
    data = _rebuild_png(_photo_png(), edit)
    assert not _pillow_decodes(data)
    assert starkret.preprocess([data]).failures == [(0, reason)]


def test_png_cut_inside_the_image_data_is_truncated():
    png = _photo_png()
    data = png[: len(png) // 2]
    assert not _pillow_decodes(data)
    assert starkret.preprocess([data]).failures == [
        (0, "truncated: PNG data ends inside the image data")
    ]
