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
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from starkret.errors import FormatError, InvalidTypeError

__all__ = [
    "Episode",
    "FormatError",
    "SharingMoment",
    "find_sharing_moments",
    "parse_json",
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


# ==== Untrusted JSON ====

# A \uD800-\uDFFF escape: the only way JSON text can carry a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONG_NUMBER = re.compile(r"\d{4301,}")  # Python refuses to convert these


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _nesting_line(text: str, limit: int) -> int:
    """The line where ``[``/``{`` nesting first goes deeper than ``limit`` (1 if never)."""
    depth, in_string, escaped, line = 0, False, False, 1
    for char in text:
        if char == "\n":
            line += 1
        elif in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return line
        elif char in "]}":
            depth -= 1
    return 1


def parse_json(data: bytes, where: str, first_line: int = 1) -> object:
    """One JSON document from untrusted bytes, or :class:`FormatError` naming ``where``.

    ``where`` is the file (and line) the bytes came from; for a document spanning lines
    the error names the offending line, counted from ``first_line``. Invalid UTF-8,
    invalid JSON, nesting deeper than Python's recursion limit, numbers too long to
    convert and lone surrogates (text no UTF-8 file can hold) are all ``FormatError``.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = first_line - 1 + data.count(b"\n", 0, exc.start) + 1
        raise FormatError(f"{where}:{line}: not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # an error at the very end (a cut document) is on its last line, not after it
        line = first_line - 1 + min(exc.lineno, _line_of(text.rstrip(), len(text)))
        raise FormatError(f"{where}:{line}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        line = first_line - 1 + _nesting_line(text, max(1, sys.getrecursionlimit() - 200))
        raise FormatError(f"{where}:{line}: JSON nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        found = _LONG_NUMBER.search(text)
        line = first_line - 1 + (_line_of(text, found.start()) if found else 1)
        why = "a number of more than 4300 digits" if found else str(exc)[:100]
        raise FormatError(f"{where}:{line}: invalid JSON ({why})") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            found = _SURROGATE_ESCAPE.search(text)
            line = first_line - 1 + _line_of(text, found.start() if found else 0)
            raise FormatError(
                f"{where}:{line}: a string holds a lone surrogate (\\uD800-\\uDFFF), "
                "which is not Unicode text"
            ) from None
        except RecursionError:
            raise FormatError(f"{where}:{first_line}: JSON nested too deeply") from None
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _identifier(value: object, what: str, where: str) -> str:
    """An episode or moment id: a JSON string or integer, as a string."""
    if isinstance(value, str) or _is_int(value):
        return str(value)
    raise FormatError(f"{where}: {what} must be a string or an integer, got {_json_type(value)}")


def _optional_text(value: object, what: str, where: str) -> str | None:
    """A description or source: a string, or null / "" for none."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    raise FormatError(f"{where}: {what} must be a string, got {_json_type(value)}")


def _utterance(value: object, where: str) -> str:
    """An utterance's text: a string (numbers are written out, null is empty)."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise FormatError(f"{where} must be a string, got {_json_type(value)}")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"[:60]
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


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
        raise InvalidTypeError(f"text must be a str, got {type(text).__name__}")
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
        raise InvalidTypeError(f"dialogue_text must be a str, got {type(dialogue_text).__name__}")
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
    #: ``images_module_name`` already in the input (``retrieval``, ``p-t2i``, ``t2i``, ``web``)
    module: str = ""


@dataclass
class Episode:
    """One episode: sessions of utterances, some of which share an image."""

    episode_id: str
    sessions: dict[int, list[Utterance]]
    raw: dict = field(default_factory=dict, repr=False)
    #: Where the episode was read from (``file:line`` or ``file episode #i``), for errors.
    where: str = ""

    def moments(self, fill: tuple[str, ...] | None = None) -> list[dict]:
        """The image-sharing moments, as the Aligner takes them (session order).

        ``fill``: only turns whose input ``images_module_name`` is one of these (``""``:
        none yet); None: every sharing turn.
        """
        out = []
        for session in sorted(self.sessions):
            for turn, u in enumerate(self.sessions[session]):
                if fill is not None and u.module not in fill:
                    continue
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


_SESSION_KEY = re.compile(r"^session([0-9]{1,9}):(.+)$")


def _nested(record: dict, where: str) -> Episode:
    episode_id = _identifier(
        record.get("episode_id", record.get("unique_id", "")), "episode_id", where
    )
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
        number = session.get("session", n)
        if not _is_int(number):
            raise FormatError(
                f"{where} (episode {episode_id}): session {n}: 'session' must be an integer, "
                f"got {_json_type(number)}"
            )
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
            at = f"{where} (episode {episode_id}): session {number} turn {t}"
            module = info.get("images_module_name", turn.get("images_module_name"))
            turns.append(
                Utterance(
                    turn.get("speaker"),
                    _utterance(turn.get("utterance"), f"{at}: utterance"),
                    _optional_text(info.get("image_description"), "image_description", at),
                    _optional_text(info.get("image_source"), "image_source", at),
                    module if isinstance(module, str) else "",
                )
            )
        sessions[number] = turns
    return Episode(episode_id, sessions, record, where)


def _flat(record: dict, where: str) -> Episode:
    episode_id = _identifier(
        record.get("unique_id", record.get("episode_id", "")), "unique_id", where
    )
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
        sources, modules = column("image_sources"), column("images_module_name")
        at = f"{where} (episode {episode_id}): session{number}"
        sessions[number] = [
            Utterance(
                s,
                _utterance(u, f"{at}: dialogue[{t}]"),
                _optional_text(d, f"image_descriptions[{t}]", at),
                _optional_text(src, f"image_sources[{t}]", at),
                m if isinstance(m, str) else "",
            )
            for t, (s, u, d, src, m) in enumerate(
                zip(speakers, dialogue, descriptions, sources, modules, strict=True)
            )
        ]
    return Episode(episode_id, sessions, record, where)


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

    Raises :class:`FormatError` naming the file and line of anything that is not a
    JSON value (see :func:`parse_json`).
    """
    with open(Path(path), "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            yield number, parse_json(line, str(path), number)


def read_episodes(path: str | os.PathLike) -> Iterator[Episode]:
    """Episodes from a JSONL file (one per line) or a JSON file (a list of episodes).

    Raises :class:`FormatError` naming the file, line and episode of malformed data.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) == b"PAR1":  # parquet (stark-dialogue ships stark.parquet)
            yield from _parquet_episodes(path)
            return
        f.seek(0)
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        if first == b"[":
            f.seek(0)
            records = parse_json(f.read(), str(path))
            for i, record in enumerate(records):  # type: ignore[arg-type]
                yield _episode(record, f"{path} episode #{i}")
            return
    for number, record in iter_jsonl(path):
        yield _episode(record, f"{path}:{number}")


def _parquet_episodes(path: Path) -> Iterator[Episode]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise FormatError(f"{path}: not a readable parquet file ({exc})"[:300]) from None
    row = 0
    for batch in file.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield _episode(record, f"{path} row {row}")
            row += 1


def stark_fields(
    episode: Episode, alignments: list, *, keys: str = "db", fill: tuple[str, ...] | None = None
) -> dict:
    """Stark's per-session fields for an aligned episode.

    ``session<N>:images_key`` (per utterance: the chosen image keys, empty where nothing
    is shared or nothing was found) and ``session<N>:images_module_name`` (``retrieval``
    where the DB supplied the image). ``keys="db"``: DB keys (``url:`` + URL for
    CC12M/RedCaps12M); ``keys="stark"``: Stark's image UUIDs (:mod:`starkret.align.stark`).
    Turns outside ``fill`` (see :meth:`Episode.moments`) keep the input's values.
    """
    from starkret.align.stark import stark_image_key

    by_moment = {a.moment_id: a for a in alignments}
    out: dict[str, list] = {}
    for session in sorted(episode.sessions):
        keys_out, modules = [], []
        old_keys = episode.raw.get(f"session{session}:images_key")
        old_modules = episode.raw.get(f"session{session}:images_module_name")
        for turn, u in enumerate(episode.sessions[session]):
            if fill is not None and u.module not in fill:
                keep = isinstance(old_keys, list) and turn < len(old_keys)
                keys_out.append(old_keys[turn] if keep else "")
                keep = isinstance(old_modules, list) and turn < len(old_modules)
                modules.append(old_modules[turn] if keep else u.module)
                continue
            moment_id = f"{episode.episode_id}:s{session}:t{turn}"
            a = by_moment.get(moment_id)
            images = a.images if a is not None else []
            if keys == "stark":
                chosen = [stark_image_key(moment_id, i, c.source) for i, c in enumerate(images)]
            else:
                chosen = [c.stark_key for c in images]
            keys_out.append(chosen[0] if len(chosen) == 1 else (chosen or ""))
            modules.append(a.module if a is not None and chosen else "")
        out[f"session{session}:images_key"] = keys_out
        out[f"session{session}:images_module_name"] = modules
    return out
