"""``ImageDB``: several embedded sources searched together, per source, in batches."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from starkret.defaults import DEFAULTS
from starkret.errors import IncompatibleSourcesError, InvalidInputError, InvalidTypeError
from starkret.index.duplicates import Duplicates, record_path
from starkret.index.source import SourceIndex, source_dirs
from starkret.index.topk import Exclusions
from starkret.store.images import ImageReader, part_input
from starkret.store.keyindex import KeyIndex
from starkret.store.metadata import Metadata

__all__ = ["Hit", "ImageDB", "Results"]

_logger = logging.getLogger("starkret")

#: Manifest fields every source of one DB must share: their vectors are compared.
_SAME_SPACE = ("model", "pretrained", "dim", "image_size", "mean", "std")


@dataclass(frozen=True)
class Hit:
    """One search result: a source's image and its score for the query."""

    key: str
    source: str
    score: float
    id: int
    url: str | None
    caption: str | None
    row: int  # global row of the image in its source (its embedding)


@dataclass
class Results:
    """Search results as arrays, before any metadata is read: ``(q, m)`` each.

    Per query, hits of every searched source are ranked together (score descending,
    then source name, then row); ``rows`` is -1 (score -inf) past the last hit.
    ``sources[q, j]`` indexes :attr:`ImageDB.sources`.
    """

    sources: np.ndarray  # int16
    rows: np.ndarray  # int64
    scores: np.ndarray  # float32

    def valid(self) -> np.ndarray:
        return self.rows >= 0

    def slice(self, start: int, stop: int) -> Results:
        """The results of queries ``start:stop``."""
        return Results(self.sources[start:stop], self.rows[start:stop], self.scores[start:stop])

    def first_per_source(self, k: int) -> Results:
        """Per query, only the first ``k`` hits of each source (rank order kept): the
        top ``k`` of every source, from a search that asked for more."""
        valid = self.valid()
        keep = np.zeros_like(valid)
        for s in np.unique(self.sources[valid]).tolist():
            mine = valid & (self.sources == s)
            keep |= mine & (np.cumsum(mine, axis=1) <= k)
        width = int(keep.sum(axis=1).max(initial=0))
        order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
        kept = np.take_along_axis(keep, order, 1)
        take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
        return Results(
            np.where(kept, take(self.sources), 0).astype(np.int16),
            np.where(kept, take(self.rows), -1).astype(np.int64),
            np.where(kept, take(self.scores), -np.inf).astype(np.float32),
        )


class _Source:
    """One source of the DB: its index (vectors, search), metadata and key lookups.
    Opening reads file headers only; nothing per row is loaded."""

    def __init__(self, name: str, index: SourceIndex) -> None:
        self.name, self.index = name, index
        self.stamp = _index_stamp(index.source_dir)  # before reading: a change re-opens
        self.metadata = Metadata.open(index.source_dir, index.parts.offsets, index.infos)
        self.keys = KeyIndex.open(index.source_dir, self.metadata, index.infos)

    def rows_of(self, keys: list[str]) -> dict[str, np.ndarray]:
        """Every row of each key found (DB keys and Stark ``url:`` keys)."""
        owner, rows = self.keys.lookup(keys, every=True)
        found: dict[str, list[int]] = {}
        for o, r in zip(owner.tolist(), rows.tolist(), strict=True):
            found.setdefault(keys[o], []).append(r)
        return {k: np.asarray(v, np.int64) for k, v in found.items()}


