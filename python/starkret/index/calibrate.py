"""The user's own queries for calibrating an ivf index (``build-index --calibrate-with``).

An ivf index's probe count is chosen at build time as the cheapest one reaching a recall
target against exact search. By default the queries are generated text-like probes
(:mod:`starkret.index.text_like`); :func:`calibration_queries` reads real ones instead,
so the recall written into ``infos.json`` is the recall on queries like the user's:

* an ``.npy`` file: float vectors of the source's dimension, ``(n, dim)`` (or one ``(dim,)``);
* a ``.jsonl`` / ``.json`` moments file: one JSON object per line with a ``"vector"``
  (a list of numbers) or a ``"description"`` (or ``"text"``) to encode;
* any other file: UTF-8 text, one query per line (blank lines skipped).

Texts are encoded by the source's own model (the manifest's ``model`` / ``pretrained``,
through :class:`starkret.ingest.towers.ClipEmbedder`'s text tower, as ``ImageDB`` encodes
text queries). Rows are scaled to unit length, as ``ImageDB.encode`` does.

>>> import numpy as np
>>> calibration_queries(np.eye(3, dtype=np.float32), dim=3).shape
(3, 3)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from starkret.errors import FormatError, InvalidInputError, NotFoundError
from starkret.ingest.towers import ClipEmbedder

__all__ = [
    "JSON_SUFFIXES",
    "MAX_CALIBRATION_QUERIES",
    "calibration_queries",
    "read_queries",
    "source_text_encoder",
]

#: File suffixes read as moments (JSON lines) rather than as plain text.
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
#: More queries than this are subsampled (seeded): exact search over the whole source per
#: query is the calibration's cost, and recall on this many is within ~0.01.
MAX_CALIBRATION_QUERIES = 2000

TextEncoder = Callable[[list[str]], np.ndarray]


def read_queries(path: str | os.PathLike) -> np.ndarray | list[str]:
    """The queries of a file: an array of vectors (``.npy``) or a list of texts.

    A moments file mixing vectors and descriptions is refused (encode one kind).
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: calibration queries not found (or not a file)")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise FormatError(f"{path}: not a readable .npy array of vectors: {exc}") from None
        if not np.issubdtype(array.dtype, np.number):
            raise FormatError(f"{path}: query vectors must be numbers, got dtype {array.dtype}")
        return array
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise NotFoundError(f"{path}: cannot read calibration queries: {exc}") from None
    if path.suffix.lower() in JSON_SUFFIXES:
        return _moments(path, text)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _moments(path: Path, text: str) -> np.ndarray | list[str]:
    vectors, texts = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise FormatError(f"{path}, line {number}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise FormatError(f"{path}, line {number}: expected a JSON object")
        if record.get("vector") is not None:
            vectors.append(record["vector"])
        elif isinstance(record.get("description", record.get("text")), str):
            texts.append(record.get("description", record.get("text")))
        else:
            raise FormatError(
                f'{path}, line {number}: a moment needs a "vector" or a "description"'
            )
    if vectors and texts:
        raise FormatError(f"{path}: mixes vectors and descriptions; give one kind of query")
    if not vectors:
        return texts
    try:
        return np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise FormatError(f"{path}: every vector must be a list of numbers of one length") from None


def calibration_queries(
    queries: str | os.PathLike | np.ndarray | Sequence[str],
    *,
    dim: int,
    encode_texts: TextEncoder | None = None,
    max_queries: int = MAX_CALIBRATION_QUERIES,
    seed: int = 0,
) -> np.ndarray:
    """Unit float32 ``(n, dim)`` query vectors from a path, an array or a list of texts.

    ``encode_texts(texts) -> (n, dim) array`` encodes texts (the source's text tower);
    more than ``max_queries`` queries are subsampled with ``seed``.
    """
    where = "calibration queries"
    if isinstance(queries, (str, os.PathLike)):
        where = str(queries)
        queries = read_queries(queries)
    if isinstance(queries, np.ndarray):
        vectors = queries
    else:
        texts = list(queries)
        if not texts:
            raise InvalidInputError(f"{where}: no queries (the file or list is empty)")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidInputError(f"{where}: expected texts or an (n, {dim}) array of vectors")
        if encode_texts is None:
            raise InvalidInputError(f"{where}: texts need the source's model to encode them")
        if len(texts) > max_queries:
            keep = np.random.default_rng(seed).choice(len(texts), max_queries, replace=False)
            texts = [texts[i] for i in np.sort(keep)]
        vectors = encode_texts(texts)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1 and vectors.size:
        vectors = vectors[None, :]
    if vectors.size == 0 or len(vectors) == 0:
        raise InvalidInputError(f"{where}: no queries (the file or array is empty)")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InvalidInputError(
            f"{where}: query vectors must have shape (n, {dim}) for this source, "
            f"got {vectors.shape}"
        )
    if not np.isfinite(vectors).all():
        raise InvalidInputError(f"{where}: query vectors contain NaN or infinity")
    if len(vectors) > max_queries:
        keep = np.random.default_rng(seed).choice(len(vectors), max_queries, replace=False)
        vectors = vectors[np.sort(keep)]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1), dtype=np.float32)


def source_text_encoder(manifest: dict) -> TextEncoder:
    """Texts -> unit float32 rows with the text tower of the model a source was embedded
    with (loaded on first use: vectors need no model)."""

    def encode(texts: list[str]) -> np.ndarray:
        embedder = ClipEmbedder(manifest["model"], manifest.get("pretrained"))
        return embedder.encode_texts(texts, dtype="float32")

    return encode
