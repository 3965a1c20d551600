"""``embed-shards``: image collections to CLIP embeddings, resumable, in clip-retrieval's layout.

Output (readable by autofaiss and clip-retrieval unchanged)::

    OUT/img_emb/img_emb_{i:05d}.npy          float16, L2-normalised rows
    OUT/metadata/metadata_{i:05d}.parquet    one row per embedding, same order
    OUT/failures/failures_{i:05d}.parquet    every sample of part i that could not be embedded
    OUT/starkret.json                    model, preprocessing, counts, parts (the manifest)

Part ``i`` is one input shard or one fixed-size chunk of a folder or table. Each file
is written under a temporary name and renamed; the metadata file is renamed last and
marks the part done, so a killed run (even ``kill -9``) redoes only unfinished parts
and never duplicates or drops a sample.

Several runs with the same arguments can share one output folder (one per GPU of a
machine): each part is claimed by one worker (:mod:`starkret.store.claims`), a run that
finds all remaining parts claimed waits for them, and a run with other settings is
refused while another is live. A sample key met a second time (in another part, or
twice in one part) is not embedded again: the later one is recorded in the failures
as ``duplicate key: K (first in part N)``, where "later" means committed later (part
order in a single run; :mod:`starkret.store.keyset`).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from starkret._io import atomic_write, temp_target
from starkret.errors import (
    IncompatibleSourcesError,
    InvalidInputError,
    OutputBusyError,
    OutputExistsError,
)
from starkret.ingest.sources import Part, PreprocessOptions
from starkret.ingest.towers import ClipEmbedder
from starkret.store.claims import WorkFolder
from starkret.store.keyset import KeySet
from starkret.store.layout import SUBFOLDERS, part_file, part_number

__all__ = ["EmbedReport", "PartRunner"]

MANIFEST = "starkret.json"
#: Row ids are ``part << ID_PART_SHIFT | row``: stable across resumes and re-runs.
ID_PART_SHIFT = 32


@dataclass
class EmbedReport:
    """What a call of :func:`embed` did."""

    output_dir: str
    embedded: int = 0
    failed: int = 0
    parts_done: int = 0
    parts_skipped: int = 0
    #: Parts another worker on the same folder finished while this run was going.
    parts_elsewhere: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    #: Seconds the model waited for input (decoded batches) with nothing to compute:
    #: near zero when decoding keeps up, large when the model is starved.
    input_wait_seconds: float = 0.0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    #: Embedded and failed samples in the whole output folder after the run.
    total_embedded: int = 0
    total_failed: int = 0

    @property
    def images_per_second(self) -> float:
        """Throughput of the embedding loop (model loading and planning excluded)."""
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.failure_reasons.items()))
        return (
            f"embedded {self.embedded:,} images, failed {self.failed:,}"
            f"{f' ({reasons})' if reasons else ''}, parts written {self.parts_done}, "
            f"skipped as done {self.parts_skipped}"
            f"{f', done by other workers {self.parts_elsewhere}' if self.parts_elsewhere else ''}"
            f", {self.images_per_second:,.1f} images/s, "
            f"wall {self.seconds:,.1f} s -> {self.output_dir}"
        )


# ==== Layout and manifest ====


def _paths(out: Path, i: int) -> tuple[Path, Path, Path]:
    """Part ``i``'s files, zero-padded names (:mod:`starkret.store.layout`)."""
    return (
        part_file(out, "img_emb", i),
        part_file(out, "metadata", i),
        part_file(out, "failures", i),
    )


def _temp_part(path: Path) -> int | None:
    """The part a temporary file (``.img_emb_00012.npy.tmp-PID-TOKEN``, see
    :mod:`starkret._io`) belongs to, None for any other file."""
    target = temp_target(path.name)
    return None if target is None else part_number(target)


def _manifest_identity(embedder: ClipEmbedder, options: PreprocessOptions, source: str) -> dict:
    from starkret._version import __version__

    return {
        "model": embedder.model_name,
        "pretrained": embedder.pretrained,
        "dim": embedder.dim,
        "image_size": options.size,
        "preprocess_mode": options.mode,
        "mean": list(options.mean),
        "std": list(options.std),
        "source": source,
        "starkret_version": __version__,
    }


_MUST_MATCH = (
    "model",
    "pretrained",
    "dim",
    "image_size",
    "preprocess_mode",
    "mean",
    "std",
    "source",
)