class ImageDB:
    """A folder of embedded sources (``embed-shards`` outputs, one sub-folder each).

    Searches every source (or the ones named) and returns the top ``k`` of each, for
    a whole batch of queries at once. Queries are strings, encoded with the text tower
    of the model the sources were embedded with, or vectors of the right dimension.

    >>> db = ImageDB.open("db")  # doctest: +SKIP
    >>> hits = db.search(["a golden retriever on a beach"], k=5)  # doctest: +SKIP
    >>> [(h.source, h.key, round(h.score, 3)) for h in hits[0]][:2]  # doctest: +SKIP
    [('cc12m', 'cc12m/000012345', 0.312), ('redcaps12m', 'redcaps12m/000998877', 0.305)]
    """

    def __init__(
        self,
        root: Path,
        sources: dict[str, _Source],
        manifest: dict,
        embedder=None,
        duplicates: str = DEFAULTS.duplicates,
    ):
        self.root, self._sources, self.manifest = root, sources, manifest
        self._embedder = embedder
        self._images = ImageReader()
        self._refreshing = threading.Lock()
        self.duplicates_mode = duplicates
        self._duplicates: Duplicates | None = None
        self._duplicates_stamp: tuple[int, int, int] | None = None

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, embedder=None, duplicates: str = DEFAULTS.duplicates
    ) -> ImageDB:
        """Open every embedded source under ``path`` (or ``path`` itself if it is one).

        ``duplicates="drop"`` (default): images ``starkret dedup`` recorded as near
        duplicates of a kept image (``duplicates.npz``) are never returned;
        ``"keep"``: the record is ignored.
        """
        if duplicates not in ("drop", "keep"):
            raise InvalidInputError(f"duplicates must be 'drop' or 'keep', got {duplicates!r}")
        root = Path(path)
        dirs = source_dirs(root)
        indices = [SourceIndex.open(d) for d in dirs]
        first = indices[0].manifest
        for idx in indices[1:]:
            for field in _SAME_SPACE:
                if idx.manifest.get(field) != first.get(field):
                    raise IncompatibleSourcesError(
                        f"{idx.source_dir} was embedded with {field}={idx.manifest.get(field)!r} "
                        f"but {indices[0].source_dir} with {first.get(field)!r}: their vectors "
                        "cannot be searched together"
                    )
        sources: dict[str, _Source] = {}
        for idx in indices:
            name = idx.manifest["source"]
            if name in sources:
                raise IncompatibleSourcesError(
                    f"two folders hold source {name!r}: {idx.source_dir} and "
                    f"{sources[name].index.source_dir}"
                )
            sources[name] = _Source(name, idx)
        return cls(root, sources, first, embedder, duplicates)

    # ==== Staying current ====

    def refresh(self) -> list[str]:
        """Re-open the sources whose index ``build-index`` has published anew since they
        were opened (grown or rebuilt); returns their names.

        The check is one ``stat`` of each source's ``index/infos.json`` (which a build
        publishes last, by rename), so it is cheap enough to run before every search
        batch (``starkret serve`` does). A source is swapped whole: a search in progress
        finishes on the old one. Rows of a grown source keep their numbers. A near-duplicate
        record that ``starkret dedup`` published since it was read is read again (one
        ``stat`` too), so a running service leaves the new duplicates out without a restart.

        >>> db.refresh()  # doctest: +SKIP
        ['cc12m']
        """
        published = self._duplicates is not None and self.duplicates_mode != "keep"
        if published and _file_stamp(record_path(self.root)) != self._duplicates_stamp:
            self._duplicates = None  # `starkret dedup` published a new record: read it
        changed = [
            n for n, s in self._sources.items() if _index_stamp(s.index.source_dir) != s.stamp
        ]
        if not changed:
            return []
        reopened = []
        with self._refreshing:
            for name in changed:
                old = self._sources[name]
                stamp = _index_stamp(old.index.source_dir)
                if stamp == old.stamp:  # another thread re-opened it meanwhile
                    continue
                try:
                    index = SourceIndex.open(old.index.source_dir)
                    self._check_space(index)
                    new = _Source(name, index)
                    # the stamp from before reading: a build published meanwhile is
                    # picked up by the next refresh
                    new.stamp = stamp
                except Exception as exc:  # keep serving the old index
                    _logger.warning(
                        "%s: could not re-open its new index (%s); still serving the old one",
                        old.index.source_dir,
                        exc,
                    )
                    old.stamp = stamp
                    continue
                self._sources[name] = new
                self._duplicates = None  # read again for the new row counts
                reopened.append(name)
                _logger.info("%s: re-opened its index (%d images)", name, new.index.count)
        return reopened

    def _check_space(self, index: SourceIndex) -> None:
        for field in _SAME_SPACE:
            if index.manifest.get(field) != self.manifest.get(field):
                raise IncompatibleSourcesError(
                    f"{index.source_dir} is now embedded with {field}="
                    f"{index.manifest.get(field)!r}, the DB with {self.manifest.get(field)!r}"
                )

    # ==== Properties ====

    @property
    def sources(self) -> list[str]:
        return list(self._sources)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return sum(s.index.count for s in self._sources.values())

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n}: {s.index.count} ({s.index.kind})" for n, s in self._sources.items()
        )
        return f"ImageDB({str(self.root)!r}, model={self.manifest['model']!r}, {parts})"

    @property
    def embedder(self):
        """The text tower of the DB's model (loaded on first use)."""
        if self._embedder is None:
            from starkret.ingest.towers import ClipEmbedder

            self._embedder = ClipEmbedder(self.manifest["model"], self.manifest["pretrained"])
        return self._embedder

    @property
    def duplicates(self) -> Duplicates:
        """The recorded near duplicates left out of searches (read on first use; empty
        with ``duplicates="keep"`` or without a record)."""
        if self._duplicates is None:
            if self.duplicates_mode == "keep":
                self._duplicates = Duplicates(None, {})
            else:
                counts = {n: s.index.count for n, s in self._sources.items()}
                self._duplicates_stamp = _file_stamp(record_path(self.root))
                self._duplicates = Duplicates.load(self.root, counts)
        return self._duplicates

    # ==== Search ====

    def encode(self, queries: Sequence[str] | np.ndarray) -> np.ndarray:
        """Queries as unit float32 vectors: texts through the text tower, vectors checked."""
        if isinstance(queries, str):
            raise InvalidTypeError("queries must be a sequence of strings or an (n, dim) array")
        if isinstance(queries, np.ndarray) or (len(queries) and not isinstance(queries[0], str)):
            vectors = np.asarray(queries, dtype=np.float32)
            if vectors.ndim != 2 or vectors.shape[1] != self.dim:
                raise InvalidInputError(
                    f"query vectors must have shape (n, {self.dim}) for this DB "
                    f"({self.manifest['model']}), got {vectors.shape}"
                )
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            return vectors / np.where(norms > 0, norms, 1)
        return self.embedder.encode_texts(list(queries), dtype="float32")

    def search(
        self,
        queries: Sequence[str] | np.ndarray,
        k: int = DEFAULTS.k_per_source,
        *,
        sources: Sequence[str] | None = None,
        exclude: Sequence[str] | Sequence[Sequence[str]] | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ) -> list[list[Hit]]:
        """Top ``k`` images of each source for every query, best first.

        ``exclude`` holds image keys never to return: one collection for all queries,
        or one per query. ``device="cuda"`` (or ``"cuda:N"``) scans exactly on the GPU
        (:mod:`starkret.index.gpu`: float32 scores, tiles sized to free GPU memory,
        parts kept resident when they fit) instead of the CPU scan or the approximate
        index; ``device="torch-cpu"`` runs that same code on the CPU.
        """
        _check_k(k)
        results = self.search_arrays(
            self.encode(queries),
            k,
            sources=sources,
            exclude=exclude,
            device=device,
            threads=threads,
        )
        return self.hits(results)

    def search_arrays(
        self,
        vectors: np.ndarray,
        k: int,
        *,
        sources: Sequence[str] | None = None,
        exclude: Sequence[str] | Sequence[Sequence[str]] | None = None,
        exclude_rows: dict[str, Exclusions] | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ) -> Results:
        """:meth:`search` for unit query ``vectors``, as arrays (no metadata read).

        ``exclude``: keys, as in :meth:`search`; ``exclude_rows``: per source name, rows
        never to return (:class:`~starkret.index.topk.Exclusions`). Recorded near
        duplicates (:attr:`duplicates`) are left out inside the scan too.
        """
        _check_k(k)
        names = list(self._sources) if sources is None else list(sources)
        for name in names:
            if name not in self._sources:
                raise InvalidInputError(f"unknown source {name!r}; this DB has {self.sources}")
        n = len(vectors)
        by_key = Exclusions.of_keys(
            exclude, n, {name: self._sources[name].rows_of for name in names}
        )
        rank = {name: i for i, name in enumerate(sorted(self._sources))}
        number = {name: i for i, name in enumerate(self._sources)}
        scores, rows, which, order_key = [], [], [], []
        for name in names:
            source = self._sources[name]
            exclusions = by_key[name] if by_key is not None else None
            if exclude_rows and name in exclude_rows:
                exclusions = exclude_rows[name].union(exclusions, n)
            dropped = self.duplicates.exclusions(name)
            if dropped is not None:
                exclusions = dropped.union(exclusions, n)
            s, r = source.index.search(
                vectors, int(k), exclude=exclusions, device=device, threads=threads
            )
            scores.append(s)
            rows.append(r)
            which.append(np.full(s.shape, number[name], np.int16))
            order_key.append(np.full(s.shape, rank[name], np.int16))
        if not names:
            empty = np.zeros((n, 0))
            return Results(empty.astype(np.int16), empty.astype(np.int64), empty.astype(np.float32))
        s, r = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
        w, o = np.concatenate(which, axis=1), np.concatenate(order_key, axis=1)
        ranked = np.lexsort((r, o, -s), axis=-1)
        take = lambda a: np.take_along_axis(a, ranked, axis=1)  # noqa: E731
        return Results(take(w), take(r), take(s))

    def hits(self, results: Results) -> list[list[Hit]]:
        """:class:`Hit` objects for the rows of ``results`` (metadata read once per source)."""
        valid = results.valid()
        names = self.sources
        meta: dict[int, dict] = {}
        position = np.full(results.rows.shape, -1, np.int64)
        for s in np.unique(results.sources[valid]).tolist():
            mask = valid & (results.sources == s)
            meta[s] = self._sources[names[s]].metadata.take(results.rows[mask])
            position[mask] = np.arange(int(mask.sum()))
        out: list[list[Hit]] = []
        for q in range(results.rows.shape[0]):
            hits = []
            for j in np.flatnonzero(valid[q]).tolist():
                s, p = int(results.sources[q, j]), int(position[q, j])
                m = meta[s]
                hits.append(
                    Hit(
                        m["key"][p],
                        names[s],
                        float(results.scores[q, j]),
                        int(m["id"][p]),
                        m["url"][p],
                        m["caption"][p],
                        int(results.rows[q, j]),
                    )
                )
            out.append(hits)
        return out

    def locate(self, key: str, sources: Sequence[str] | None = None) -> tuple[str, int] | None:
        """``(source, row)`` of an image key (DB key or Stark ``url:`` key), or None."""
        for name in self.sources if sources is None else sources:
            row = int(self._sources[name].keys.lookup([key])[0])
            if row >= 0:
                return name, row
        return None

    # ==== Image bytes ====

    def image_bytes(self, source: str, key: str) -> bytes | None:
        """The bytes of image ``key`` of ``source``, read from the input it was embedded
        from (:class:`~starkret.store.images.ImageReader`); None when the key is not in
        the source, the source does not record its inputs, or the input no longer holds
        the image. Nothing but the inputs the source's manifest records is ever read.

        >>> db.image_bytes("chartqa", "chartqa/png/chart_001.png")[:4]  # doctest: +SKIP
        b'\x89PNG'
        """
        if source not in self._sources:
            return None
        located = self.locate(key, [source])
        if located is None:
            return None
        row = located[1]
        record = part_input(self.source_manifest(source), self.part_of(source, row)[0])
        if record is None:
            return None
        # The row's own key (``key`` may be a Stark ``url:`` key); embed stores
        # ``{source}/{sample key}``.
        db_key = self.metadata(source).take([row], columns=("key",))["key"][0]
        if not isinstance(db_key, str):
            return None
        sample_key = db_key[len(source) + 1 :] if db_key.startswith(f"{source}/") else db_key
        return self._images.read(record, sample_key)

    def image_url(self, source: str, key: str) -> str | None:
        """The ``url`` recorded for image ``key`` of ``source`` (None if none or no such key)."""
        located = self.locate(key, [source]) if source in self._sources else None
        if located is None:
            return None
        # One row of the source's metadata, read on demand (never the whole column).
        url = self.metadata(source).take([located[1]], columns=("url",))["url"][0]
        return url if isinstance(url, str) else None

    def metadata(self, source: str) -> Metadata:
        """The metadata rows of ``source`` (memory-mapped; read per row on demand)."""
        return self._sources[source].metadata

    def embeddings(self, source: str) -> list[np.ndarray]:
        """The memory-mapped float16 parts of ``source``, in row order."""
        return list(self._sources[source].index.parts.arrays)

    def part_of(self, source: str, row: int) -> tuple[int, int]:
        """``(part, row within the part)`` of a global row of ``source``."""
        offsets = self._sources[source].index.parts.offsets
        part = int(np.searchsorted(offsets, row, side="right") - 1)
        return part, int(row - offsets[part])

    def source_manifest(self, source: str) -> dict:
        """The ``starkret.json`` manifest of ``source`` (as loaded when the DB was opened)."""
        return self._sources[source].index.manifest

    def vectors(self, source: str, rows: Sequence[int]) -> np.ndarray:
        """Image embeddings (float32) of ``rows`` of ``source``."""
        return self._sources[source].index.parts.rows(np.asarray(rows, dtype=np.int64))


def _index_stamp(source_dir: Path) -> tuple[int, int, int] | None:
    """What changes when ``build-index`` publishes a source's ``infos.json`` anew."""
    return _file_stamp(Path(source_dir) / "index" / "infos.json")


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is published anew (by rename) or removed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _check_k(k: object) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidInputError(f"k must be a positive int, got {k!r}")
