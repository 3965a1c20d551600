"""webdataset shards (tar files written by img2dataset) read as samples, in Rust."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import starkret._core as _core
from starkret._core import Sample
from starkret.errors import InvalidInputError, InvalidTypeError
from starkret.store.images import DEFAULT_MAX_IMAGE_BYTES

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "Sample",
    "ShardIterator",
    "expand_shard_paths",
    "read_shards",
]

#: Largest image, caption or JSON member kept in memory unless told otherwise (64 MiB).
DEFAULT_MAX_MEMBER_BYTES = DEFAULT_MAX_IMAGE_BYTES
#: Samples the background reader may be ahead of the consumer.
DEFAULT_PREFETCH = 64

#: What ``read_shards`` accepts: one path or pattern, or a sequence of them.
PathPatterns = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

logger = logging.getLogger("starkret")

#: One entry of ``ShardIterator.failures``: shard file name, sample key (or None), reason.
Failure = tuple[str, str | None, str]


def expand_shard_paths(paths: PathPatterns) -> list[str]:
    """Expand shard paths, globs and brace ranges into existing files, in order.

    Brace groups are expanded first (``{00000..01242}`` keeps the zero padding,
    ``{a,b}`` lists alternatives), then globs (``*``, ``?``, ``[..]``) match in
    sorted order. Repeats are dropped, the first occurrence kept.

    >>> expand_shard_paths("cc12m/{00000..00002}.tar")  # doctest: +SKIP
    ['cc12m/00000.tar', 'cc12m/00001.tar', 'cc12m/00002.tar']

    Raises:
        NotFoundError: a path does not exist or a glob matches nothing (a
            ``FileNotFoundError``).
        InvalidInputError: a pattern is malformed (e.g. an unbalanced ``{``), or none is
            given (a ``ValueError``).
    """
    patterns = _as_patterns(paths)
    return [os.fspath(p) for p in _core.expand_shard_paths(patterns)]


class ShardIterator(Iterator[Sample]):
    """The samples of a list of shards, read ahead by a Rust thread.

    Iterating yields :class:`Sample` objects in file order. What cannot become
    a sample (a truncated or missing shard, a sample without an image, an
    oversized member) is not yielded: it is appended to :attr:`failures` as
    ``(shard, key_or_None, reason)`` and logged on the ``starkret`` logger at
    WARNING, and reading goes on.

    A failure of the reader thread itself (a bug, never bad input) raises
    ``RuntimeError`` naming the shard: the iteration is then incomplete and must
    not be mistaken for the end of the data.
    """

    def __init__(self, shards: list[str], *, max_member_bytes: int, prefetch: int) -> None:
        #: The shard files, in reading order.
        self.shards: list[str] = shards
        #: ``(shard, key_or_None, reason)`` for everything that did not become a sample.
        self.failures: list[Failure] = []
        self._core = _core.ShardReader(shards, max_member_bytes=max_member_bytes, prefetch=prefetch)

    def __iter__(self) -> ShardIterator:
        return self

    def __next__(self) -> Sample:
        while True:
            item = next(self._core)
            if isinstance(item, Sample):
                return item
            self.failures.append(item)
            shard, key, reason = item
            logger.warning("%s%s: %s", shard, f" [{key}]" if key is not None else "", reason)


def read_shards(
    paths: PathPatterns,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    prefetch: int = DEFAULT_PREFETCH,
) -> ShardIterator:
    """Read webdataset shards as samples: image bytes, caption, URL and metadata.

    ``paths`` is one path or a list of them; each may be a glob or contain brace
    ranges, as img2dataset users write them (``"cc12m/{00000..01242}.tar"``).
    Members are grouped the way webdataset does: the key is the member path up to
    the first dot of its basename, and adjacent members with the same key form one
    sample. The first member with an image extension (``jpg``, ``png``, ``webp``,
    ...) is the image; its bytes are returned as stored, never decoded, so the
    format is whatever the bytes say (img2dataset names everything ``.jpg``). The
    ``.txt`` member is the caption and ``.json`` the metadata, from which ``url``,
    ``width`` and ``height`` are taken.

    Reading happens on a Rust thread with the GIL released, ``prefetch`` samples
    ahead. Shards may be gzip-compressed (``.tar.gz``, ``.tgz``; the magic bytes
    decide, not the name); nothing is extracted to disk. Broken input never stops
    the iteration; it is recorded in ``.failures``: a truncated or corrupt shard
    still gives up every sample whose members were read whole; links, devices and
    members without a key or extension are recorded (``unsupported member: ...``),
    and a key that comes back later in the same shard is recorded as
    ``duplicate key: K (already in this shard)`` instead of being yielded twice.

    >>> import io, tarfile
    >>> with tarfile.open("demo-000.tar", "w") as tar:
    ...     for name, data in [("0001.jpg", b"<jpeg bytes>"), ("0001.txt", b"a red bus")]:
    ...         info = tarfile.TarInfo(name)
    ...         info.size = len(data)
    ...         tar.addfile(info, io.BytesIO(data))
    >>> samples = read_shards("demo-{000..000}.tar")
    >>> [(s.key, s.image_ext, s.image, s.caption) for s in samples]
    [('0001', 'jpg', b'<jpeg bytes>', 'a red bus')]
    >>> samples.failures
    []

    Args:
        paths: shard paths, globs or brace patterns (str or PathLike), or a sequence of them.
        max_member_bytes: image, caption and JSON members larger than this are skipped
            without being read into memory and recorded as failures.
        prefetch: how many samples the background reader may run ahead.

    Raises:
        NotFoundError: a shard path does not exist or a glob matches nothing (a
            ``FileNotFoundError``).
        InvalidInputError: a malformed pattern, no paths, or a non-positive size (a
            ``ValueError``).
        RuntimeError: while iterating, if the Rust reader thread fails (a bug).
    """
    if max_member_bytes < 1:
        raise InvalidInputError(f"max_member_bytes must be at least 1, got {max_member_bytes}")
    if prefetch < 1:
        raise InvalidInputError(f"prefetch must be at least 1, got {prefetch}")
    shards = expand_shard_paths(paths)
    return ShardIterator(shards, max_member_bytes=max_member_bytes, prefetch=prefetch)


def _as_patterns(paths: PathPatterns) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(paths, bytes):
        raise InvalidTypeError("shard paths must be str or os.PathLike, not bytes")
    patterns = [os.fspath(p) for p in paths]
    if not patterns:
        raise InvalidInputError("no shard paths given")
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise InvalidTypeError(f"shard paths must be str or os.PathLike[str], got {pattern!r}")
    return patterns