def _read_manifest(out: Path) -> dict | None:
    """The manifest of ``out``, None if it has none; unreadable or not a starkret
    manifest: OutputExistsError (nothing in the folder can then be called ours)."""
    path = out / MANIFEST
    if not path.exists() and not path.is_symlink():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        manifest = exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("parts"), list):
        why = f"unreadable ({manifest})" if isinstance(manifest, Exception) else "not ours"
        raise OutputExistsError(
            f"{path} is {why}: starkret cannot tell which files of {out} it wrote; "
            "move it away (or use another output folder) to start over"
        )
    return manifest


def _user_files(out: Path) -> list[Path]:
    """Files in ``out``'s part sub-folders (``img_emb/``, ``metadata/``, ``failures/``)."""
    found = []
    for sub in SUBFOLDERS:
        folder = out / sub
        if folder.is_dir() and not folder.is_symlink():
            found += sorted(p for p in folder.iterdir() if not p.is_dir() or p.is_symlink())
        elif folder.exists() or folder.is_symlink():
            found.append(folder)
    return found


def _refuse_foreign(out: Path, overwrite: bool) -> None:
    """Refuse an output folder starkret did not write: one without a manifest whose part
    sub-folders hold files (a user's, or another tool's clip-retrieval output). Embedding
    into it would take its files for finished parts, rename or replace them, and
    ``overwrite`` would delete them. A new or empty folder, or one with only other
    files beside the sub-folders, is fine: nothing in it is touched."""
    if not out.is_dir() or _read_manifest(out) is not None:
        return
    found = _user_files(out)
    if found:
        what = "--overwrite would delete it" if overwrite else "embed would mix it with its parts"
        raise OutputExistsError(
            f"{out} was not written by starkret (no {MANIFEST}) and holds {found[0]}: "
            f"{what}; use another output folder"
        )


def _check_manifest(out: Path, identity: dict, plan: list[str], others_running: bool) -> dict:
    old = _read_manifest(out)
    if old is None:
        return {}
    running = f"another embed is running on {out} with different arguments"
    for key in _MUST_MATCH:
        if old.get(key) != identity[key]:
            if others_running:
                raise OutputBusyError(
                    f"{running} ({key}={old.get(key)!r}, this run has {identity[key]!r}); "
                    "wait for it to finish or use another output folder"
                )
            raise IncompatibleSourcesError(
                f"{out} was embedded with {key}={old.get(key)!r}, this run has "
                f"{identity[key]!r}: embeddings would not be comparable. Use another output "
                "folder, or --overwrite to start over"
            )
    old_plan = old.get("parts", [])
    if others_running and plan != old_plan:
        raise OutputBusyError(
            f"{running} (other inputs); give it the same inputs to help it, "
            "or wait for it to finish"
        )
    if plan[: len(old_plan)] != old_plan:
        raise InvalidInputError(
            f"the inputs differ from the first run into {out} (part lists disagree); "
            "use the same inputs (new ones may only be added after the old ones), "
            "another output folder, or --overwrite"
        )
    follows = _follows_links(identity.get("part_inputs"))
    if old_plan and _follows_links(old.get("part_inputs")) != follows:
        had = "with" if not follows else "without"
        raise InvalidInputError(
            f"{out} was embedded {had} follow_links (--follow-links): what serve reads back "
            "must be what embed read; use the same choice, another output folder, or "
            "--overwrite"
        )
    return old


def _follows_links(records) -> bool:
    """A manifest's ``part_inputs`` say its links out of the inputs were followed."""
    return any(isinstance(r, dict) and r.get("follow_links") is True for r in records or [])


def _write_manifest(out: Path, identity: dict, plan: list[str], totals: dict) -> None:
    body = {**identity, "parts": plan, **totals}
    atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(body, indent=2).encode()))


def _clean(out: Path) -> None:
    """``overwrite``: delete what the manifest of ``out`` says is ours (its parts' files,
    their temporaries, the manifest), nothing else. A file in a part sub-folder named as
    a part the manifest does not list (a user's, or another tool's) would be read as a
    part of the new output: the run is refused instead (OutputExistsError), before
    anything is deleted. Other files there stay as they are."""
    manifest = _read_manifest(out)
    if manifest is None:
        _refuse_foreign(out, overwrite=True)
        return
    count = len(manifest["parts"])
    ours = []
    for path in _user_files(out):
        if _temp_part(path) is not None:
            ours.append(path)  # a temporary of ours (``.NAME.tmp-PID-TOKEN``)
            continue
        number = part_number(path.name)
        if number is None:
            continue  # not a part's name: the user's, left alone
        if number >= count or path.is_symlink() or not path.is_file():
            raise OutputExistsError(
                f"{path} looks like a part file but is not one of the {count} parts "
                f"{out / MANIFEST} lists: starkret did not write it and will not delete it; "
                f"move it out of {path.parent.name}/ to start over"
            )
        ours.append(path)
    # metadata (the done marker) first: an interrupted clean leaves no part looking done
    for path in sorted(ours, key=lambda p: p.parent.name != "metadata"):
        path.unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)


