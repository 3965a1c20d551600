"""``starkret align``: align every image-sharing moment of a dialogue file, resumably.

Input: Stark-style episodes (see :mod:`starkret.formats`) or plain JSONL moments
(``{"episode_id", "session", "moment_id", "description"}``). Output: JSONL, one line
per episode, appended as episodes finish: Stark episodes come back with
``session<N>:images_key`` / ``session<N>:images_module_name`` filled and an
``alignments`` list; plain moments come back grouped by episode. A re-run skips the
episodes already in the output (a half-written last line is dropped first). Image
records ``{image_source, image_url, index}`` of every chosen image go to
``OUTPUT.images.jsonl``.

Outputs are guarded, because ``-o`` names a file the job appends to and may cut:

- ``OUTPUT.starkret`` (a small JSON state file) is written before the first line and
  marks ``OUTPUT`` and ``OUTPUT.images.jsonl`` as this command's. An existing non-empty
  output without it is somebody else's file and is refused, never truncated. An output
  that is the input file (also through a symlink or hard link) is refused.
- On resume only a damaged *last* line (no newline at the end, or not a line this
  command writes) is dropped. A damaged line anywhere else is refused with its file and
  line: nothing is truncated.
- Every input line is checked before it is used (JSON, UTF-8, nesting, field types,
  ``k`` between 1 and :data:`~starkret.align.aligner.MAX_IMAGES_PER_MOMENT`); a bad one
  raises :class:`~starkret.align.formats.FormatError` naming the file and line.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from starkret._io import atomic_write_text
from starkret.align.aligner import MAX_IMAGES_PER_MOMENT, Aligner, Alignment
from starkret.align.formats import (
    Episode,
    FormatError,
    iter_jsonl,
    parse_json,
    read_episodes,
    stark_fields,
)
from starkret.errors import InvalidInputError, NotFoundError, OutputExistsError
from starkret.index.db import ImageDB

__all__ = ["STATE_SUFFIX", "AlignReport", "align_file", "check_writable_output"]

#: ``OUTPUT + STATE_SUFFIX`` marks OUTPUT (and OUTPUT.images.jsonl) as written by align.
STATE_SUFFIX = ".starkret"
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


def check_writable_output(
    path: Path, inputs: list[Path], is_ours, mark: str = "written by starkret"
) -> None:
    """Refuse to write ``path`` if it is one of ``inputs`` or an existing file not ours.

    ``is_ours(path)`` tells whether an existing non-empty regular file was written by
    this command; ``mark`` says how that is told, for the error message. Identity is
    checked on the file (``st_dev``/``st_ino``), so a symlink or hard link to an input
    is caught too.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise NotFoundError(f"{path}: folder {path.parent} does not exist") from None
        return
    for other in inputs:
        try:
            other_info = os.stat(other)
        except FileNotFoundError:
            continue
        if (info.st_dev, info.st_ino) == (other_info.st_dev, other_info.st_ino):
            raise InvalidInputError(
                f"{path} is the same file as {other}: refusing to write over it"
            )
    if not stat.S_ISREG(info.st_mode):
        raise OutputExistsError(f"{path} exists and is not a regular file: refusing to write it")
    if info.st_size > 0 and not is_ours(path):
        raise OutputExistsError(
            f"{path} exists and is not {mark}: refusing to overwrite it "
            "(choose another output or remove the file)"
        )


def _state_path(output: Path) -> Path:
    return output.with_name(output.name + STATE_SUFFIX)


