"""Names of an embedded source's part files, as clip-retrieval and autofaiss read them.

Part ``i`` is written as ``img_emb/img_emb_{i:05d}.npy``, ``metadata/metadata_{i:05d}.parquet``
and ``failures/failures_{i:05d}.parquet``. autofaiss (through embedding-reader) and
clip-retrieval's ``clip back`` take the files in *name* order, so the numbers are
zero-padded like clip-retrieval's own writer pads them: name order is part order for
the first 100,000 parts (beyond that the numbers simply grow a digit; starkret itself
always orders by number).

Folders written before the padding (``img_emb_7.npy``) are still read (every reader
orders by number). :func:`pad_part_names` renames such a folder's files in place;
``embed`` does it when it resumes into an old folder, and ``build-index`` before it
hands the folder to autofaiss, so the two layouts never mix.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from starkret.errors import InvalidInputError

__all__ = [
    "INDEX_SUBFOLDERS",
    "PART_DIGITS",
    "SUBFOLDERS",
    "pad_part_names",
    "part_file",
    "part_files",
    "part_name",
    "part_number",
]

#: Digits of a part number in file names (clip-retrieval pads, img2dataset uses 5 too).
PART_DIGITS = 5
#: The per-part sub-folders of an embedded source, and the file suffix in each.
SUBFOLDERS = {"img_emb": ".npy", "metadata": ".parquet", "failures": ".parquet"}
#: Per-part files that ``build-index`` derives from the parts, in sub-folders of ``index/``
#: (``part_file(source / "index", "q8", i)``: the int8 copy of part ``i``).
INDEX_SUBFOLDERS = {"q8": ".npy"}
_NAME = re.compile(r"^(img_emb|metadata|failures)_(\d+)(\.npy|\.parquet)$")

_logger = logging.getLogger("starkret")


def part_name(sub: str, index: int, *, padded: bool = True) -> str:
    """The file name of part ``index`` in sub-folder ``sub`` (``img_emb``, ``metadata``,
    ``failures``); ``padded=False`` gives the name folders had before the padding.

    >>> part_name("img_emb", 12)
    'img_emb_00012.npy'
    >>> part_name("metadata", 12, padded=False)
    'metadata_12.parquet'
    """
    suffix = SUBFOLDERS[sub] if sub in SUBFOLDERS else INDEX_SUBFOLDERS[sub]
    return f"{sub}_{index:0{PART_DIGITS if padded else 0}d}{suffix}"


def part_file(out: str | os.PathLike, sub: str, index: int) -> Path:
    """Part ``index``'s file in sub-folder ``sub`` of the source folder ``out``."""
    return Path(out) / sub / part_name(sub, index)


def _parse(name: str) -> tuple[str, str] | None:
    """``(sub, digits)`` of a part file name, None for any other name."""
    match = _NAME.match(name)
    if match is None or SUBFOLDERS[match.group(1)] != match.group(3):
        return None
    return match.group(1), match.group(2)


def part_number(path: str | os.PathLike) -> int | None:
    """The part number in a part file's name (padded or not), None if the name is not
    a part file's.

    >>> part_number("out/img_emb/img_emb_00012.npy"), part_number("metadata_7.parquet")
    (12, 7)
    >>> part_number("img_emb_12.parquet") is None
    True
    """
    parsed = _parse(Path(path).name)
    return None if parsed is None else int(parsed[1])


def part_files(out: str | os.PathLike, sub: str) -> list[Path]:
    """The part files in sub-folder ``sub`` of ``out``, in part order (by number, padded
    names or not). InvalidInputError for a file that looks like a part but is not named as one
    (``img_emb_old.npy``): it cannot be placed in the order.
    """
    numbered = []
    for path in (Path(out) / sub).glob(f"{sub}_*{SUBFOLDERS[sub]}"):
        number = part_number(path)
        if number is None:
            raise InvalidInputError(
                f"{path} is not a part file name ({part_name(sub, 0)}): move it out of {sub}/"
            )
        numbered.append((number, path))
    return [path for _, path in sorted(numbered)]


def pad_part_names(out: str | os.PathLike) -> int:
    """Rename unpadded part files (``img_emb_7.npy``) of ``out`` to padded names; returns
    how many were renamed.

    Call it only while no other process writes the folder. The metadata file marks a
    part as done, so it is renamed last: an interrupted rename leaves each part either
    done under one name or redone on resume, never half of each. A part whose padded
    file already exists keeps it and the unpadded one is left alone (and reported):
    nothing is overwritten.
    """
    out = Path(out)
    renamed = 0
    for sub in ("img_emb", "failures", "metadata"):
        folder = out / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            parsed = _parse(path.name)
            if parsed is None or parsed[0] != sub:
                continue
            number = parsed[1]
            if len(number) >= PART_DIGITS:
                continue
            target = part_file(out, sub, int(number))
            if target.exists():
                _logger.warning(
                    "%s: both %s and %s exist; kept both", folder, path.name, target.name
                )
                continue
            os.replace(path, target)
            renamed += 1
    if renamed:
        _logger.info("%s: renamed %d part files to zero-padded names", out, renamed)
    return renamed