def _count_done(out: Path) -> tuple[int, int]:
    """Embedded and failed sample counts over all finished parts."""
    import pyarrow.parquet as pq

    embedded = sum(
        pq.ParquetFile(p).metadata.num_rows for p in (out / "metadata").glob("*.parquet")
    )
    failed = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "failures").glob("*.parquet"))
    return embedded, failed


# ==== One part ====


class PartRunner:
    """Embeds parts into one output folder, claiming each part first (see the module doc).

    One per worker process: the driver's, or each Ray actor's.
    """

    def __init__(
        self, out: Path, embedder: ClipEmbedder, options: PreprocessOptions, source: str
    ) -> None:
        self.out, self.embedder, self.options, self.source = Path(out), embedder, options, source
        self.folder = WorkFolder(self.out)
        self.keys = KeySet(self.out / "metadata")

    def run(self, index: int, part: Part, *, wait: bool = False, progress=None):
        """Embed part ``index`` and return (embedded, failures); None if another worker
        holds it (``wait``: wait for that worker instead) or it is already done."""
        claim = self.folder.claim(index, wait=wait)
        if claim is None:
            return None
        with claim:
            if _paths(self.out, index)[1].exists():
                return None
            _remove_temps(self.out, index)
            return embed_part(
                part,
                index,
                self.out,
                self.embedder,
                self.options,
                self.source,
                progress=progress,
                commit=self._commit,
            )

    def run_all(
        self,
        pending: list[tuple[int, Part]],
        *,
        progress: Callable[[int, int], None] | None = None,
        finish: Callable[[int, tuple[int, list]], None] | None = None,
        after_free_parts: Callable[[], None] | None = None,
    ) -> float:
        """Embed ``pending`` parts as one continuous stream (:class:`_Stream`): parts
        another worker holds are waited for (and redone if it died), parts found done are
        skipped. ``finish(index, (embedded, failures))`` is called, on this thread, for each
        part written here; ``after_free_parts()``, on the reader thread, once the parts
        nobody else held are read, before it waits for the others. Returns the seconds
        the model waited for input."""
        stream = _Stream(self, pending, progress, finish, after_free_parts)
        stream.run()
        return stream.input_wait

    def _commit(self, index: int, keys: list[str], write) -> dict[int, str]:
        """Under the folder lock: find duplicate keys, then ``write(drop)`` the part."""
        with self.folder.locked():
            self.keys.refresh()
            drop = _duplicates(keys, index, self.keys)
            write(drop)
            self.keys.add(index, [k for i, k in enumerate(keys) if i not in drop])
        return drop


# ==== One continuous stream ====

#: Decoded batches waiting for the model (besides the Rust core's own prefetch), and
#: embedded parts waiting for the writer (one more may be being written): bounded memory.
STREAM_BATCHES = 2
STREAM_PARTS = 1
#: How often blocked threads look whether the stream is stopping, in seconds.
_POLL = 0.05


class _Now:
    """A submission of an embedder without ``submit_images``: computed at once."""

    def __init__(self, value: np.ndarray) -> None:
        self._value = value

    def result(self) -> np.ndarray:
        return self._value


def _submit(embedder: ClipEmbedder, pixels: np.ndarray):
    submit = getattr(embedder, "submit_images", None)
    if submit is None:
        return _Now(embedder.encode_images(pixels, dtype="float16"))
    return submit(pixels, dtype="float16")


