"""Every path a command writes is new, or one its own state file says it wrote.

A command that writes files the user names (``starkret align -o OUT --report R --parquet P
--export-images DIR``) declares them all to one :class:`OutputGuard` before it writes any,
then :meth:`OutputGuard.acquire` does, in this order:

1. refuses (:class:`~starkret.errors.OutputExistsError`) a path that is an input, lies
   under an input folder, or is another output of the same run: compared by resolved
   path and by ``st_dev``/``st_ino``, so symbolic and hard links are caught;
2. locks ``STATE.lock`` (an ``flock``, see :mod:`starkret.store.claims`) until
   :meth:`~OutputGuard.release`: a second run on the same output refuses at once
   (:class:`~starkret.errors.OutputBusyError`) or, with ``wait=True``, waits. A killed
   run's lock goes with its process;
3. refuses a path that exists and is not recorded in the state file ``STATE`` (a small
   JSON file beside the main output), except a missing one, an empty folder, or an empty
   file where the command allows it (``may_be_empty``: nothing to lose);
4. records every declared path in ``STATE`` (written with :func:`~starkret._io.atomic_write`)
   before any of them is written, so a rerun may replace what an earlier run wrote and
   nothing else. Files written inside a declared folder are recorded one by one with
   :meth:`~OutputGuard.record`, before each is published.

Used as a context manager, a run that fails before it wrote any result (before
:meth:`~OutputGuard.keep`) leaves nothing behind: the files and folders it created and a
state file it created are removed. A declared path the run never wrote is dropped from
``STATE`` on release, so a file somebody puts there later is theirs.

>>> guard = OutputGuard("out.jsonl.starkret", written_by="starkret align",
...                     inputs=["dialogues.jsonl"], input_folders=["db"])  # doctest: +SKIP
>>> guard.file("out.jsonl", "-o", may_be_empty=True)  # doctest: +SKIP
>>> with guard.acquire():  # doctest: +SKIP
...     guard.keep()  # results from here on are kept when the run fails
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from starkret._io import atomic_write_text, is_inside
from starkret.errors import NotFoundError, OutputBusyError, OutputExistsError
from starkret.store.claims import Claim, lock_file

__all__ = ["LOCK_SUFFIX", "STATE_FORMAT", "OutputGuard"]

#: ``STATE + LOCK_SUFFIX`` is the lock file a run holds (and removes when it ends).
LOCK_SUFFIX = ".lock"
#: Version of the state file's layout (1: align's ``output`` and ``images`` names only).
STATE_FORMAT = 2
_MAX_STATE_BYTES = 1 << 20


@dataclass
class _Output:
    path: Path
    what: str  # how the user named it (an option), for messages
    folder: bool = False
    may_be_empty: bool = False
    existed: bool = False


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _same(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (resolved path, or one inode: links)."""
    if _real(a) == _real(b):
        return True
    ia = _identity(a)
    return ia is not None and ia == _identity(b)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` resolves to ``folder`` or anything under it."""
    return is_inside(path, folder)


class OutputGuard:
    """The paths one run writes, checked, locked and recorded in ``state_path`` (see the
    module doc). ``written_by`` names the command (``"starkret align"``) and marks its
    state files; ``info`` adds fields to the state file; ``busy_hint`` ends the message a
    second run gets."""

    def __init__(
        self,
        state_path: str | os.PathLike,
        *,
        written_by: str,
        inputs: Iterable[str | os.PathLike] = (),
        input_folders: Iterable[str | os.PathLike] = (),
        info: dict | None = None,
        busy_hint: str = "",
    ) -> None:
        self.state_path = Path(state_path)
        self.lock_path = self.state_path.with_name(self.state_path.name + LOCK_SUFFIX)
        self.written_by = written_by
        self.inputs = [Path(p) for p in inputs]
        self.input_folders = [Path(p) for p in input_folders]
        self.info = dict(info or {})
        self.busy_hint = busy_hint
        self.outputs: list[_Output] = []
        self.new = False  # whether this run created the state file
        self.kept = False  # whether this run wrote results a failure must not remove
        self._recorded: set[str] = set()
        self._added: set[str] = set()  # recorded by this run, dropped again if never written
        self._state: dict = {}
        self._claim: Claim | None = None

    # ==== Declaring ====

    def file(self, path: str | os.PathLike, what: str, *, may_be_empty: bool = False) -> Path:
        """Declare an output file (``what``: the option that names it)."""
        self.outputs.append(_Output(Path(path), what, may_be_empty=may_be_empty))
        return Path(path)

    def folder(self, path: str | os.PathLike, what: str) -> Path:
        """Declare an output folder: created if missing; its files go through :meth:`record`."""
        self.outputs.append(_Output(Path(path), what, folder=True))
        return Path(path)

    # ==== Checking and locking ====

    @property
    def held(self) -> bool:
        return self._claim is not None

    def acquire(self, *, wait: bool = False) -> OutputGuard:
        """Check every declared path, take the lock and record them (see the module doc)."""
        if self._claim is not None:
            raise RuntimeError("output guard already acquired")
        self._check_identities()
        self._check_lock_file()
        claim = lock_file(self.lock_path, wait=wait)
        if claim is None:
            main = self.outputs[0].path if self.outputs else self.state_path
            raise OutputBusyError(
                f"another {self.written_by} run is writing {main} (it holds {self.lock_path}): "
                f"wait for it to finish or write to another output{self.busy_hint}"
            )
        self._claim = claim
        try:
            self._read_state()
            for out in self.outputs:
                self._check_existing(out)
            self._write_state(
                {self._key(o.path) for o in self.outputs} - self._recorded, force=self.new
            )
        except BaseException:
            self._claim = None
            claim.release()
            raise
        return self

    def _check_identities(self) -> None:
        mine = [
            *((o.path, o.what) for o in self.outputs),
            (self.state_path, "the state file"),
            (self.lock_path, "the lock file"),
        ]
        folders = {o.path for o in self.outputs if o.folder}
        for n, (path, what) in enumerate(mine):
            for other in self.inputs:
                if _same(path, other):
                    raise OutputExistsError(
                        f"{path} ({what}) is the same file as {other}, an input: "
                        "refusing to write over it"
                    )
            for folder in self.input_folders:
                if _inside(path, folder):
                    raise OutputExistsError(
                        f"{path} ({what}) is inside {folder}, an input folder: "
                        "refusing to write there"
                    )
            for other, other_what in mine[:n]:
                if _same(path, other):
                    raise OutputExistsError(
                        f"{path} ({what}) is the same file as {other} ({other_what}): "
                        "every output needs its own path"
                    )
                for folder, inner, inner_what in ((path, other, other_what), (other, path, what)):
                    if folder in folders and _inside(inner, folder):
                        raise OutputExistsError(
                            f"{inner} ({inner_what}) is inside {folder}, which holds only "
                            "the exported files: choose another path"
                        )

    def _check_lock_file(self) -> None:
        try:
            info = os.lstat(self.lock_path)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(info.st_mode) or info.st_size > 0:
            raise OutputExistsError(
                f"{self.lock_path} exists and is not a {self.written_by} lock file "
                "(those are empty): refusing to use or remove it"
            )

    def _read_state(self) -> None:
        path = self.state_path
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            self.new = True
            return
        state = None
        if stat.S_ISREG(info.st_mode):
            try:
                with open(path, "rb") as f:
                    state = json.loads(f.read(_MAX_STATE_BYTES))
            except (OSError, ValueError, RecursionError):
                state = None
        if not (isinstance(state, dict) and state.get("written_by") == self.written_by):
            if stat.S_ISREG(info.st_mode) and info.st_size == 0:
                self.new = True  # an empty file: nothing to lose
                return
            raise OutputExistsError(
                f"{path} exists and is not a {self.written_by} state file: refusing to "
                "overwrite it (choose another output or remove the file)"
            )
        self._state = state
        paths = state.get("paths")
        if not isinstance(paths, list):  # format 1: the output and its image records
            paths = [state.get("output"), state.get("images")]
        base = Path(_real(path.parent))
        self._recorded = {
            self._key(base / p) for p in paths if isinstance(p, str) and p and "\0" not in p
        }

    def _check_existing(self, out: _Output) -> None:
        path = out.path
        try:
            info = os.stat(path)
        except FileNotFoundError:
            if os.path.lexists(path):
                raise OutputExistsError(
                    f"{path} ({out.what}) is a broken symbolic link: refusing to write through it"
                ) from None
            if not out.folder and not path.parent.is_dir():
                raise NotFoundError(f"{path}: folder {path.parent} does not exist") from None
            return
        out.existed = True
        if out.folder:
            if not stat.S_ISDIR(info.st_mode):
                raise OutputExistsError(
                    f"{path} ({out.what}) exists and is not a folder: refusing to write it"
                )
            empty = not any(os.scandir(path))
        else:
            if not stat.S_ISREG(info.st_mode):
                raise OutputExistsError(
                    f"{path} ({out.what}) exists and is not a regular file: refusing to write it"
                )
            empty = out.may_be_empty and info.st_size == 0
        if self._key(path) in self._recorded or empty:
            return
        raise self._not_ours(path)

    def _not_ours(self, path: Path) -> OutputExistsError:
        if self.new:
            why = f"is not a {self.written_by} output (no {self.state_path.name} beside it)"
        else:
            why = f"is not recorded in {self.state_path.name} as written by this output"
        return OutputExistsError(
            f"{path} exists and {why}: refusing to overwrite it "
            "(choose another path or remove the file)"
        )

    # ==== Recording ====

    def _key(self, path: Path) -> str:
        """A path as the state file records it: relative to the state file's folder, with
        symbolic links above the last component resolved."""
        normal = os.path.join(_real(path.parent), path.name)
        return os.path.relpath(normal, _real(self.state_path.parent))

    def _write_state(self, added: set[str], *, force: bool = False) -> None:
        if not added and not force:
            return
        self._recorded |= added
        self._added |= added
        self._save()

    def _save(self) -> None:
        state = {
            **self._state,
            **self.info,
            "written_by": self.written_by,
            "format": STATE_FORMAT,
            "paths": sorted(self._recorded),
        }
        self._state = state
        atomic_write_text(self.state_path, json.dumps(state, indent=1) + "\n")

    def record(self, path: str | os.PathLike) -> Path:
        """Record ``path`` (a file inside a declared folder) before writing it; refuses an
        existing file the state file does not record."""
        if self._claim is None:
            raise RuntimeError("record() needs the output guard acquired")
        path = Path(path)
        key = self._key(path)
        if key in self._recorded:
            return path
        if os.path.lexists(path):
            raise self._not_ours(path)
        self._write_state({key})
        return path

    def keep(self) -> None:
        """From now on the run has results: a failure leaves its files for a rerun to resume."""
        self.kept = True

    # ==== Ending ====

    def discard(self) -> None:
        """Remove what this run created (it wrote no result): its files, empty folders it
        made, and its state file if it created that."""
        for out in reversed(self.outputs):
            if out.existed:
                continue
            try:
                if out.folder:
                    os.rmdir(out.path)
                elif os.path.isfile(out.path) and not os.path.islink(out.path):
                    os.unlink(out.path)
            except OSError:
                pass  # not empty, or gone: leave it
        if self.new:
            self.state_path.unlink(missing_ok=True)

    def release(self) -> None:
        """Drop recorded paths this run never wrote, then unlock (and remove the lock file)."""
        claim, self._claim = self._claim, None
        if claim is None:
            return
        try:
            never = {k for k in self._added if not os.path.lexists(self._full(k))}
            if never and self.state_path.exists():
                self._recorded -= never
                self._save()
        finally:
            claim.release()

    def _full(self, key: str) -> str:
        return os.path.join(_real(self.state_path.parent), key)

    def __enter__(self) -> OutputGuard:
        if self._claim is None:
            self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and not self.kept and self._claim is not None:
                self.discard()
        finally:
            self.release()
