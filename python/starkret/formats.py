"""Dialogue formats that carry image-sharing moments: Ultron, Thanos-style, Stark episodes.

- Ultron answers a sharing turn with ``<RET> <h> image description </h>``:
  :func:`parse_ultron_output` returns the description.
- Thanos-style dialogues mark shared images inline, ``[Sharing Image] description``:
  :func:`find_sharing_moments`.
- Stark-style episodes (JSON or JSONL): :func:`read_episodes` yields :class:`Episode`
  objects whose :meth:`Episode.moments` are ready for :class:`starkret.Aligner`, and
  :func:`write_alignments` fills Stark's ``session<N>:images_key`` and
  ``session<N>:images_module_name`` fields and writes the image records.

Two episode layouts are read. The nested one::

    {"episode_id": "e1", "sessions": [{"session": 1, "dialogue": [
        {"speaker": "Ann", "utterance": "Look!",
         "sharing_info": {"image_description": "my dog on the beach",
                          "image_source": "internet"}}]}]}

and the flat one of Stark's release: ``unique_id`` plus, per session N,
``session<N>:dialogue`` (utterances), ``session<N>:speakers`` and
``session<N>:image_descriptions`` / ``session<N>:image_sources`` (one entry per
utterance, empty where no image is shared).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Episode",
    "FormatError",
    "SharingMoment",
    "find_sharing_moments",
    "parse_ultron_output",
    "read_episodes",
    "stark_fields",
]

_RET = re.compile(r"<\s*RET\s*>", re.IGNORECASE)
_OPEN_H = re.compile(r"<\s*h\s*>", re.IGNORECASE)
_CLOSE_H = re.compile(r"<\s*/\s*h\s*>", re.IGNORECASE)
# Special tokens models leave around a generation: </s>, <s>, <pad>, <unk>,
# <|endoftext|>, <|eot_id|>, [PAD], ...
_NOISE = re.compile(
    r"<\|[^|>]*\|>|</?s>|<pad>|<unk>|<eos>|<bos>|\[(?:PAD|CLS|SEP|UNK)\]", re.IGNORECASE
)
_SHARING = re.compile(r"\[\s*sharing\s+image\s*\]", re.IGNORECASE)


class FormatError(ValueError):
    """Malformed dialogue data; the message names the file, line and episode."""


def parse_ultron_output(text: str) -> str | None:
    """The image description of an Ultron ``<RET>`` turn, or None when there is no ``<RET>``.

    Tolerates spaces inside and around the tags, a missing ``</h>`` (the description
    then runs to the end), a missing ``<h>``, and special tokens left by decoding.

    >>> parse_ultron_output("Sure! <RET> <h> my dog Star on the sofa </h></s>")
    'my dog Star on the sofa'
    >>> parse_ultron_output("<RET><h>a red bike") , parse_ultron_output("just text")
    ('a red bike', None)
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ret = _RET.search(text)
    if ret is None:
        return None
    rest = text[ret.end() :]
    opened = _OPEN_H.search(rest)
    if opened is not None:
        rest = rest[opened.end() :]
    closed = _CLOSE_H.search(rest)
    if closed is not None:
        rest = rest[: closed.start()]
    description = " ".join(_NOISE.sub(" ", rest).split())
    return description or None


@dataclass(frozen=True)
class SharingMoment:
    """A ``[Sharing Image]`` turn found in a dialogue text."""

    line: int  # 1-based
    speaker: str | None
    description: str


def find_sharing_moments(dialogue_text: str) -> list[SharingMoment]:
    """Every ``[Sharing Image] description`` turn of a dialogue, one turn per line.

    A ``Speaker:`` prefix before the tag is kept as the speaker; angle brackets around
    the description (``<a beach at dusk>``) are removed.

    >>> find_sharing_moments("A: hi\\nB: [Sharing Image] <a beach at dusk>")
    [SharingMoment(line=2, speaker='B', description='a beach at dusk')]
    """
    if not isinstance(dialogue_text, str):
        raise TypeError(f"dialogue_text must be a str, got {type(dialogue_text).__name__}")
    out = []
    for number, line in enumerate(dialogue_text.splitlines(), start=1):
        tag = _SHARING.search(line)
        if tag is None:
            continue
        head = line[: tag.start()].strip()
        speaker = head[:-1].strip() if head.endswith(":") else (head or None)
        description = line[tag.end() :].strip()
        if description.startswith("<") and description.endswith(">"):
            description = description[1:-1].strip()
        if description:
            out.append(SharingMoment(number, speaker or None, description))
    return out


# ==== Stark-style episodes ====


@dataclass
class Utterance:
    speaker: str | None
    text: str
    image_description: str | None = None
    image_source: str | None = None


@dataclass
class Episode:
    """One episode: sessions of utterances, some of which share an image."""

    episode_id: str
    sessions: dict[int, list[Utterance]]
    raw: dict = field(default_factory=dict, repr=False)

    def moments(self) -> list[dict]:
        """The image-sharing moments, as the Aligner takes them (session order)."""
        out = []
        for session in sorted(self.sessions):
            for turn, u in enumerate(self.sessions[session]):
                if u.image_description:
                    out.append(
                        {
                            "episode_id": self.episode_id,
                            "session": session,
                            "moment_id": f"{self.episode_id}:s{session}:t{turn}",
                            "description": u.image_description,
                        }
                    )
        return out