class _Stream:
    """Many parts embedded as one stream of batches, on three threads.

    - The *reader* (daemon thread) claims parts in order and iterates their batches into
      a queue of ``STREAM_BATCHES``: Rust threads decode; Pillow fallbacks, folder and
      table reads and the numpy glue run on the reader. As soon as a part is read it
      claims the next one and starts decoding it, while the model still embeds the end
      of the current one, so the model never idles at part boundaries.
    - The caller's thread feeds the model, with one or two submissions in flight, and
      hands each part whose embeddings are all back to
    - the *writer* (daemon thread), which commits parts in order (duplicate keys, npy,
      parquet, fsync, rename, under the folder lock) with at most ``STREAM_PARTS`` waiting.

    A claim travels with its part and is released once the part is written, or when
    the stream stops (an error in any thread, which reaches the caller naming the part,
    or an interrupt): an unwritten part stays unfinished and a rerun redoes it, exactly
    as after ``kill -9``.
    """

    def __init__(self, runner: PartRunner, pending, progress, finish, after_free_parts) -> None:
        self.runner, self.pending = runner, list(pending)
        self.progress, self.finish = progress, finish
        self.after_free_parts = after_free_parts
        self.batches: queue.Queue = queue.Queue(STREAM_BATCHES)
        self.parts: queue.Queue = queue.Queue(STREAM_PARTS)
        self.results: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.claims: dict[int, object] = {}
        self.claims_lock = threading.Lock()
        self.closed = False
        self.writer_error: BaseException | None = None
        self.input_wait = 0.0

    # ---- the caller's thread: the model ----

    def run(self) -> None:
        reader = threading.Thread(target=self._read, name="starkret-reader", daemon=True)
        writer = threading.Thread(target=self._write, name="starkret-writer", daemon=True)
        reader.start()
        writer.start()
        try:
            self._feed_model(reader)
            self._hand_over(None)  # no more parts: the writer ends after the last one
            while writer.is_alive():
                writer.join(_POLL)
            self._check_writer()
            self._take_results()
        finally:
            self.stop.set()
            reader.join(5.0)  # it stops at its next batch; its claims are released below
            writer.join()  # it finishes the file it is writing (atomic either way)
            with self.claims_lock:
                self.closed = True
                for claim in self.claims.values():
                    claim.release()
                self.claims.clear()

    def _feed_model(self, reader: threading.Thread) -> None:
        in_flight: collections.deque = collections.deque()
        while True:
            item = self._next(in_flight, reader)
            kind, work = item[0], item[1]
            if kind == "done":
                break
            if kind == "error":
                _name_part(item[2], work)
                raise item[2]
            if kind == "read":
                work.read_all = True
                self._maybe_hand_over(work)
            elif kind == "batch":
                batch = item[2]
                slot = work.add(batch)
                if not len(batch):
                    if self.progress is not None:
                        self.progress(0, len(batch.failures))
                    continue
                try:
                    submitted = _submit(self.runner.embedder, batch.pixels)
                except Exception as exc:
                    _name_part(exc, work.describe())
                    raise
                work.in_model += 1
                in_flight.append((work, slot, submitted, len(batch), len(batch.failures)))
                while len(in_flight) > 1:
                    self._collect(in_flight.popleft())
        while in_flight:
            self._collect(in_flight.popleft())

    def _next(self, in_flight: collections.deque, reader: threading.Thread):
        """The reader's next item; while none is ready the model finishes what it has,
        and the time it then waits with nothing to do is counted as input wait."""
        self._check_writer()
        self._take_results()
        try:
            return self.batches.get_nowait()
        except queue.Empty:
            pass
        while in_flight:
            self._collect(in_flight.popleft())
        started = time.perf_counter()
        try:
            while True:
                self._check_writer()
                try:
                    return self.batches.get(timeout=_POLL)
                except queue.Empty:
                    if not reader.is_alive() and self.batches.empty():
                        raise RuntimeError(
                            "starkret: the part reader thread ended unexpectedly"
                        ) from None
        finally:
            self.input_wait += time.perf_counter() - started

    def _collect(self, entry) -> None:
        work, slot, submitted, images, failed = entry
        try:
            work.chunks[slot] = submitted.result()
        except Exception as exc:
            _name_part(exc, work.describe())
            raise
        work.in_model -= 1
        if self.progress is not None:
            self.progress(images, failed)
        self._maybe_hand_over(work)

    def _maybe_hand_over(self, work: _PartWork) -> None:
        if work.read_all and work.in_model == 0:
            self._hand_over(work)

    def _hand_over(self, work: _PartWork | None) -> None:
        while True:
            self._check_writer()
            try:
                self.parts.put(work, timeout=_POLL)
                return
            except queue.Full:
                pass

    def _check_writer(self) -> None:
        if self.writer_error is not None:
            raise self.writer_error

    def _take_results(self) -> None:
        while True:
            try:
                result = self.results.get_nowait()
            except queue.Empty:
                return
            if self.finish is not None:
                self.finish(*result)

    # ---- the reader thread ----

    def _read(self) -> None:
        what = "the parts"
        try:
            busy = []  # parts another worker held: waited for once ours are read
            for index, part in self.pending:
                what = f"part {index} ({part.describe()})"
                claim = self.runner.folder.claim(index)
                if claim is None:
                    busy.append((index, part))
                elif not self._read_part(index, part, claim):
                    return
            if self.after_free_parts is not None:
                self.after_free_parts()
            for index, part in busy:
                what = f"part {index} ({part.describe()})"
                claim = self._claim_when_free(index)
                if claim is None:  # done elsewhere
                    continue
                if not self._read_part(index, part, claim):
                    return
            self._put(("done", None))
        except BaseException as exc:
            self._put(("error", what, exc))

    def _claim_when_free(self, index: int):
        """Wait for another worker's part (a dead worker's claim frees at once): its
        claim, or None once it is done or the stream stops."""
        out = self.runner.out
        while not self.stop.is_set():
            if _paths(out, index)[1].exists():
                return None
            claim = self.runner.folder.claim(index)
            if claim is not None:
                return claim
            self.stop.wait(_POLL)
        return None

    def _read_part(self, index: int, part: Part, claim) -> bool:
        """Put part ``index``'s batches into the queue; False if the stream stopped."""
        out = self.runner.out
        with self.claims_lock:
            if self.closed:
                claim.release()
                return False
            self.claims[index] = claim
            if _paths(out, index)[1].exists():  # finished by another worker meanwhile
                del self.claims[index]
                claim.release()
                return True
            _remove_temps(out, index)
        work = _PartWork(index, part, claim)
        batches = part.batches(self.runner.options)
        try:
            for batch in batches:
                if not self._put(("batch", work, batch)):
                    return False
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        return self._put(("read", work))

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.batches.put(item, timeout=_POLL)
                return True
            except queue.Full:
                pass
        return False

    # ---- the writer thread ----

    def _write(self) -> None:
        runner = self.runner
        while True:
            try:
                work = self.parts.get(timeout=_POLL)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            if work is None:
                return
            if self.stop.is_set():
                continue  # abandoned: left unfinished, its claim released by run()
            try:
                result = _write_part(
                    work, runner.out, runner.embedder.dim, runner.source, runner._commit
                )
            except BaseException as exc:
                _name_part(exc, work.describe())
                self.writer_error = exc
                return
            with self.claims_lock:
                claim = self.claims.pop(work.index, None)
                if claim is not None:
                    claim.release()
            self.results.put((work.index, result))


