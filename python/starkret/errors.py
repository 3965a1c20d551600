"""The exceptions starkret raises for problems the caller can fix.

Every error that bad input or a bad environment causes (a malformed file, a wrong
argument, a missing folder, another run on the same output, an optional package not
installed) derives from :class:`StarkretError`, so one ``except starkret.StarkretError``
catches them all and the CLI turns them into one line on stderr and exit status 2. Any
other exception escaping starkret is a bug and keeps its traceback.

Each class also keeps the built-in base the code raised before it existed
(``ValueError``, ``FileNotFoundError``, ...), so callers that catch those still work.
The Rust core raises these classes too (``rust/errors.rs``), with its message intact.

>>> import numpy as np, starkret
>>> db = np.ones((3, 2), dtype=np.float16)
>>> try:
...     starkret.topk(np.ones((1, 2), dtype=np.float32), db, k=0)
... except starkret.StarkretError as exc:
...     print(type(exc).__name__, "-", exc)
InvalidInputError - k must be at least 1, got 0

This module is a leaf: it imports nothing from starkret, so every stage may use it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "FolderLockError",
    "FormatError",
    "IncompatibleSourcesError",
    "IndexBuildError",
    "InvalidInputError",
    "InvalidTypeError",
    "MissingDependencyError",
    "MissingIndexError",
    "ModelLoadError",
    "NotFoundError",
    "OutputBusyError",
    "OutputExistsError",
    "RequestError",
    "StarkretError",
    "WorkersFailed",
]


class StarkretError(Exception):
    """Base of every error starkret raises for a problem the caller can fix.

    Raised only through its subclasses; the message names the offending path, key,
    line or argument. ``starkret <command>`` prints it as one line and exits 2.
    """


# ==== Bad input ====


class InvalidInputError(StarkretError, ValueError):
    """Bad input: an argument out of range or not among the allowed values, data of
    the wrong shape, a malformed record, an unknown source or model name.

    Raised by the public API (``topk``, ``preprocess``, ``ImageDB.search``,
    ``Aligner``, ``embed``, ...) and by the Rust core when it rejects its arguments.
    """


class InvalidTypeError(InvalidInputError, TypeError):
    """An argument of the wrong type: a single string where a list of strings is
    expected, a non-bytes image, a non-integer ``k``. Also a ``TypeError``."""


class FormatError(InvalidInputError):
    """A malformed dialogue, moments or pairs file (bad UTF-8 or JSON, a missing or
    mistyped field); the message names the file, line and episode."""


class IncompatibleSourcesError(InvalidInputError):
    """Embeddings that must not be mixed: DB folders (or an output folder and a new
    run into it) embedded with another model, dimension or preprocessing, or two
    folders claiming one source name."""


class RequestError(InvalidInputError):
    """A bad request to ``starkret serve``: answered with HTTP ``status`` and the
    message as a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


# ==== Missing things ====


class NotFoundError(StarkretError, FileNotFoundError):
    """A path the caller named does not exist or holds nothing starkret can use: a
    missing DB or dialogue file, shards matching no file, a DB folder with no
    embedded sources, an image folder without images, a missing checkpoint."""


class MissingIndexError(NotFoundError, ValueError):
    """A folder whose embeddings or index the asked-for step needs is missing or
    incomplete: run ``embed`` (to completion) or ``build-index`` first."""


class MissingDependencyError(StarkretError, ImportError):
    """An optional dependency a feature needs is not installed; the message says
    which extra to install (``pip install 'starkret[serve]'``)."""


class ModelLoadError(StarkretError, RuntimeError):
    """A model's weights could not be loaded (a pretrained tag that needs a download
    without network access, a damaged checkpoint)."""


# ==== Outputs ====


class OutputBusyError(StarkretError, ValueError):
    """Another run is working on the same output folder with other arguments or
    inputs, or ``overwrite`` would delete its work: wait for it or use another folder."""


class OutputExistsError(StarkretError, FileExistsError):
    """An output path holds a file starkret did not write (or not a regular file):
    starkret refuses to overwrite it."""


class FolderLockError(StarkretError, OSError):
    """The output folder's filesystem cannot ``flock``, so runs and workers cannot
    share it safely (some NFS, FUSE or SMB mounts): write to a local disk."""


# ==== Runs that could not finish ====


class IndexBuildError(StarkretError, RuntimeError):
    """``build_index`` produced no index (autofaiss within its memory budget): lower
    ``max_index_memory_usage`` or use ``kind='exact'``."""


class WorkersFailed(StarkretError, RuntimeError):
    """Device workers of a local multi-device embed died with parts left undone;
    ``report`` (a ``DevicesReport``) says what was done. Running the same command
    again finishes the rest."""

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report
