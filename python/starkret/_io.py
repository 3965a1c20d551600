"""Publishing a file atomically: a reader sees the old file or the whole new one, never a part.

Every file starkret publishes (embedding parts, metadata, manifests, indices, infos,
reports, exports) goes through :func:`atomic_write` or :func:`atomic_path`: the bytes
go to a temporary name in the target's folder (``.NAME.tmp-PID-TOKEN``, unique per
process, thread and call), are flushed and fsynced, the temporary is renamed over the
target, and the folder is fsynced so the rename itself survives a crash. On any error
the temporary is removed and the target is left as it was.

A killed process can leave a temporary behind; :func:`temp_target` tells such a name
from a real file (resume code removes the ones it owns, see
:mod:`starkret.ingest.pipeline`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "atomic_path",
    "atomic_symlink",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_inside",
    "temp_path",
    "temp_target",
]

#: ``.NAME.tmp-PID`` (older releases) or ``.NAME.tmp-PID-TOKEN`` -> NAME.
_TEMP = re.compile(r"^\.(?P<target>.+)\.tmp-\d+(?:-[0-9a-f]+)?$")


def is_inside(path: str | os.PathLike, folder: str | os.PathLike, *, resolve: bool = True) -> bool:
    """Whether ``path`` is ``folder`` or lies below it: with symlinks resolved (default),
    or by name alone (``resolve=False``: absolute and normalised, links not followed).

    >>> is_inside("/data/charts/a/../b.png", "/data/charts", resolve=False)
    True
    """
    norm = os.path.realpath if resolve else os.path.abspath
    top = norm(folder)
    return os.path.commonpath([norm(path), top]) == top


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name for ``path``, in its folder: ``.NAME.tmp-PID-TOKEN``.

    The random token makes the name unique per thread and call, and across processes
    that share a PID (containers all start at PID 1) on one folder.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def temp_target(name: str) -> str | None:
    """The file name a temporary name stands for, or None if ``name`` is not one.

    >>> temp_target(".img_emb_00012.npy.tmp-4242-0badcafe")
    'img_emb_00012.npy'
    >>> temp_target("img_emb_00012.npy") is None
    True
    """
    match = _TEMP.match(name)
    return None if match is None else match.group("target")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to, by name; publish it on
    a clean exit.

    For writers that take a file name (``faiss.write_index``, ``pa.OSFile``, tools run
    by path). The file at the yielded path must exist when the block ends; it is then
    fsynced and renamed over ``path``. An exception in the block removes it and leaves
    ``path`` untouched.

    >>> with atomic_path("db/cc12m/index/ivf.index") as tmp:  # doctest: +SKIP
    ...     faiss.write_index(index, str(tmp))
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Publish ``path`` with the bytes ``write(f)`` writes to a binary file ``f``; returns
    ``path``.

    ``path`` is replaced only once ``write`` returned and its bytes are on disk; if
    ``write`` raises, ``path`` keeps its old content (or stays absent) and no temporary
    is left.

    >>> atomic_write("part.npy", lambda f: np.save(f, array))  # doctest: +SKIP
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Publish ``path`` with ``data`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Publish ``path`` with ``text`` (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_symlink(target: str | os.PathLike, link: str | os.PathLike) -> Path:
    """Point the symbolic link ``link`` at ``target``, replacing what ``link`` was in one
    rename; returns ``link``."""
    link = Path(link)
    tmp = temp_path(link)
    try:
        tmp.symlink_to(target)
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(link.parent)
    return link


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be fsynced)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some network and FUSE file systems refuse it
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
