"""``starkret align``: align every image-sharing moment of a dialogue file, resumably.

Input: Stark-style episodes (see :mod:`starkret.formats`) or plain JSONL moments
(``{"episode_id", "session", "moment_id", "description"}``). Output: JSONL, one line
per episode, appended as episodes finish: Stark episodes come back with
``session<N>:images_key`` / ``session<N>:images_module_name`` filled and an
``alignments`` list; plain moments come back grouped by episode. A re-run skips the
episodes already in the output (a half-written last line is dropped first). Image
records ``{image_source, image_url, index}`` of every chosen image go to
``OUTPUT.images.jsonl``.

Every path a run writes is new or recorded as its own (:mod:`starkret.store.outputs`):

- ``OUTPUT.starkret`` (a small JSON state file) is written before the first line and
  records every path runs on ``OUTPUT`` wrote: ``OUTPUT``, ``OUTPUT.images.jsonl`` and,
  from the CLI, ``--report``, ``--parquet`` and the ``--export-images`` folder and its
  tars. A path that exists and is not recorded there (a non-empty ``OUTPUT`` without a
  state file beside it: somebody else's file) is refused, never truncated or replaced.
  An output that is an input (the dialogue file, anything under the DB folder; also
  through a symlink or hard link) or another output of the same run is refused.
- ``OUTPUT.starkret.lock`` is locked while a run works: a second run on the same output
  refuses at once (:class:`~starkret.errors.OutputBusyError`) or, with ``wait=True``
  (``--wait``), waits and then resumes. A killed run's lock goes with its process.
- A run that fails before writing a result leaves nothing behind; one that fails later
  keeps what it wrote and says so: the same command resumes.
- On resume only a damaged *last* line (no newline at the end, or not a line this
  command writes) is dropped. A damaged line anywhere else is refused with its file and
  line: nothing is truncated.
- Every input line is checked before it is used (JSON, UTF-8, nesting, field types,
  ``k`` between 1 and :data:`~starkret.align.aligner.MAX_IMAGES_PER_MOMENT`); a bad one
  raises :class:`~starkret.align.formats.FormatError` naming the file and line.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from starkret.align.aligner import MAX_IMAGES_PER_MOMENT, Aligner, Alignment
from starkret.align.formats import (
    Episode,
    FormatError,
    iter_jsonl,
    parse_json,
    read_episodes,
    stark_fields,
)
from starkret.errors import InvalidInputError, NotFoundError
from starkret.index.db import ImageDB
from starkret.store.outputs import OutputGuard

__all__ = [
    "RECORDS_SUFFIX",
    "STATE_SUFFIX",
    "AlignReport",
    "align_file",
    "align_outputs",
    "records_path",
]

#: ``OUTPUT + STATE_SUFFIX``: the state file recording every path a run on OUTPUT wrote.
STATE_SUFFIX = ".starkret"
#: ``OUTPUT + RECORDS_SUFFIX``: the image records of the chosen images.
RECORDS_SUFFIX = ".images.jsonl"
_STATE_MARK = "starkret align"


@dataclass
class AlignReport:
    episodes: int = 0
    skipped_episodes: int = 0
    moments: int = 0
    chosen: int = 0
    below_threshold: int = 0
    exhausted: int = 0
    seconds: float = 0.0
    alignments: list[Alignment] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        rate = self.moments / self.seconds if self.seconds > 0 else 0.0
        return (
            f"aligned {self.moments:,} moments in {self.episodes:,} episodes "
            f"({self.skipped_episodes:,} already done): chosen {self.chosen:,}, "
            f"below threshold {self.below_threshold:,}, exhausted {self.exhausted:,}; "
            f"{rate:,.1f} moments/s"
        )


def _plain_episodes(path: Path) -> Iterator[Episode] | None:
    """Plain moment JSONL grouped into episodes, or None if the file is not of that kind."""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        record = parse_json(first, str(path))
    except FormatError:
        return None  # not plain moments; read_episodes names the error
    if not isinstance(record, dict) or "description" not in record or "sessions" in record:
        return None

    def generate() -> Iterator[Episode]:
        current: Episode | None = None
        for number, r in iter_jsonl(path):
            moment = _plain_moment(r, f"{path}:{number}")
            if current is None or current.episode_id != moment["episode_id"]:
                if current is not None:
                    yield current
                current = Episode(moment["episode_id"], {}, {"moments": []}, f"{path}:{number}")
            current.raw["moments"].append(moment)
        if current is not None:
            yield current

    return generate()


def _plain_moment(record: object, where: str) -> dict:
    """A plain moment line checked field by field, as the Aligner takes it."""
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected a JSON object (a moment)")
    missing = [k for k in ("episode_id", "moment_id", "description") if k not in record]
    if missing:
        raise FormatError(f"{where}: moment lacks {', '.join(missing)}")
    ids = {}
    for name in ("episode_id", "moment_id"):
        value = record[name]
        if not (isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))):
            raise FormatError(f"{where}: {name} must be a string or an integer")
        ids[name] = str(value)
    if not isinstance(record["description"], str):
        raise FormatError(f"{where}: description must be a string")
    session, k = record.get("session", 0), record.get("k", 1)
    if not isinstance(session, int) or isinstance(session, bool):
        raise FormatError(f"{where}: session must be an integer")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_IMAGES_PER_MOMENT:
        raise FormatError(
            f"{where}: k must be an integer from 1 to {MAX_IMAGES_PER_MOMENT} "
            f"(images shared by the moment), got {json.dumps(k)[:40]}"
        )
    return {**ids, "session": session, "description": record["description"], "k": k}


def _moments_of(episode: Episode, fill: tuple[str, ...] | None = None) -> list[dict]:
    if "moments" in episode.raw and not episode.sessions:
        return episode.raw["moments"]
    return episode.moments(fill)


# ==== Guarded outputs ====


def _state_path(output: Path) -> Path:
    return output.with_name(output.name + STATE_SUFFIX)


def records_path(output: str | os.PathLike) -> Path:
    """``OUTPUT.images.jsonl``: the image records of an aligned output."""
    output = Path(output)
    return output.with_name(output.name + RECORDS_SUFFIX)


def _check_input(input_path: Path) -> None:
    if not input_path.exists():
        raise NotFoundError(f"dialogue file not found: {input_path}")
    if not input_path.is_file():
        raise InvalidInputError(f"{input_path} is not a file")


def align_outputs(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    db_folder: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    parquet: str | os.PathLike | None = None,
    export_images: str | os.PathLike | None = None,
) -> OutputGuard:
    """The guard of every path one ``starkret align`` run writes (see the module doc).

    Inputs are the dialogue file and everything under ``db_folder`` (and its source
    folders, also when they are links to elsewhere). Acquire it (``with
    align_outputs(...).acquire(wait=...) as guard:``) and pass it to :func:`align_file`.
    """
    input_path, output = Path(input_path), Path(output_path)
    _check_input(input_path)
    folders: list[Path] = []
    if db_folder is not None:
        db_folder = Path(db_folder)
        folders.append(db_folder)
        if db_folder.is_dir():
            folders.extend(p for p in db_folder.iterdir() if p.is_dir())
    guard = OutputGuard(
        _state_path(output),
        written_by=_STATE_MARK,
        inputs=[input_path],
        input_folders=folders,
        info={
            "output": output.name,
            "images": records_path(output).name,
            "input": os.path.abspath(input_path),
        },
        busy_hint=" (starkret align --wait waits for it instead)",
    )
    guard.file(output, "-o", may_be_empty=True)
    guard.file(records_path(output), "image records", may_be_empty=True)
    if report is not None:
        guard.file(report, "--report")
    if parquet is not None:
        guard.file(parquet, "--parquet")
    if export_images is not None:
        guard.folder(export_images, "--export-images")
    return guard


def _resume_lines(path: Path, field_name: str) -> Iterator[str]:
    """``record[field_name]`` of every line of one of align's own JSONL outputs.

    A damaged last line (cut by a kill: no newline, or not a JSON object with
    ``field_name``) is dropped from the file; a damaged line before the last is a
    :class:`FormatError` and nothing is changed.
    """
    if not path.exists():
        return
    offset, bad = 0, None  # bad: (line number, offset, why) of a damaged line
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if bad is not None:
                raise FormatError(
                    f"{bad[0]}: {bad[2]}: the file is damaged before its last line; "
                    "fix or remove that line, nothing was changed"
                )
            value, why = None, "no newline at the end"
            if line.endswith(b"\n"):
                try:
                    record = parse_json(line, str(path), number)
                    value = record.get(field_name) if isinstance(record, dict) else None
                    why = f"not an object with {field_name!r}"
                except FormatError as exc:
                    why = str(exc).split(": ", 1)[-1]
            if value is None or isinstance(value, (dict, list)):
                bad = (f"{path}:{number}", offset, why)
            else:
                yield str(value)
            offset += len(line)
    if bad is not None:
        with open(path, "r+b") as f:
            f.truncate(bad[1])


def align_file(
    db: ImageDB,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    aligner: Aligner | None = None,
    batch_episodes: int = 256,
    progress: bool = True,
    keep: bool = False,
    keys: str = "stark",
    fill: tuple[str, ...] | None = None,
    outputs: OutputGuard | None = None,
    wait: bool = False,
) -> AlignReport:
    """Align every moment of ``input_path`` into ``output_path`` (see the module doc).

    ``keys="stark"`` (default) writes Stark's image UUIDs as ``images_key`` and Stark's
    image records; ``keys="db"`` the DB keys. ``fill``: the ``images_module_name`` values
    whose turns are aligned (default :data:`starkret.align.stark.DEFAULT_FILL`: ``retrieval``
    and turns with none); other turns (``p-t2i``, ``t2i``, ``web``) are left as they are.
    ``outputs``: the acquired :func:`align_outputs` guard of a run that writes more files
    (the CLI); without it the output is guarded here, and ``wait`` says whether to wait
    for another run on the same output instead of refusing
    (:class:`~starkret.errors.OutputBusyError`).
    """
    from starkret.align.stark import DEFAULT_FILL

    if keys not in ("stark", "db"):
        raise InvalidInputError(f"keys must be 'stark' or 'db', got {keys!r}")
    fill = DEFAULT_FILL if fill is None else tuple(fill)
    input_path, output_path = Path(input_path), Path(output_path)
    _check_input(input_path)
    if outputs is not None and not outputs.held:
        raise InvalidInputError("outputs must be acquired first: outputs.acquire()")
    guard = outputs or align_outputs(input_path, output_path, db_folder=getattr(db, "root", None))
    # the caller's guard is held already; our own is held for this run only
    with contextlib.nullcontext() if outputs is not None else guard.acquire(wait=wait):
        return _align_guarded(
            db, input_path, output_path, guard, aligner, batch_episodes, progress, keep, keys, fill
        )


def _align_guarded(
    db, input_path, output_path, guard, aligner, batch_episodes, progress, keep, keys, fill
) -> AlignReport:
    started = time.perf_counter()
    aligner = aligner or Aligner(db)
    records = records_path(output_path)
    episodes = _plain_episodes(input_path) or read_episodes(input_path)
    done = set(_resume_lines(output_path, "episode_id"))
    seen_images = set(_resume_lines(records, "key"))
    report = AlignReport()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="moment", desc="aligning", dynamic_ncols=True, mininterval=0.5)
    batch: list[Episode] = []
    try:
        with (
            open(output_path, "a", encoding="utf-8") as out,
            open(records, "a", encoding="utf-8") as images,
        ):
            sink = _Sink(out, images, guard, seen_images, report, bar, keep, keys, fill)
            for episode in episodes:
                if episode.episode_id in done:
                    report.skipped_episodes += 1
                    continue
                batch.append(episode)
                if len(batch) >= batch_episodes:
                    _flush(batch, aligner, sink)
                    batch = []
            if batch:
                _flush(batch, aligner, sink)
    except Exception as exc:
        if guard.kept:
            exc.add_note(
                f"({output_path} keeps the {report.episodes + len(done):,} episodes "
                "finished before this error: run the same command again to resume)"
            )
        raise
    finally:
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - started
    return report


def _alignment_record(a: Alignment, keys: str) -> dict:
    """An alignment as the output stores it. With ``keys="stark"`` its chosen images are
    the records of ``OUTPUT.images.jsonl`` (key and index = the images_key written into
    the episode, ``db_key`` = the DB key) with their score, so one key joins all three."""
    from starkret.align.stark import stark_image_key, stark_record

    record = a.to_dict()
    if keys == "stark":
        record["images"] = [
            {**stark_record(stark_image_key(a.moment_id, i, c.source), c), "score": c.score}
            for i, c in enumerate(a.images)
        ]
    return record


@dataclass
class _Sink:
    """Where :func:`_flush` writes, and what it counts."""

    out: TextIO
    records: TextIO
    guard: OutputGuard
    seen_images: set[str]
    report: AlignReport
    bar: object
    keep: bool
    keys: str
    fill: tuple[str, ...]


def _flush(batch: list[Episode], aligner: Aligner, sink: _Sink) -> None:
    """Align a batch of episodes and append their lines (all built before any is written)."""
    from starkret.align.stark import stark_image_key, stark_record

    report = sink.report
    moments = [m for episode in batch for m in _moments_of(episode, sink.fill)]
    alignments = aligner.align(moments) if moments else []
    by_episode: dict[str, list[Alignment]] = {}
    new_records: list[str] = []
    for a in alignments:
        by_episode.setdefault(a.episode_id, []).append(a)
        for position, image in enumerate(a.images):
            if sink.keys == "stark":
                key = stark_image_key(a.moment_id, position, image.source)
                record = stark_record(key, image)
            else:
                key = image.stark_key
                record = {"key": key, **image.image_record()}
            if key not in sink.seen_images:
                sink.seen_images.add(key)
                new_records.append(json.dumps(record) + "\n")
    lines: list[str] = []
    for episode in batch:
        mine = by_episode.get(episode.episode_id, [])
        if "moments" in episode.raw and not episode.sessions:
            line = {"episode_id": episode.episode_id}
        else:
            fields = stark_fields(episode, mine, keys=sink.keys, fill=sink.fill)
            line = {**episode.raw, "episode_id": episode.episode_id, **fields}
        line["alignments"] = [_alignment_record(a, sink.keys) for a in mine]
        try:
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
        except RecursionError:
            raise FormatError(f"{episode.where}: JSON nested too deeply") from None
    sink.guard.keep()  # results from here on: a later failure leaves them to resume
    sink.records.writelines(new_records)
    sink.out.writelines(lines)
    sink.out.flush()
    sink.records.flush()
    for a in alignments:
        report.moments += 1
        if a.status == "ok":
            report.chosen += 1
        elif a.status == "below_threshold":
            report.below_threshold += 1
        else:
            report.exhausted += 1
    report.episodes += len(lines)
    if sink.keep:
        report.alignments.extend(alignments)
    if sink.bar is not None:
        sink.bar.update(len(moments))
