"""``starkret align``: align every image-sharing moment of a dialogue file, resumably.

Input: Stark-style episodes (see :mod:`starkret.formats`) or plain JSONL moments
(``{"episode_id", "session", "moment_id", "description"}``). Output: JSONL, one line
per episode, appended as episodes finish: Stark episodes come back with
``session<N>:images_key`` / ``session<N>:images_module_name`` filled and an
``alignments`` list; plain moments come back grouped by episode. A re-run skips the
episodes already in the output (a half-written last line is dropped first). Image
records ``{image_source, image_url, index}`` of every chosen image go to
``OUTPUT.images.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .aligner import Aligner, Alignment
from .db import ImageDB
from .formats import Episode, FormatError, iter_jsonl, read_episodes, stark_fields

__all__ = ["AlignReport", "align_file"]


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
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict) or "description" not in record or "sessions" in record:
        return None

    def generate() -> Iterator[Episode]:
        current: Episode | None = None
        for number, r in iter_jsonl(path):
            missing = [k for k in ("episode_id", "moment_id", "description") if k not in r]
            if missing:
                raise FormatError(f"{path}:{number}: moment lacks {', '.join(missing)}")
            episode_id = str(r["episode_id"])
            if current is None or current.episode_id != episode_id:
                if current is not None:
                    yield current
                current = Episode(episode_id, {}, {"moments": []})
            current.raw["moments"].append(r)
        if current is not None:
            yield current

    return generate()


def _moments_of(episode: Episode) -> list[dict]:
    if "moments" in episode.raw and not episode.sessions:
        return [
            {
                "episode_id": episode.episode_id,
                "session": int(m.get("session", 0)),
                "moment_id": str(m["moment_id"]),
                "description": m["description"],
                "k": int(m.get("k", 1)),
            }
            for m in episode.raw["moments"]
        ]
    return episode.moments()


def _done_episodes(output: Path) -> tuple[set[str], int]:
    """Episode ids already written; drops a half-written last line. Returns (ids, bytes)."""
    if not output.exists():
        return set(), 0
    done, good = set(), 0
    with open(output, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                done.add(str(json.loads(line)["episode_id"]))
            except (json.JSONDecodeError, KeyError):
                break
            good += len(line)
    with open(output, "r+b") as f:
        f.truncate(good)
    return done, good


def align_file(
    db: ImageDB,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    aligner: Aligner | None = None,
    batch_episodes: int = 256,
    progress: bool = True,
    keep: bool = False,
) -> AlignReport:
    """Align every moment of ``input_path`` into ``output_path`` (see the module doc)."""
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise FileNotFoundError(f"dialogue file not found: {input_path}")
    aligner = aligner or Aligner(db)
    episodes = _plain_episodes(input_path) or read_episodes(input_path)
    done, _ = _done_episodes(output_path)
    records_path = output_path.with_name(output_path.name + ".images.jsonl")
    seen_images = _seen_images(records_path)
    report = AlignReport()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="moment", desc="aligning", dynamic_ncols=True, mininterval=0.5)
    batch: list[Episode] = []
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
                _flush(batch, aligner, out, records, seen_images, report, bar, keep)
                batch = []
        if batch:
            _flush(batch, aligner, out, records, seen_images, report, bar, keep)
    if bar is not None:
        bar.close()
    report.seconds = time.perf_counter() - started
    return report


def _seen_images(path: Path) -> set[str]:
    if not path.exists():
        return set()
    seen = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                seen.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError):
                continue
    return seen


def _flush(batch, aligner, out, records, seen_images, report, bar, keep) -> None:
    moments = [m for episode in batch for m in _moments_of(episode)]
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
        for image in a.images:
            if image.stark_key not in seen_images:
                seen_images.add(image.stark_key)
                records.write(json.dumps({"key": image.stark_key, **image.image_record()}) + "\n")
    if keep:
        report.alignments.extend(alignments)
    for episode in batch:
        mine = by_episode.get(episode.episode_id, [])
        if "moments" in episode.raw and not episode.sessions:
            line = {"episode_id": episode.episode_id}
        else:
            line = {**episode.raw, "episode_id": episode.episode_id, **stark_fields(episode, mine)}
        line["alignments"] = [a.to_dict() for a in mine]
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        report.episodes += 1
    out.flush()
    records.flush()
    if bar is not None:
        bar.update(len(moments))
