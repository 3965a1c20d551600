"""CLIP image preprocessing in Rust, bit-exact with open_clip's transform on PIL images."""

from __future__ import annotations

import functools
import io
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

import starkret._core as _core
from starkret.errors import InvalidInputError, InvalidTypeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_RESIZED_PIXELS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "OutputPool",
    "PreprocessedBatch",
    "ShardBatch",
    "ShardBatchIterator",
    "normalisation_table",
    "preprocess",
    "preprocess_shards",
    "reference_crop",
    "thumbnail_uris",
]

#: CLIP's (OpenAI) normalisation constants, as open_clip uses them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

#: Pillow refuses images over 2 x ``Image.MAX_IMAGE_PIXELS`` (178,956,970 pixels) as
#: decompression bombs; starkret refuses the same by default, before decoding a pixel.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

#: Most pixels the resized image (before the center crop) may have; larger resizes are
#: ``too large:`` failures. 2**26 admits aspect ratios up to about 594:1 at 336 px.
#: The Rust path computes only the crop window, but Pillow (the fallback) resizes the
#: whole image: a 1x65535 strip would become 336x22,019,760 pixels. The bound keeps
#: the fallback's memory in check and both paths refusing the same images (Rust's
#: ``preprocess::MAX_RESIZED_PIXELS`` is the same number).
MAX_RESIZED_PIXELS = 1 << 26