def _duplicates(keys: list[str], index: int, known: KeySet) -> dict[int, str]:
    """Positions of ``keys`` already in a finished part or earlier in this part -> reason."""
    drop: dict[int, str] = {}
    first_in_part: dict[str, int] = {}
    for position, key in enumerate(keys):
        if first_in_part.setdefault(key, position) != position:
            drop[position] = f"duplicate key: {key} (first in part {index})"
    for position, part in enumerate(known.first_parts(keys)):
        if part is not None:
            drop[position] = f"duplicate key: {keys[position]} (first in part {part})"
    return drop


def _remove_temps(out: Path, index: int) -> None:
    """Remove part ``index``'s temporary files (call only while holding its claim)."""
    for sub in ("img_emb", "metadata", "failures"):
        for stale in (out / sub).glob(f".{sub}_*.tmp-*"):
            if _temp_part(stale) == index:
                stale.unlink(missing_ok=True)


def _remove_unclaimed_temps(out: Path, folder: WorkFolder) -> None:
    """Remove temporary files of parts nobody is working on (left by a killed run)."""
    parts = set()
    for stale in out.glob("*/.*.tmp-*"):
        part = _temp_part(stale)
        if part is not None:
            parts.add(part)
    for index in sorted(parts):
        claim = folder.claim(index)
        if claim is not None:
            with claim:
                _remove_temps(out, index)
    for stale in out.glob(f".{MANIFEST}.tmp-*"):  # manifests are written under the lock
        stale.unlink(missing_ok=True)


_META_COLUMNS = ("sample_key", "caption", "url", "width", "height", "shard")


