"""CLIP image preprocessing in Rust, bit-exact with open_clip's transform on PIL images."""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import _core

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "PreprocessedBatch",
    "normalisation_table",
    "preprocess",
    "reference_crop",
]

#: CLIP's (OpenAI) normalisation constants, as open_clip uses them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: Pillow refuses images over 2 x ``Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels) as
#: decompression bombs; starkret refuses the same by default, before decoding a pixel.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

_MODES = ("exact", "fast")
_DTYPES = ("float32", "float16", "uint8")


@dataclass
class PreprocessedBatch:
    """The result of :func:`preprocess`.

    ``pixels[i]`` is the input at position ``index[i]``; inputs that could not be
    processed are in ``failures`` as ``(position, reason)``; ``fallbacks`` lists the
    positions that were decoded by Pillow because no bit-exact Rust path exists for
    their format (WebP, GIF, BMP, CMYK JPEG, ...).
    """

    pixels: np.ndarray
    index: np.ndarray
    failures: list[tuple[int, str]] = field(default_factory=list)
    fallbacks: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.index.shape[0])


@functools.lru_cache(maxsize=16)
def normalisation_table(
    mean: tuple[float, ...] = OPENAI_MEAN,
    std: tuple[float, ...] = OPENAI_STD,
    dtype: str = "float32",
) -> np.ndarray:
    """The (3, 256) table mapping each uint8 channel value to its normalised value.

    It is computed by torchvision's own ``to_tensor`` and ``normalize`` on every byte
    value, so a lookup gives exactly what the reference transform computes.
    """
    import torch
    from torchvision.transforms import functional as F

    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # (1, 256, 3)
    values = F.normalize(F.to_tensor(ramp), list(mean), list(std))  # (3, 1, 256)
    table = values[:, 0, :]
    if dtype == "float16":
        table = table.to(torch.float16)
    out = table.contiguous().numpy()
    out.setflags(write=False)
    return out


def _as_bytes(images: Sequence[object]) -> list[bytes]:
    if isinstance(images, (bytes, bytearray, memoryview, str)):
        raise TypeError("images must be a sequence of encoded images, not a single one")
    out = []
    for i, item in enumerate(images):
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, (bytearray, memoryview)):
            out.append(bytes(item))
        else:
            raise TypeError(f"images[{i}] is {type(item).__name__}, expected bytes")
    return out


def _check_options(size: int, mode: str, dtype: str, threads: int | None, max_pixels: int) -> None:
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if threads is not None and (not isinstance(threads, int) or threads <= 0):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def preprocess(
    images: Sequence[bytes],
    *,
    size: int = 336,
    mode: str = "exact",
    dtype: str = "float32",
    threads: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> PreprocessedBatch:
    """Decode encoded images and turn them into CLIP input tensors, in Rust.

    Equivalent to open_clip's ``Resize(size, BICUBIC)``, ``CenterCrop(size)``,
    ``convert("RGB")``, ``ToTensor``, ``Normalize`` on ``PIL.Image.open(bytes)``. In
    ``mode="exact"`` (default) the uint8 crop is bit-identical to that reference for
    JPEG and PNG, and normalised values equal it exactly; other formats go through
    Pillow (counted in ``fallbacks``). ``mode="fast"`` lets libjpeg-turbo shrink large
    JPEGs in the DCT domain first (see the README for its measured error).

    The work runs on ``threads`` Rust threads (default: all cores) without the GIL.
    Bad inputs never raise: each is reported in ``failures`` with a reason that starts
    with ``empty``, ``not an image``, ``truncated``, ``too large``, ``corrupt`` or
    ``unsupported format``. ``dtype="uint8"`` returns the crops before normalisation.

    >>> import io, PIL.Image
    >>> buf = io.BytesIO(); PIL.Image.new("RGB", (640, 480), "teal").save(buf, "PNG")
    >>> batch = preprocess([buf.getvalue(), b"not an image"])
    >>> batch.pixels.shape, batch.index.tolist(), batch.failures[0][1][:12]
    ((1, 3, 336, 336), [0], 'not an image')
    """
    _check_options(size, mode, dtype, threads, max_pixels)
    data = _as_bytes(images)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if dtype == "uint8":
        hwc, (ok, failures, fallbacks) = _core.preprocess_u8(data, size, mode, max_pixels, threads)
        pixels = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    elif dtype == "float16":
        table = normalisation_table(mean, std, "float16").view(np.uint16)
        bits, (ok, failures, fallbacks) = _core.preprocess_f16_bits(
            data, size, mode, table, max_pixels, threads
        )
        pixels = bits.view(np.float16)
    else:
        table = normalisation_table(mean, std, "float32")
        pixels, (ok, failures, fallbacks) = _core.preprocess_f32(
            data, size, mode, table, max_pixels, threads
        )
    index = np.asarray(ok, dtype=np.int64)
    failures = list(failures)
    if not fallbacks:
        return PreprocessedBatch(pixels, index, sorted(failures), [])

    extra_pos, extra_pix = [], []
    for pos, _format in fallbacks:
        try:
            crop = reference_crop(data[pos], size=size, max_pixels=max_pixels)
        except _PillowFailure as exc:
            failures.append((pos, str(exc)))
            continue
        extra_pos.append(pos)
        extra_pix.append(_finish(crop, dtype, mean, std))
    if not extra_pos:
        return PreprocessedBatch(pixels, index, sorted(failures), [])
    merged_index = np.concatenate([index, np.asarray(extra_pos, dtype=np.int64)])
    order = np.argsort(merged_index, kind="stable")
    merged = np.concatenate([pixels, np.stack(extra_pix)])[order]
    return PreprocessedBatch(merged, merged_index[order], sorted(failures), sorted(extra_pos))


def _finish(crop: np.ndarray, dtype: str, mean, std) -> np.ndarray:
    """An (S, S, 3) uint8 crop as a (3, S, S) array of the requested dtype."""
    chw = crop.transpose(2, 0, 1)
    if dtype == "uint8":
        return np.ascontiguousarray(chw)
    table = normalisation_table(mean, std, dtype)
    return np.stack([table[c][chw[c]] for c in range(3)])


class _PillowFailure(Exception):
    """Pillow could not produce a crop; the message is the failure reason."""


def reference_crop(data: bytes, *, size: int = 336, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The reference uint8 crop (size, size, 3) made by Pillow + torchvision.

    This is exactly open_clip's transform up to ``convert("RGB")``; starkret uses it
    as the fallback for formats its Rust decoder does not reproduce bit for bit.
    """
    import PIL.Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    if not data:
        raise _PillowFailure("empty: zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise _PillowFailure(
                    f"too large: {width}x{height} exceeds max_pixels ({max_pixels})"
                )
            image.load()
    except _PillowFailure:
        raise
    except PIL.Image.DecompressionBombError as exc:
        raise _PillowFailure(f"too large: {exc}") from None
    except PIL.UnidentifiedImageError:
        raise _PillowFailure("not an image: Pillow cannot identify it") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        kind = "truncated" if "truncated" in text or isinstance(exc, EOFError) else "corrupt"
        raise _PillowFailure(f"{kind}: {text}") from None
    resized = F.resize(image, [size], interpolation=InterpolationMode.BICUBIC)
    cropped = F.center_crop(resized, [size, size])
    return np.asarray(cropped.convert("RGB"), dtype=np.uint8)
