"""starkret.preprocess against the reference: open_clip's transform applied to PIL images."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch

import starkret
from starkret.ingest.preprocess import reference_crop
from starkret.testing import encode, raw_png, synthetic_photo

SIZES = [
    (640, 480),
    (480, 640),
    (336, 336),  # short side already 336: no resize
    (336, 500),
    (500, 336),
    (339, 337),  # odd crop slack on both axes
    (341, 336),
    (256, 256),  # img2dataset's CC12M size: upscaled
    (1, 1),
    (4000, 40),  # extreme aspect ratios
    (40, 999),
    (1280, 960),
    (100, 37),
    # Pillow 13 runs the vertical pass first when the height shrinks by more than
    # twice as many pixels as the width: these take that order.
    (338, 808),
    (379, 760),
    (800, 338),
]


@pytest.fixture(scope="module")
def reference_transform():
    """open_clip's own inference transform, as create_model_and_transforms builds it.

    starkret-tiny has the ViT-L-14-336 preprocessing config (336 px, OpenAI mean/std,
    bicubic, shortest-side resize), so this is the reference transform without
    instantiating a 428M-parameter model.
    """
    import open_clip

    from starkret.ingest.towers import _open_clip

    _open_clip()
    _, _, transform = open_clip.create_model_and_transforms("starkret-tiny")
    big = open_clip.get_model_config("ViT-L-14-336-quickgelu")
    assert big["vision_cfg"]["image_size"] == 336 and "preprocess_cfg" not in big
    return transform


def _photo(w: int, h: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    rgb = PIL.Image.fromarray(synthetic_photo(w, h, seed))
    if mode == "RGBA":
        alpha = np.linspace(0, 255, w * h).reshape(h, w).astype(np.uint8)
        rgb.putalpha(PIL.Image.fromarray(alpha))
        return rgb
    if mode == "LA":
        gray = rgb.convert("L")
        gray.putalpha(PIL.Image.fromarray(synthetic_photo(w, h, seed + 1)[..., 0]))
        return gray
    if mode == "P":
        return rgb.quantize(colors=200)
    return rgb.convert(mode)


def _crop_of(data: bytes, **kw) -> np.ndarray:
    batch = starkret.preprocess([data], dtype="uint8", **kw)
    assert batch.failures == [], batch.failures
    return batch.pixels[0].transpose(1, 2, 0)


def _assert_exact(data: bytes) -> None:
    ours = _crop_of(data)
    ref = reference_crop(data)
    assert ours.shape == ref.shape == (336, 336, 3)
    diff = np.argwhere(ours != ref)
    assert diff.size == 0, f"{len(diff)} pixels differ, first at {diff[:3].tolist()}"


# ==== Bit-exact parity ====


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_jpeg_rgb_crop_is_bit_exact(w, h):
    _assert_exact(encode(_photo(w, h), "JPEG", quality=90))


@pytest.mark.parametrize(
    "options",
    [
        {"quality": 75, "subsampling": 2},  # 4:2:0
        {"quality": 95, "subsampling": 0},  # 4:4:4
        {"quality": 85, "subsampling": 1},  # 4:2:2
        {"quality": 80, "progressive": True},
        {"quality": 60, "optimize": True, "subsampling": 2},
    ],
)
@pytest.mark.parametrize(("w", "h"), [(640, 480), (333, 517), (1001, 1001)])
def test_jpeg_encodings_are_bit_exact(options, w, h):
    _assert_exact(encode(_photo(w, h, seed=3), "JPEG", **options))


@pytest.mark.parametrize(("w", "h"), [(640, 480), (200, 900), (336, 336)])
def test_grayscale_jpeg_is_bit_exact(w, h):
    _assert_exact(encode(_photo(w, h, "L"), "JPEG", quality=88))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1"])
@pytest.mark.parametrize(("w", "h"), [(640, 480), (123, 457), (336, 341), (2, 3)])
def test_png_modes_are_bit_exact(mode, w, h):
    _assert_exact(encode(_photo(w, h, mode, seed=7), "PNG"))


def test_png_16bit_gray_is_bit_exact():
    values = (synthetic_photo(300, 200, 5)[..., 0].astype(np.uint16) * 3).astype(np.uint16)
    image = PIL.Image.frombytes("I;16", (300, 200), values.tobytes())
    _assert_exact(encode(image, "PNG"))


def _bits(values: np.ndarray, depth: int) -> np.ndarray:
    """Pack rows of small integers MSB-first at `depth` bits each."""
    per_byte = 8 // depth
    h, w = values.shape
    padded = np.zeros((h, -(-w // per_byte) * per_byte), np.uint8)
    padded[:, :w] = values
    grouped = padded.reshape(h, -1, per_byte).astype(np.uint16)
    shifts = np.array([8 - depth * (i + 1) for i in range(per_byte)], np.uint16)
    return (grouped << shifts).sum(axis=2).astype(np.uint8)


@pytest.mark.parametrize(
    ("color_type", "depth", "channels"),
    [(2, 16, 3), (6, 16, 4), (4, 16, 2), (0, 2, 1), (0, 4, 1), (3, 2, 1), (3, 4, 1)],
)
def test_png_modes_pillow_cannot_write_are_bit_exact(color_type, depth, channels):
    rng = np.random.default_rng(color_type * 100 + depth)
    w, h = 97, 61
    palette = None
    if depth == 16:
        samples = rng.integers(0, 65536, (h, w * channels), dtype=np.uint16)
        rows = samples.astype(">u2").view(np.uint8).reshape(h, -1)
    else:
        rows = _bits(rng.integers(0, 2**depth, (h, w)), depth)
        if color_type == 3:
            # fewer palette entries than indices: missing entries must read as black
            palette = bytes(rng.integers(0, 256, 3 * (2**depth - 1), dtype=np.uint8))
    data = raw_png(rows, width=w, height=h, color_type=color_type, bit_depth=depth, palette=palette)
    _assert_exact(data)


def test_interlaced_png_is_bit_exact():
    _assert_exact(encode(_photo(211, 150, seed=9), "PNG", interlace=1))


# ==== Normalised values against open_clip's transform ====


@pytest.mark.parametrize(
    ("w", "h", "fmt", "mode"),
    [(640, 480, "JPEG", "RGB"), (300, 700, "PNG", "RGBA"), (256, 256, "JPEG", "L")],
)
def test_normalised_pixels_equal_open_clip_transform(reference_transform, w, h, fmt, mode):
    data = encode(_photo(w, h, mode, seed=11), fmt)
    expected = reference_transform(PIL.Image.open(io.BytesIO(data))).numpy()
    got32 = starkret.preprocess([data]).pixels[0]
    assert got32.dtype == np.float32 and got32.flags.c_contiguous
    np.testing.assert_array_equal(got32, expected)
    got16 = starkret.preprocess([data], dtype="float16").pixels[0]
    np.testing.assert_array_equal(got16, torch.from_numpy(expected).half().numpy())


def test_custom_size_matches_reference_crop():
    data = encode(_photo(500, 400), "JPEG")
    ours = starkret.preprocess([data], size=224, dtype="uint8").pixels[0].transpose(1, 2, 0)
    np.testing.assert_array_equal(ours, reference_crop(data, size=224))


# ==== Formats routed to Pillow ====


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("WEBP", "RGB", {"quality": 80}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {}),
        ("JPEG", "CMYK", {}),
    ],
)
def test_other_formats_fall_back_to_pillow_and_are_counted(reference_transform, fmt, mode, options):
    data = encode(_photo(400, 300, mode, seed=2), fmt, **options)
    good = encode(_photo(320, 240), "JPEG")
    batch = starkret.preprocess([good, data, good])
    assert batch.index.tolist() == [0, 1, 2]
    assert batch.fallbacks == [1]
    expected = reference_transform(PIL.Image.open(io.BytesIO(data))).numpy()
    np.testing.assert_array_equal(batch.pixels[1], expected)
    np.testing.assert_array_equal(batch.pixels[0], batch.pixels[2])


# ==== Bad inputs: specific failures, never a crash ====


def test_bad_inputs_are_reported_and_the_rest_is_processed():
    good = encode(_photo(640, 480), "JPEG")
    jpeg = encode(_photo(800, 600, seed=4), "JPEG")
    png = encode(_photo(300, 300, seed=4), "PNG")
    # a decompression bomb: the header claims 30000x30000, the data is a single row
    bomb = raw_png(np.zeros((1, 30000)), width=30000, height=30000, color_type=0, bit_depth=8)
    inputs = [
        good,
        b"",
        jpeg[: len(jpeg) // 2],
        b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
        bomb,
        png[: len(png) // 3],
        b"\x00\x01\x02 definitely not an image",
        jpeg[:3] + b"\x00" * 50,
        good,
    ]
    batch = starkret.preprocess(inputs)
    reasons = dict(batch.failures)
    assert batch.index.tolist() == [0, 8]
    assert batch.pixels.shape == (2, 3, 336, 336)
    assert reasons[1].startswith("empty")
    assert reasons[2].startswith("truncated")
    assert reasons[3].startswith("not an image")
    assert reasons[4] == "too large: 30000x30000 exceeds max_pixels (178956970)"
    assert reasons[5].startswith("truncated")
    assert reasons[6].startswith("not an image")
    assert reasons[7].split(":")[0] in {"corrupt", "truncated"}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]


def test_reference_also_rejects_the_truncated_jpeg():
    jpeg = encode(_photo(800, 600, seed=4), "JPEG")
    with pytest.raises(OSError, match="truncated"):
        PIL.Image.open(io.BytesIO(jpeg[: len(jpeg) // 2])).load()


def test_max_pixels_is_configurable():
    data = encode(_photo(640, 480), "JPEG")
    batch = starkret.preprocess([data], max_pixels=640 * 480 - 1)
    assert batch.failures == [(0, "too large: 640x480 exceeds max_pixels (307199)")]
    assert len(starkret.preprocess([data], max_pixels=640 * 480)) == 1


def test_extension_is_ignored_format_is_sniffed():
    # img2dataset --disable_all_reencoding stores PNG bytes in .jpg members
    png = encode(_photo(400, 300), "PNG")
    assert starkret.preprocess([png]).failures == []


def test_thread_count_does_not_change_results():
    inputs = [encode(_photo(300 + 17 * i, 250 + 9 * i, seed=i), "JPEG") for i in range(6)]
    one = starkret.preprocess(inputs, threads=1)
    two = starkret.preprocess(inputs, threads=2)
    np.testing.assert_array_equal(one.pixels, two.pixels)


def test_empty_batch():
    batch = starkret.preprocess([])
    assert batch.pixels.shape == (0, 3, 336, 336) and len(batch) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"size": 0}, ValueError, "size"),
        ({"mode": "turbo"}, ValueError, "mode"),
        ({"dtype": "int8"}, ValueError, "dtype"),
        ({"threads": 0}, ValueError, "threads"),
        ({"max_pixels": -5}, ValueError, "max_pixels"),
    ],
)
def test_bad_parameters_raise_specific_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        starkret.preprocess([b"x"], **kwargs)


def test_non_bytes_inputs_are_refused_with_their_position():
    with pytest.raises(TypeError, match=r"images\[1\]"):
        starkret.preprocess([b"x", 3])
    with pytest.raises(TypeError, match="single one"):
        starkret.preprocess(b"abc")


# ==== fast mode ====


def test_fast_mode_is_close_to_the_reference():
    data = encode(_photo(1600, 1200, seed=5), "JPEG", quality=90)
    fast = _crop_of(data, mode="fast").astype(np.int16)
    ref = reference_crop(data).astype(np.int16)
    err = np.abs(fast - ref)
    assert err.mean() < 3.0, err.mean()
    # small images have nothing to shrink in the DCT domain: fast equals exact there
    small = encode(_photo(640, 480), "JPEG")
    np.testing.assert_array_equal(_crop_of(small, mode="fast"), reference_crop(small))


def test_random_sizes_and_formats_are_bit_exact():
    rng = np.random.default_rng(2024)
    for i in range(30):
        w, h = (int(v) for v in rng.integers(1, 1100, 2))
        mode, fmt = [("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("RGB", "PNG")][i % 4]
        _assert_exact(encode(_photo(w, h, mode, seed=i), fmt))


# ==== Writing into a caller's array (out=) ====


def _mixed_batch() -> list[bytes]:
    """JPEGs, a PNG, a WebP (Pillow fallback) and a broken image, in that order."""
    images = [encode(synthetic_photo(120 + 31 * i, 90 + 17 * i, seed=i), "JPEG") for i in range(3)]
    images.insert(1, encode(synthetic_photo(70, 50, seed=7), "PNG"))
    images.insert(3, encode(synthetic_photo(64, 80, seed=8), "WEBP"))
    images.insert(2, b"not an image")
    return images


@pytest.mark.parametrize(
    ("dtype", "layout", "item"),
    [
        ("float32", "chw", (3, 48, 48)),
        ("float16", "chw", (3, 48, 48)),
        ("uint8", "hwc", (48, 48, 3)),
    ],
)
def test_out_reused_across_calls_gives_the_bytes_of_fresh_arrays(dtype, layout, item):
    images = _mixed_batch()
    out = np.full((len(images) + 2, *item), 77, dtype=dtype)  # dirty, larger than needed
    for batch_images in (images, images[::-1], images[:2]):
        fresh = starkret.preprocess(batch_images, size=48, dtype=dtype, layout=layout)
        into = starkret.preprocess(batch_images, size=48, dtype=dtype, layout=layout, out=out)
        assert np.shares_memory(into.pixels, out)
        assert into.pixels.dtype == fresh.pixels.dtype
        assert into.pixels.tobytes() == fresh.pixels.tobytes()
        assert into.index.tolist() == fresh.index.tolist()
        assert into.failures == fresh.failures and into.fallbacks == fresh.fallbacks


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (np.empty((2, 3, 48, 48), np.float32), "shape"),
        (np.empty((6, 3, 48, 47), np.float32), "shape"),
        (np.empty((6, 3, 48, 48), np.float64), "dtype"),
        (np.empty((6, 48, 3, 48), np.float32).transpose(0, 2, 1, 3), "C-contiguous"),
        ([[0.0]], "numpy array"),
    ],
)
def test_bad_out_arrays_are_refused(out, message):
    with pytest.raises((starkret.InvalidInputError, starkret.InvalidTypeError), match=message):
        starkret.preprocess(_mixed_batch(), size=48, out=out)


def test_read_only_out_is_refused():
    out = np.empty((6, 3, 48, 48), np.float32)
    out.setflags(write=False)
    with pytest.raises(starkret.InvalidInputError, match="writeable"):
        starkret.preprocess(_mixed_batch(), size=48, out=out)