_SESSION_KEY = re.compile(r"^session(\d+):(.+)$")


def _nested(record: dict, where: str) -> Episode:
    episode_id = str(record.get("episode_id", record.get("unique_id", "")))
    if not episode_id:
        raise FormatError(f"{where}: no episode_id")
    sessions: dict[int, list[Utterance]] = {}
    raw_sessions = record.get("sessions")
    if not isinstance(raw_sessions, list):
        raise FormatError(f"{where} (episode {episode_id}): 'sessions' must be a list")
    for n, session in enumerate(raw_sessions, start=1):
        if not isinstance(session, dict) or not isinstance(session.get("dialogue"), list):
            raise FormatError(
                f"{where} (episode {episode_id}): session {n} needs a 'dialogue' list"
            )
        number = int(session.get("session", n))
        turns = []
        for t, turn in enumerate(session["dialogue"]):
            if not isinstance(turn, dict):
                raise FormatError(
                    f"{where} (episode {episode_id}): session {number} turn {t} is not an object"
                )
            info = turn.get("sharing_info") or {}
            if not isinstance(info, dict):
                raise FormatError(
                    f"{where} (episode {episode_id}): session {number} turn {t}: "
                    "'sharing_info' must be an object"
                )
            turns.append(
                Utterance(
                    turn.get("speaker"),
                    str(turn.get("utterance", "")),
                    info.get("image_description") or None,
                    info.get("image_source") or None,
                )
            )
        sessions[number] = turns
    return Episode(episode_id, sessions, record)


def _flat(record: dict, where: str) -> Episode:
    episode_id = str(record.get("unique_id", record.get("episode_id", "")))
    if not episode_id:
        raise FormatError(f"{where}: no unique_id")
    fields: dict[int, dict[str, object]] = {}
    for key, value in record.items():
        match = _SESSION_KEY.match(key)
        if match:
            fields.setdefault(int(match.group(1)), {})[match.group(2)] = value
    sessions = {}
    for number, f in sorted(fields.items()):
        dialogue = f.get("dialogue") or []
        if not isinstance(dialogue, list):
            raise FormatError(
                f"{where} (episode {episode_id}): session{number}:dialogue must be a list"
            )
        n = len(dialogue)

        def column(name, n=n, f=f, number=number):
            values = f.get(name) or [None] * n
            if not isinstance(values, list) or len(values) != n:
                raise FormatError(
                    f"{where} (episode {episode_id}): session{number}:{name} "
                    f"must be a list of {n} entries"
                )
            return values

        speakers, descriptions = column("speakers"), column("image_descriptions")
        sources = column("image_sources")
        sessions[number] = [
            Utterance(s, str(u), d or None, src or None)
            for s, u, d, src in zip(speakers, dialogue, descriptions, sources, strict=True)
        ]
    return Episode(episode_id, sessions, record)


def _episode(record, where: str) -> Episode:
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "sessions" in record:
        return _nested(record, where)
    if any(_SESSION_KEY.match(k) for k in record):
        return _flat(record, where)
    raise FormatError(f"{where}: neither 'sessions' nor 'session<N>:...' fields")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, record)`` for every non-blank line of a JSONL file.

    Raises :class:`FormatError` naming the file and line of invalid JSON.
    """
    with open(Path(path), encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise FormatError(f"{path}:{number}: invalid JSON ({exc.msg})") from None


def read_episodes(path: str | os.PathLike) -> Iterator[Episode]:
    """Episodes from a JSONL file (one per line) or a JSON file (a list of episodes).

    Raises :class:`FormatError` naming the file, line and episode of malformed data.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":
            try:
                records = json.load(f)
            except json.JSONDecodeError as exc:
                raise FormatError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
            for i, record in enumerate(records):
                yield _episode(record, f"{path} episode #{i}")
            return
    for number, record in iter_jsonl(path):
        yield _episode(record, f"{path}:{number}")


def stark_fields(episode: Episode, alignments: list) -> dict:
    """Stark's per-session fields for an aligned episode.

    ``session<N>:images_key`` (per utterance: the chosen image keys, `url:` for
    CC12M/RedCaps12M, empty where nothing is shared or nothing was found) and
    ``session<N>:images_module_name`` (``retrieval`` where the DB supplied the image).
    """
    by_moment = {a.moment_id: a for a in alignments}
    out: dict[str, list] = {}
    for session in sorted(episode.sessions):
        keys, modules = [], []
        for turn, _u in enumerate(episode.sessions[session]):
            a = by_moment.get(f"{episode.episode_id}:s{session}:t{turn}")
            chosen = [c.stark_key for c in a.images] if a is not None else []
            keys.append(chosen[0] if len(chosen) == 1 else (chosen or ""))
            modules.append(a.module if a is not None and chosen else "")
        out[f"session{session}:images_key"] = keys
        out[f"session{session}:images_module_name"] = modules
    return out