_MODES = ("exact", "fast")
_DTYPES = ("float32", "float16", "uint8")
_LAYOUTS = ("chw", "hwc")


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

    It repeats torchvision's ``to_tensor`` (``v / 255`` in float32) and ``normalize``
    (``(x - mean) / std`` with float32 mean and std) in float32 numpy arithmetic,
    whose IEEE rounding is the same, so a lookup gives exactly what the reference
    transform computes (tests check it against torch) without importing torch.
    """
    ramp = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (ramp[None, :] - mean32) / std32
    if dtype == "float16":
        table = table.astype(np.float16)
    out = np.ascontiguousarray(table)
    out.setflags(write=False)
    return out


def _as_bytes(images: Sequence[object]) -> list[bytes]:
    if isinstance(images, (bytes, bytearray, memoryview, str)):
        raise InvalidTypeError("images must be a sequence of encoded images, not a single one")
    out = []
    for i, item in enumerate(images):
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, (bytearray, memoryview)):
            out.append(bytes(item))
        else:
            raise InvalidTypeError(f"images[{i}] is {type(item).__name__}, expected bytes")
    return out


def _check_options(
    size: int, mode: str, dtype: str, threads: int | None, max_pixels: int, layout: str = "chw"
) -> None:
    if not isinstance(size, int) or size <= 0:
        raise InvalidInputError(f"size must be a positive int, got {size!r}")
    if mode not in _MODES:
        raise InvalidInputError(f"mode must be one of {_MODES}, got {mode!r}")
    if dtype not in _DTYPES:
        raise InvalidInputError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if layout not in _LAYOUTS:
        raise InvalidInputError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if layout == "hwc" and dtype != "uint8":
        raise InvalidInputError(f"layout='hwc' is for dtype='uint8' crops, got dtype={dtype!r}")
    if threads is not None and (not isinstance(threads, int) or threads <= 0):
        raise InvalidInputError(f"threads must be a positive int or None, got {threads!r}")
    if not isinstance(max_pixels, int) or max_pixels <= 0:
        raise InvalidInputError(f"max_pixels must be a positive int, got {max_pixels!r}")


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
    layout: str = "chw",
    out: np.ndarray | None = None,
) -> PreprocessedBatch:
    """Decode encoded images and turn them into CLIP input tensors, in Rust.

    Equivalent to open_clip's ``Resize(size, BICUBIC)``, ``CenterCrop(size)``,
    ``convert("RGB")``, ``ToTensor``, ``Normalize`` on ``PIL.Image.open(bytes)``. In
    ``mode="exact"`` (default) the uint8 crop is bit-identical to that reference for
    JPEG and PNG, and normalised values equal it exactly; other formats go through
    Pillow (counted in ``fallbacks``). ``mode="fast"`` lets libjpeg-turbo shrink large
    JPEGs in the DCT domain first (docs/ingest.md gives its measured error).

    The work runs on ``threads`` Rust threads (default: all cores) without the GIL.
    Bad inputs never raise: each is reported in ``failures`` with a reason that starts
    with ``empty``, ``not an image``, ``truncated``, ``too large``, ``corrupt`` or
    ``unsupported format``. ``dtype="uint8"`` returns the crops before normalisation,
    as (N, 3, S, S), or with ``layout="hwc"`` as (N, S, S, 3): the Rust core's own
    layout, handed over without a copy (what a GPU tower that normalises on the
    device takes).

    ``out`` reuses memory across calls: a writeable C-contiguous array of ``dtype``
    shaped (at least ``len(images)``, 3, S, S) (or (.., S, S, 3) for ``layout="hwc"``;
    not ``dtype="uint8"`` in CHW, which is a transposed copy anyway). The pixels are
    written into it and ``pixels`` is ``out[:len(batch)]``, a view: the next call with
    the same ``out`` overwrites it. A loop that preprocesses batch after batch into a
    fresh array makes the kernel fault in and zero new memory every time (a sixth of
    the time of a one-thread loop); with ``out`` that happens once.

    >>> import io, PIL.Image
    >>> buf = io.BytesIO(); PIL.Image.new("RGB", (640, 480), "teal").save(buf, "PNG")
    >>> batch = preprocess([buf.getvalue(), b"not an image"])
    >>> batch.pixels.shape, batch.index.tolist(), batch.failures[0][1][:12]
    ((1, 3, 336, 336), [0], 'not an image')
    """
    _check_options(size, mode, dtype, threads, max_pixels, layout)
    data = _as_bytes(images)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    target = None if out is None else _output_target(out, len(data), size, dtype, layout)
    pixels, (ok, failures, fallbacks) = _core.preprocess_images(
        data,
        size,
        mode,
        dtype,
        max_pixels,
        threads=threads,
        out=target,
        **_tables(dtype, mean, std),
    )
    pixels = _arrange(pixels, dtype, layout)
    index = np.asarray(ok, dtype=np.int64)
    done, failed = _pillow_fallbacks(
        [(pos, data[pos]) for pos, _format in fallbacks], size, max_pixels, dtype, mean, std, layout
    )
    failures = sorted([*failures, *failed])
    if done:
        pixels, index = _splice(pixels, index, done)
        if out is not None:  # rare (Pillow fallbacks): the merged rows go back into out
            out[: len(pixels)] = pixels
            pixels = out[: len(pixels)]
    return PreprocessedBatch(pixels, index, failures, sorted(pos for pos, _ in done))


class OutputPool:
    """Output arrays that a stream of :func:`preprocess` calls reuses (``out=``).

    :meth:`take` returns an array that no batch handed out earlier still uses, else a new
    one (at most ``limit`` are kept for reuse). Whether an array is in use is read from
    its reference count: every numpy view of it (a batch's ``pixels``, a slice of them)
    holds a reference to it, so it is free again only once the consumer has dropped all
    of them. The count of an idle array is measured once on this interpreter, not assumed.

    >>> pool = OutputPool(size=32, dtype="float32", layout="chw")
    >>> a = pool.take(4); view = a[:2]; b = pool.take(4)
    >>> a is b  # a is still referred to (by ``view`` and ``a``)
    False
    >>> del a, view; pool.take(4) is pool._buffers[0]
    True
    """

    def __init__(self, *, size: int, dtype: str, layout: str, limit: int = 8) -> None:
        item = (size, size, 3) if layout == "hwc" else (3, size, size)
        self._item, self._dtype, self._limit = item, np.dtype(dtype), limit
        self._buffers: list[np.ndarray] = []
        probe = [np.empty(0)]
        self._idle = self._references(probe, 0)

    @staticmethod
    def _references(buffers: list[np.ndarray], i: int) -> int:
        return sys.getrefcount(buffers[i])

    def take(self, n: int) -> np.ndarray:
        """An array of at least ``n`` rows that nothing else refers to."""
        for i in range(len(self._buffers)):
            # counted while only the list (and the count's own argument) refers to it
            if self._buffers[i].shape[0] >= n and self._references(self._buffers, i) <= self._idle:
                return self._buffers[i]
        buf = np.empty((max(n, 1), *self._item), self._dtype)
        if len(self._buffers) < self._limit:
            self._buffers.append(buf)
        return buf


def _output_target(out: object, n: int, size: int, dtype: str, layout: str) -> np.ndarray:
    """``out`` checked for :func:`preprocess`, as the Rust core writes it (float16 as bits)."""
    if not isinstance(out, np.ndarray):
        raise InvalidTypeError(f"out must be a numpy array, got {type(out).__name__}")
    if dtype == "uint8" and layout == "chw":
        raise InvalidInputError("out is for float32/float16 CHW or uint8 layout='hwc' output")
    item = (size, size, 3) if dtype == "uint8" else (3, size, size)
    if out.dtype != np.dtype(dtype):
        raise InvalidInputError(f"out must have dtype {dtype}, got {out.dtype}")
    if out.ndim != 4 or out.shape[1:] != item or out.shape[0] < n:
        raise InvalidInputError(
            f"out must have shape ({n} or more, {', '.join(map(str, item))}), got {out.shape}"
        )
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise InvalidInputError("out must be C-contiguous and writeable")
    return out.view(np.uint16) if dtype == "float16" else out


def _pillow_fallbacks(items, size, max_pixels, dtype, mean, std, layout="chw"):
    """Preprocess ``(tag, bytes)`` items with Pillow.

    Returns ``([(tag, plane)], [(tag, reason)])``: the planes made and the failures.
    """
    done, failed = [], []
    for tag, data in items:
        try:
            crop = reference_crop(data, size=size, max_pixels=max_pixels)
        except _PillowFailure as exc:
            failed.append((tag, str(exc)))
            continue
        done.append((tag, _finish(crop, dtype, mean, std, layout)))
    return done, failed


def _splice(pixels: np.ndarray, index: np.ndarray, extra: list[tuple[int, np.ndarray]]):
    """Insert ``(position, plane)`` items into ``pixels`` so ``index`` stays sorted."""
    merged_index = np.concatenate([index, np.asarray([p for p, _ in extra], dtype=np.int64)])
    order = np.argsort(merged_index, kind="stable")
    merged = np.concatenate([pixels, np.stack([plane for _, plane in extra])])[order]
    return merged, merged_index[order]


def _tables(dtype: str, mean, std) -> dict:
    """The normalisation table the Rust core needs for ``dtype`` (none for uint8)."""
    if dtype == "float32":
        return {"lut_f32": normalisation_table(mean, std, "float32")}
    if dtype == "float16":
        return {"lut_f16": normalisation_table(mean, std, "float16").view(np.uint16)}
    return {}


def _arrange(pixels: np.ndarray, dtype: str, layout: str = "chw") -> np.ndarray:
    """The Rust core's output as (n, 3, S, S) of ``dtype`` (uint8 comes HWC, float16 as
    bits); uint8 in ``layout="hwc"`` stays (n, S, S, 3), untouched."""
    if dtype == "uint8":
        if layout == "hwc":
            return pixels
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    if dtype == "float16":
        return pixels.view(np.float16)
    return pixels


def _finish(crop: np.ndarray, dtype: str, mean, std, layout: str = "chw") -> np.ndarray:
    """An (S, S, 3) uint8 crop as a (3, S, S) array of the requested dtype (uint8 crops
    stay (S, S, 3) in ``layout="hwc"``)."""
    if dtype == "uint8" and layout == "hwc":
        return np.ascontiguousarray(crop)
    chw = crop.transpose(2, 0, 1)
    if dtype == "uint8":
        return np.ascontiguousarray(chw)
    table = normalisation_table(mean, std, dtype)
    return np.stack([table[c][chw[c]] for c in range(3)])


class _PillowFailure(Exception):
    """Pillow could not produce a crop; the message is the failure reason."""


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output size: the short side becomes ``size``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def reference_crop(data: bytes, *, size: int = 336, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The reference uint8 crop (size, size, 3): open_clip's transform up to ``convert("RGB")``.

    torchvision's ``Resize(size, BICUBIC)`` and ``CenterCrop(size)`` on a PIL image are
    ``Image.resize`` and ``Image.crop`` with sizes and offsets computed as here; doing
    them directly keeps torch out of the process. starkret uses this as the fallback
    for formats its Rust decoder does not reproduce bit for bit. Any failure, Pillow's
    errors and ``MemoryError`` included, is raised as ``_PillowFailure`` whose message
    is the reason; images over ``max_pixels`` or whose resize exceeds
    ``MAX_RESIZED_PIXELS`` are refused before any pixel is decoded.
    """
    import PIL.Image

    if not data:
        raise _PillowFailure("empty: zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            width, height = image.size
            _check_sizes(width, height, size, max_pixels)
            image.load()
            # torchvision returns the image unchanged when the size already matches
            new = _resized_size(width, height, size)
            if new != (width, height):
                image = image.resize(new, PIL.Image.Resampling.BICUBIC)
            left = round((new[0] - size) / 2.0)
            top = round((new[1] - size) / 2.0)
            crop = image.crop((left, top, left + size, top + size)).convert("RGB")
            return np.asarray(crop, dtype=np.uint8)
    except _PillowFailure:
        raise
    except PIL.Image.DecompressionBombError as exc:
        raise _PillowFailure(f"too large: {exc}") from None
    except PIL.UnidentifiedImageError:
        raise _PillowFailure("not an image: Pillow cannot identify it") from None
    except MemoryError:
        raise _PillowFailure("too large: Pillow ran out of memory") from None
    except (OSError, SyntaxError, EOFError) as exc:
        text = str(exc)
        kind = "truncated" if "truncated" in text or isinstance(exc, EOFError) else "corrupt"
        raise _PillowFailure(f"{kind}: {text}") from None
    except Exception as exc:  # any other Pillow failure is still one sample's failure
        raise _PillowFailure(f"corrupt: Pillow failed ({type(exc).__name__}: {exc})") from None


def _check_sizes(width: int, height: int, size: int, max_pixels: int) -> None:
    """The pixel budget and the resize bound, the same as the Rust path's."""
    if width <= 0 or height <= 0:
        raise _PillowFailure(f"corrupt: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise _PillowFailure(f"too large: {width}x{height} exceeds max_pixels ({max_pixels})")
    new_w, new_h = _resized_size(width, height, size)
    if new_w * new_h > MAX_RESIZED_PIXELS:
        raise _PillowFailure(
            f"too large: {width}x{height} resizes to {new_w}x{new_h}, "
            f"over {MAX_RESIZED_PIXELS} pixels"
        )


# ==== Shards straight to batches ====


@dataclass
class ShardBatch:
    """One batch of :func:`preprocess_shards`: row ``i`` of every column is one sample.

    Rows follow shard order, except that samples decoded by Pillow (``fallbacks``, by
    key) come last in their batch. ``failures`` are ``(shard, key_or_None, reason)``
    for the samples and shard parts that could not be used, found while this batch
    was read.
    """

    pixels: np.ndarray
    keys: list[str]
    shards: list[str]
    captions: list[str | None]
    urls: list[str | None]
    jsons: list[str | None]
    widths: list[int | None]
    heights: list[int | None]
    failures: list[tuple[str, str | None, str]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


class ShardBatchIterator(Iterator[ShardBatch]):
    """Batches prepared by Rust threads ahead of the consumer (see :func:`preprocess_shards`).

    ``failures`` accumulates every failure seen so far; each is also logged on the
    ``starkret`` logger at WARNING.
    """

    def __init__(self, core, *, size, max_pixels, dtype, mean, std, layout="chw") -> None:
        self._core = core
        self._size, self._max_pixels, self._dtype = size, max_pixels, dtype
        self._layout = layout
        self._mean, self._std = mean, std
        self.failures: list[tuple[str, str | None, str]] = []

    def __iter__(self) -> ShardBatchIterator:
        return self

    def __next__(self) -> ShardBatch:
        raw = next(self._core)
        pixels = _arrange(raw["pixels"], self._dtype, self._layout)
        batch = ShardBatch(
            pixels,
            raw["key"],
            raw["shard"],
            raw["caption"],
            raw["url"],
            raw["json"],
            raw["width"],
            raw["height"],
            list(raw["failures"]),
        )
        samples = {id(sample): sample for sample, _format in raw["fallbacks"]}
        done, failed = _pillow_fallbacks(
            [(id(sample), sample.image) for sample, _format in raw["fallbacks"]],
            self._size,
            self._max_pixels,
            self._dtype,
            self._mean,
            self._std,
            self._layout,
        )
        for tag, reason in failed:
            batch.failures.append((samples[tag].shard, samples[tag].key, reason))
        if done:
            batch.pixels = np.concatenate([batch.pixels, np.stack([p for _, p in done])])
            for tag, _plane in done:
                s = samples[tag]
                batch.keys.append(s.key)
                batch.shards.append(s.shard)
                batch.captions.append(s.caption)
                batch.urls.append(s.url)
                batch.jsons.append(s.json)
                batch.widths.append(s.width)
                batch.heights.append(s.height)
                batch.fallbacks.append(s.key)
        for failure in batch.failures:
            _logger.warning("shard %s, key %s: %s", *failure)
        self.failures.extend(batch.failures)
        return batch


_logger = logging.getLogger("starkret")


def preprocess_shards(
    paths,
    *,
    batch_size: int = 256,
    size: int = 336,
    mode: str = "exact",
    dtype: str = "float32",
    threads: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = 64 << 20,
    per_shard: bool = False,
    prefetch: int = 2,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
    layout: str = "chw",
) -> ShardBatchIterator:
    """Read webdataset shards and yield preprocessed batches, all in Rust threads.

    The reading, decoding and preprocessing of the next ``prefetch`` batches overlap
    with whatever the caller does with the current one (a GPU forward pass), and no
    image bytes pass through Python. ``paths`` takes what :func:`starkret.read_shards`
    takes (paths, globs, brace ranges). ``per_shard=True`` never mixes two shards in
    one batch. Preprocessing options are those of :func:`preprocess`.

    >>> for batch in preprocess_shards("cc12m/{00000..01242}.tar"):  # doctest: +SKIP
    ...     embeddings = embedder.encode_images(batch.pixels)
    """
    from starkret.ingest.shards import expand_shard_paths

    _check_options(size, mode, dtype, threads, max_pixels, layout)
    for name, value in (("batch_size", batch_size), ("prefetch", prefetch)):
        if not isinstance(value, int) or value <= 0:
            raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(max_member_bytes, int) or max_member_bytes <= 0:
        raise InvalidInputError(
            f"max_member_bytes must be a positive int, got {max_member_bytes!r}"
        )
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    files = expand_shard_paths(paths)
    core = _core.ShardBatches(
        files,
        size=size,
        mode=mode,
        output=dtype,
        max_pixels=max_pixels,
        max_member_bytes=max_member_bytes,
        batch_size=batch_size,
        per_shard=per_shard,
        prefetch=prefetch,
        threads=threads,
        **_tables(dtype, mean, std),
    )
    return ShardBatchIterator(
        core, size=size, max_pixels=max_pixels, dtype=dtype, mean=mean, std=std, layout=layout
    )


def thumbnail_uris(images: dict[str, bytes], size: int = 128) -> dict[str, str]:
    """``data:`` URIs of ``size``-px center-cropped JPEG thumbnails, decoded in one Rust
    batch (what HTML reports embed); images that fail to decode are left out."""
    import base64

    import PIL.Image

    keys = list(images)
    batch = preprocess([images[k] for k in keys], size=size, dtype="uint8")
    out = {}
    for pixels, i in zip(batch.pixels, batch.index.tolist(), strict=True):
        buf = io.BytesIO()
        PIL.Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(
            buf, "JPEG", quality=80
        )
        out[keys[i]] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return out
