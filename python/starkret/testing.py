"""Synthetic images for starkret's tests, benchmarks and demo (no downloads needed).

The photos are smooth colour fields with texture and edges, so JPEG compresses them
like real photographs (a flat or pure-noise image would not exercise the decoder).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

__all__ = ["encode", "raw_png", "synthetic_photo"]


def synthetic_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 photo-like image: gradients, blobs, edges and grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(0.5, 4.0, 3)
        img[..., c] = 0.5 + 0.35 * np.sin(a * np.pi * x + p) * np.cos(b * np.pi * y + c)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
        img[mask] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def encode(image, fmt: str, **options) -> bytes:
    """Encode a PIL image or an (H, W[, C]) uint8 array with Pillow (``fmt``: JPEG, PNG, ...)."""
    import PIL.Image

    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(
    rows: np.ndarray,
    *,
    width: int,
    height: int,
    color_type: int,
    bit_depth: int,
    palette: bytes | None = None,
) -> bytes:
    """A PNG written byte by byte, for modes Pillow cannot save (16-bit RGB, 2-bit gray...).

    ``rows`` holds the already packed scanline bytes, (n_rows, bytes_per_row) uint8;
    fewer rows than ``height`` make a truncated image (or, large, a decompression bomb).
    """
    out = b"\x89PNG\r\n\x1a\n"
    out += _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        out += _chunk(b"PLTE", palette)
    raw = b"".join(b"\x00" + bytes(row) for row in np.asarray(rows, np.uint8))
    out += _chunk(b"IDAT", zlib.compress(raw))
    return out + _chunk(b"IEND", b"")
