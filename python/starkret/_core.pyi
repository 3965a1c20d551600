"""Type stubs for the Rust extension `starkret._core` (kept in sync with rust/lib.rs)."""

from pathlib import Path
from typing import final

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

__all__ = [
    "Q8_FORMAT_VERSION",
    "Sample",
    "ShardBatches",
    "ShardReader",
    "__version__",
    "available_threads",
    "connected_components",
    "count_above_parts",
    "expand_shard_paths",
    "image_dimensions",
    "key_hashes",
    "merge_topk",
    "neardup_nearest_centroids",
    "neardup_pairs",
    "preprocess_images",
    "q8_default_first_pass",
    "q8_quantize",
    "q8_search_parts",
    "select_images",
    "simd_level",
    "string_hashes",
    "topk_search_parts",
]

__version__: str
#: Version of the int8 block format written by ``q8_quantize``.
Q8_FORMAT_VERSION: int

def simd_level() -> str:
    """The widest SIMD level detected on this CPU at run time, e.g. ``"avx2+fma"``."""

def available_threads() -> int:
    """Number of logical CPUs the Rust thread pools use by default."""

# (ok input positions, [(position, reason)] failures, [(position, format)] fallbacks)
_Statuses = tuple[list[int], list[tuple[int, str]], list[tuple[int, str]]]

def preprocess_images(
    images: list[bytes],
    size: int,
    mode: str,
    output: str,
    max_pixels: int,
    lut_f32: npt.NDArray[np.float32] | None = None,
    lut_f16: npt.NDArray[np.uint16] | None = None,
    threads: int | None = None,
    out: npt.NDArray[np.generic] | None = None,
) -> tuple[npt.NDArray[np.generic], _Statuses]:
    """Decode, resize, crop (and normalise) images, GIL released.

    ``output`` "float32"/"float16" gives (n_ok, 3, size, size) normalised through the
    table (float16 as uint16 bits); "uint8" gives the RGB crops (n_ok, size, size, 3).
    With ``out`` (writeable, C-contiguous, that element type and item shape, at least
    one row per image) the pixels are written there and ``out[:n_ok]`` is returned.
    """

def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG or PNG from its header; None for other formats."""

def expand_shard_paths(patterns: list[str]) -> list[Path]:
    """Expand shard paths, globs and brace ranges into existing files, in order, without repeats.

    Raises ``FileNotFoundError`` for a missing path or an empty glob, ``ValueError`` for a
    malformed pattern, ``OSError`` for a directory a glob could not list.
    """

# PyO3 classes cannot be subclassed.
@final
class Sample:
    """One webdataset sample: an image and what img2dataset stores beside it."""

    @property
    def shard(self) -> str:
        """File name of the shard the sample came from."""
    @property
    def key(self) -> str:
        """webdataset key: member path up to the first dot of the basename."""
    @property
    def image_ext(self) -> str:
        """Extension of the image member, lowercased (``jpg``, ``png``, ``c.d.jpg``)."""
    @property
    def image(self) -> bytes:
        """The image member's bytes as stored (the format is in the bytes, not the extension)."""
    @property
    def caption(self) -> str | None:
        """The ``.txt`` member, decoded as UTF-8 with invalid bytes replaced."""
    @property
    def json(self) -> str | None:
        """The ``.json`` member as raw text, whether or not it parses."""
    @property
    def url(self) -> str | None:
        """``"url"`` of the JSON object, when present and a string."""
    @property
    def width(self) -> int | None:
        """``"width"`` of the JSON object, when present and a non-negative integer."""
    @property
    def height(self) -> int | None:
        """``"height"`` of the JSON object, when present and a non-negative integer."""

@final
class ShardReader:
    """Shard samples read ahead on a Rust thread (``starkret.ingest.shards.ShardIterator``)."""

    def __new__(cls, paths: list[str], *, max_member_bytes: int, prefetch: int) -> Self: ...
    def __iter__(self) -> ShardReader: ...
    def __next__(self) -> Sample | tuple[str, str | None, str]:
        """The next sample, or ``(shard, key_or_None, reason)`` for what could not be one.

        Raises ``RuntimeError`` (naming the shard) if the reader thread panicked; the
        data after that point is unknown, so it must not be taken as complete.
        """

@final
class ShardBatches:
    """Preprocessed batches straight from shards, prepared ahead on background threads.

    Each item is a dict with ``pixels`` (numpy) and the columns ``key``, ``shard``,
    ``caption``, ``url``, ``json``, ``width``, ``height``, plus ``failures``
    (``(shard, key_or_None, reason)``) and ``fallbacks`` (``(Sample, format)`` to be
    decoded by Pillow). ``pixels`` views a buffer the stream reuses once no array
    refers to it any more (no copy, no fresh memory per batch).
    """

    def __new__(
        cls,
        paths: list[str],
        *,
        size: int,
        mode: str,
        output: str,
        lut_f32: npt.NDArray[np.float32] | None = None,
        lut_f16: npt.NDArray[np.uint16] | None = None,
        max_pixels: int,
        max_member_bytes: int,
        batch_size: int,
        per_shard: bool,
        prefetch: int,
        threads: int | None = None,
    ) -> Self: ...
    def __iter__(self) -> ShardBatches: ...
    def __next__(self) -> dict[str, object]:
        """The next batch; ``RuntimeError`` (naming the shard) if a background thread panicked."""

