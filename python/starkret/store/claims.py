"""Several embed workers on one output folder: per-part claims and a folder lock.

Everything is an ``flock`` on a small file under ``OUT/.starkret/``, so a worker that
dies (even by ``kill -9``) releases what it held and nothing needs cleaning up by hand:

- ``lock``: held exclusively for a moment, to check and write the manifest and to
  commit a finished part (the duplicate-key check and the three renames);
- ``running``: held shared by every live run, so a starting run can tell whether
  others are working on the folder (an exclusive attempt fails);
- ``claims/N``: held exclusively by the worker embedding part N. Temporary files of
  part N are only touched by the holder of its claim. The claim file is removed on
  release; a worker that locked a file just removed re-opens the path and tries
  again, so two workers never both hold part N.

Works between processes on one machine (and on filesystems whose ``flock`` is shared
between machines).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from starkret.errors import FolderLockError

__all__ = ["STATE_DIR", "Claim", "FolderLockError", "WorkFolder", "lock_file"]

#: Sub-folder of an output folder holding the lock and claim files.
STATE_DIR = ".starkret"
#: What ``flock`` says on a filesystem that cannot lock (some NFS mounts, FUSE, SMB).
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _flock(fd: int, mode: int, path: Path) -> None:
    try:
        fcntl.flock(fd, mode)
    except BlockingIOError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LOCKS:
            raise
        raise FolderLockError(
            exc.errno,
            f"cannot lock {path} ({os.strerror(exc.errno)}): the output folder's filesystem "
            "does not support flock, which resume and several workers rely on; write the "
            "output to a local disk (or a filesystem with working locks)",
        ) from exc


def _lock(path: Path, *, wait: bool, shared: bool = False) -> int | None:
    """An fd holding ``flock`` on ``path`` (created if missing), or None if it is busy."""
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _flock(fd, mode if wait else mode | fcntl.LOCK_NB, path)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (
            held.st_dev,
            held.st_ino,
        ):
            return fd
        os.close(fd)  # its holder removed it while we waited: lock the new file


class Claim:
    """Part ``index`` (None: the whole lock file) reserved for this worker until
    :meth:`release`."""

    def __init__(self, index: int | None, path: Path, fd: int) -> None:
        self.index, self._path, self._fd = index, path, fd

    def release(self) -> None:
        """Give the part up (done or not): remove the claim file, then unlock it."""
        if self._fd < 0:
            return
        try:
            self._path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_file(path: str | os.PathLike, *, wait: bool = False) -> Claim | None:
    """Hold the lock file ``path`` exclusively (created if missing, removed on release);
    None if another process holds it (``wait``: block until it is free instead).

    One run per output: a second run on the same output gets None and refuses, and a
    killed holder's lock goes with its process.
    """
    path = Path(path)
    fd = _lock(path, wait=wait)
    return None if fd is None else Claim(None, path, fd)


class WorkFolder:
    """The coordination files of one output folder (see the module doc)."""

    def __init__(self, out: Path) -> None:
        self.state = Path(out) / STATE_DIR
        (self.state / "claims").mkdir(parents=True, exist_ok=True)
        self._running: int | None = None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder lock (blocking) for a short critical section."""
        fd = _lock(self.state / "lock", wait=True)
        assert fd is not None
        try:
            yield
        finally:
            os.close(fd)

    def join(self) -> bool:
        """Register this run as live; returns whether other live runs use the folder.

        Call while holding :meth:`locked`, so two starting runs see each other.
        """
        if self._running is not None:
            raise RuntimeError("already joined")
        path = self.state / "running"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path)
                others = False
            except BlockingIOError:
                others = True
            _flock(fd, fcntl.LOCK_SH, path)  # blocks nobody but an exclusive probe
        except BaseException:
            os.close(fd)
            raise
        self._running = fd
        return others

    def leave(self) -> None:
        if self._running is not None:
            os.close(self._running)
            self._running = None

    def claim(self, index: int, *, wait: bool = False) -> Claim | None:
        """Reserve part ``index``; None if another worker holds it (``wait``: block instead)."""
        path = self.state / "claims" / f"part_{index:05d}"
        fd = _lock(path, wait=wait)
        return None if fd is None else Claim(index, path, fd)