class _PartWork:
    """One part between its claim and its commit: the rows read so far, their embeddings
    (arrays, or ``None`` while their batch is still in the model) and the failures."""

    def __init__(self, index: int, part: Part, claim=None) -> None:
        self.index, self.part, self.claim = index, part, claim
        self.chunks: list[np.ndarray | None] = []
        self.meta: dict[str, list] = {k: [] for k in _META_COLUMNS}
        self.failures: list[tuple[str, str | None, str]] = []
        #: every batch of the part was read (set by the reader), and how many are in the model
        self.read_all = False
        self.in_model = 0

    def add(self, batch) -> int:
        """Record ``batch``'s rows and failures; returns the slot of its embeddings."""
        self.failures.extend(batch.failures)
        meta = self.meta
        meta["sample_key"] += batch.keys
        meta["caption"] += batch.captions
        meta["url"] += batch.urls
        meta["width"] += batch.widths
        meta["height"] += batch.heights
        meta["shard"] += batch.shards
        self.chunks.append(None)
        return len(self.chunks) - 1

    def describe(self) -> str:
        return f"part {self.index} ({self.part.describe()})"


def _name_part(exc: BaseException, what: str) -> None:
    """Say in ``exc`` which part it happened in (once), keeping its type."""
    note = f"while embedding {what}"
    if note not in getattr(exc, "__notes__", ()):
        exc.add_note(note)


def embed_part(
    part: Part,
    index: int,
    out: Path,
    embedder: ClipEmbedder,
    options: PreprocessOptions,
    source: str,
    progress=None,
    commit=None,
) -> tuple[int, list]:
    """Embed one part and write its three files; returns (embedded, failures).

    ``commit(index, keys, write)`` decides which rows are duplicates and calls
    ``write(drop)`` (see :class:`PartRunner`); without it every row is written.
    """
    work = _PartWork(index, part)
    try:
        for batch in part.batches(options):
            slot = work.add(batch)
            if len(batch):
                work.chunks[slot] = embedder.encode_images(batch.pixels, dtype="float16")
            if progress is not None:
                progress(len(batch), len(batch.failures))
        return _write_part(work, out, embedder.dim, source, commit)
    except Exception as exc:
        _name_part(exc, work.describe())
        raise


def _write_part(work: _PartWork, out: Path, dim: int, source: str, commit) -> tuple[int, list]:
    """Write a fully embedded part (npy, failures, then metadata: the done marker)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index, part, meta, failures = work.index, work.part, work.meta, work.failures
    chunks = [c for c in work.chunks if c is not None]
    emb = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float16)
    emb_path, meta_path, fail_path = _paths(out, index)
    kept = len(meta["sample_key"])

    def write(drop: dict[int, str]) -> None:
        nonlocal emb, kept
        if drop:
            rows = [i for i in range(len(meta["sample_key"])) if i not in drop]
            failures.extend((meta["shard"][i], meta["sample_key"][i], drop[i]) for i in drop)
            emb = emb[rows]
            for name in meta:
                meta[name] = [meta[name][i] for i in rows]
        n = kept = len(meta["sample_key"])
        table = pa.table(
            {
                "key": pa.array([f"{source}/{k}" for k in meta["sample_key"]], pa.string()),
                "sample_key": pa.array(meta["sample_key"], pa.string()),
                "source": pa.array([source] * n, pa.string()),
                "url": pa.array(meta["url"], pa.string()),
                "caption": pa.array(meta["caption"], pa.string()),
                "width": pa.array(meta["width"], pa.int32()),
                "height": pa.array(meta["height"], pa.int32()),
                "shard": pa.array(meta["shard"], pa.string()),
                "id": pa.array((np.int64(index) << ID_PART_SHIFT) + np.arange(n, dtype=np.int64)),
                # clip-retrieval's column: the file of a folder image, else the sample key
                "image_path": pa.array(
                    [_image_path(part, k) for k in meta["sample_key"]], pa.string()
                ),
            }
        )
        fails = pa.table(
            {
                "source": pa.array([source] * len(failures), pa.string()),
                "shard": pa.array([f[0] for f in failures], pa.string()),
                "key": pa.array([f[1] for f in failures], pa.string()),
                "reason": pa.array([f[2] for f in failures], pa.string()),
            }
        )
        atomic_write(emb_path, lambda f: np.save(f, emb))
        atomic_write(fail_path, lambda f: pq.write_table(fails, f))
        # Written last: its presence marks the part as done.
        atomic_write(meta_path, lambda f: pq.write_table(table, f))

    if commit is None:
        write({})
    else:
        commit(index, list(meta["sample_key"]), write)
    return kept, failures


def _image_path(part: Part, key: str) -> str:
    if part.kind == "files" and not part.layout:
        return os.path.join(part.path, key)
    return key