def _read_state(path: Path) -> dict | None:
    """The state file's content if it is a starkret align state file, else None."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
        state = json.loads(data)
    except (OSError, ValueError, RecursionError):
        return None
    return state if isinstance(state, dict) and state.get("written_by") == _STATE_MARK else None


def _claim_outputs(input_path: Path, output: Path, records: Path) -> None:
    """Check the three files ``align`` writes, then write the state file (see the module doc)."""
    state_path = _state_path(output)
    ours = _read_state(state_path) is not None
    written = [state_path, output, records]
    for n, path in enumerate(written):
        check_writable_output(
            path,
            [input_path, *written[:n]],
            lambda _p: ours,
            f"a starkret align output (no {state_path.name} beside it)",
        )
    if not ours:
        state = {
            "written_by": _STATE_MARK,
            "format": 1,
            "output": output.name,
            "images": records.name,
            "input": os.path.abspath(input_path),
        }
        atomic_write_text(state_path, json.dumps(state, indent=1) + "\n")


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
) -> AlignReport:
    """Align every moment of ``input_path`` into ``output_path`` (see the module doc).

    ``keys="stark"`` (default) writes Stark's image UUIDs as ``images_key`` and Stark's
    image records; ``keys="db"`` the DB keys. ``fill``: the ``images_module_name`` values
    whose turns are aligned (default :data:`starkret.align.stark.DEFAULT_FILL`: ``retrieval``
    and turns with none); other turns (``p-t2i``, ``t2i``, ``web``) are left as they are.
    """
    from starkret.align.stark import DEFAULT_FILL

    if keys not in ("stark", "db"):
        raise InvalidInputError(f"keys must be 'stark' or 'db', got {keys!r}")
    fill = DEFAULT_FILL if fill is None else tuple(fill)
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise NotFoundError(f"dialogue file not found: {input_path}")
    if not input_path.is_file():
        raise InvalidInputError(f"{input_path} is not a file")
    aligner = aligner or Aligner(db)
    records_path = output_path.with_name(output_path.name + ".images.jsonl")
    _claim_outputs(input_path, output_path, records_path)
    episodes = _plain_episodes(input_path) or read_episodes(input_path)
    done = set(_resume_lines(output_path, "episode_id"))
    seen_images = set(_resume_lines(records_path, "key"))
    report = AlignReport()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="moment", desc="aligning", dynamic_ncols=True, mininterval=0.5)
    batch: list[Episode] = []
    try:
        with (
            open(output_path, "a", encoding="utf-8") as out,
            open(records_path, "a", encoding="utf-8") as records,
        ):
            for episode in episodes:
                if episode.episode_id in done:
                    report.skipped_episodes += 1
                    continue
                batch.append(episode)
                if len(batch) >= batch_episodes:
                    _flush(batch, aligner, out, records, seen_images, report, bar, keep, keys, fill)
                    batch = []
            if batch:
                _flush(batch, aligner, out, records, seen_images, report, bar, keep, keys, fill)
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


def _flush(batch, aligner, out, records, seen_images, report, bar, keep, keys, fill) -> None:
    from starkret.align.stark import stark_image_key, stark_record

    moments = [m for episode in batch for m in _moments_of(episode, fill)]
    alignments = aligner.align(moments) if moments else []
    by_episode: dict[str, list[Alignment]] = {}
    for a in alignments:
        by_episode.setdefault(a.episode_id, []).append(a)
        report.moments += 1
        if a.status == "ok":
            report.chosen += 1
        elif a.status == "below_threshold":
            report.below_threshold += 1
        else:
            report.exhausted += 1
        for position, image in enumerate(a.images):
            if keys == "stark":
                key = stark_image_key(a.moment_id, position, image.source)
                record = stark_record(key, image)
            else:
                key = image.stark_key
                record = {"key": key, **image.image_record()}
            if key not in seen_images:
                seen_images.add(key)
                records.write(json.dumps(record) + "\n")
    if keep:
        report.alignments.extend(alignments)
    for episode in batch:
        mine = by_episode.get(episode.episode_id, [])
        if "moments" in episode.raw and not episode.sessions:
            line = {"episode_id": episode.episode_id}
        else:
            fields = stark_fields(episode, mine, keys=keys, fill=fill)
            line = {**episode.raw, "episode_id": episode.episode_id, **fields}
        line["alignments"] = [_alignment_record(a, keys) for a in mine]
        try:
            text = json.dumps(line, ensure_ascii=False)
        except RecursionError:
            raise FormatError(f"{episode.where}: JSON nested too deeply") from None
        out.write(text + "\n")
        report.episodes += 1
    out.flush()
    records.flush()
    if bar is not None:
        bar.update(len(moments))