# ==== Top-k ====

def q8_quantize(
    rows: npt.NDArray[np.float32] | npt.NDArray[np.uint16],
    *,
    threads: int | None = None,
) -> npt.NDArray[np.uint8]:
    """One part's rows (float32, or float16 as uint16 bits) in the int8 block format of
    ``rust/q8.rs``: (blocks of 16 rows, bytes per block) uint8 (GIL released)."""

def q8_search_parts(
    queries: npt.NDArray[np.float32],
    parts: list[npt.NDArray[np.float32] | npt.NDArray[np.uint16]],
    codes: list[npt.NDArray[np.uint8]],
    k: int,
    *,
    exclude: npt.NDArray[np.int64] | None = None,
    exclude_per_query: list[npt.NDArray[np.int64]] | None = None,
    threads: int | None = None,
    first_pass: str = "auto",
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.uint64], str]:
    """``topk_search_parts`` through the int8 first pass (``codes[i]``: part i's
    ``q8_quantize`` copy): the same scores and ids, bit for bit; also the rows re-ranked
    per query and the first pass that ran (``vnni``, ``avx2``, ``scalar``, ``float32``)."""

def q8_default_first_pass() -> str:
    """The first pass this CPU runs by default: ``vnni``, ``avx2`` or ``float32``."""

def topk_search_parts(
    queries: npt.NDArray[np.float32],
    parts: list[npt.NDArray[np.float32] | npt.NDArray[np.uint16]],
    k: int,
    *,
    exclude: npt.NDArray[np.int64] | None = None,
    exclude_per_query: list[npt.NDArray[np.int64]] | None = None,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact inner-product top-k over several parts searched as one database, (q, k)
    scores descending and ids (-inf / -1 padding). Each part is float32, or float16
    passed as its uint16 bits, C-contiguous with the queries' d; ids (and exclusions)
    run on across the parts in order; ties rank the lower id first; one pass, memory
    O(q x k) for any number of parts (GIL released). ``exclude`` (ids left out for every
    query; borrowed without a copy when sorted without repeats) and ``exclude_per_query``
    (one array per query) may be given together: an id is left out when either has it."""

def count_above_parts(
    queries: npt.NDArray[np.float32],
    parts: list[npt.NDArray[np.float32] | npt.NDArray[np.uint16]],
    thresholds: npt.NDArray[np.float32],
    *,
    exclude: npt.NDArray[np.int64] | None = None,
    exclude_per_query: list[npt.NDArray[np.int64]] | None = None,
    threads: int | None = None,
) -> npt.NDArray[np.uint64]:
    """Per query, the rows of the parts scoring strictly above its threshold (same kernel)."""

def neardup_nearest_centroids(
    parts: list[npt.NDArray[np.float32] | npt.NDArray[np.uint16]],
    centroids: npt.NDArray[np.float32],
    r: int,
    margin: float,
    *,
    threads: int | None = None,
) -> npt.NDArray[np.int32]:
    """Per row: its nearest centroid and the others within ``margin`` (at most ``r``, -1 pad)."""

def neardup_pairs(
    parts: list[npt.NDArray[np.float32] | npt.NDArray[np.uint16]],
    assigned: npt.NDArray[np.int32],
    is_new: npt.NDArray[np.uint8],
    threshold: float,
    *,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32], int]:
    """Pairs (a < b) sharing a cluster, one of them new, scoring >= threshold; + dots done."""

def connected_components(
    a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], n: int
) -> npt.NDArray[np.int64]:
    """Label of each node 0..n: the smallest node of its component."""

def merge_topk(
    scores: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    k: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top k of (q, m) lists laid side by side (ids global, -1 = padding), same rank order."""

def select_images(
    episodes: npt.NDArray[np.uint64],
    ks: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    ids: npt.NDArray[np.uint64],
    scores: npt.NDArray[np.float32],
    vectors: npt.NDArray[np.float32],
    *,
    reuse: str,
    threshold: float,
    min_score: float,
    used: npt.NDArray[np.uint64] | None = None,
    shown_episodes: npt.NDArray[np.uint64] | None = None,
    shown_ids: npt.NDArray[np.uint64] | None = None,
    shown_vectors: npt.NDArray[np.float32] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """The aligner's greedy choice over flattened candidate lists (see rust/dedup.rs).

    Moment ``m`` owns candidates ``offsets[m]:offsets[m + 1]`` (best first). Returns the
    picked candidate indices (flat), the number picked per moment, and the outcome per
    moment (0 chosen, 1 below threshold, 2 exhausted). ``used``: images already used
    before these moments (for ``reuse="global"``). ``shown_*`` (all three or none):
    image ``i`` (id ``shown_ids[i]``, unit vector ``shown_vectors[i]``) was already shown
    in episode ``shown_episodes[i]``: it counts as used and chosen there.
    """

# ==== Key index ====

def key_hashes(keys: list[str], *, prefix: str = "") -> npt.NDArray[np.uint64]:
    """Stable 64-bit hashes of ``prefix + key`` (FNV-1a + SplitMix64 finaliser; on-disk format)."""

def string_hashes(
    offsets: npt.NDArray[np.int32] | npt.NDArray[np.int64],
    data: npt.NDArray[np.uint8],
    *,
    prefix: str = "",
) -> npt.NDArray[np.uint64]:
    """``key_hashes`` of an Arrow string array given as its offsets and data buffers."""
