"""``ImageDB``: several embedded sources searched together, per source, in batches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .index import SourceIndex, source_dirs

__all__ = ["Hit", "ImageDB"]

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


class _Source:
    def __init__(self, name: str, index: SourceIndex) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.name, self.index = name, index
        files = sorted(
            (index.source_dir / "metadata").glob("metadata_*.parquet"),
            key=lambda p: int(p.stem.rsplit("_", 1)[1]),
        )
        table = pa.concat_tables(
            [pq.read_table(f, columns=["key", "id", "url", "caption"]) for f in files]
        )
        if table.num_rows != index.count:
            raise ValueError(
                f"{index.source_dir}: {table.num_rows} metadata rows for {index.count} "
                "embeddings; the folder is damaged, re-run embed-shards"
            )
        self.keys = table.column("key").to_pylist()
        self.ids = table.column("id").to_numpy()
        self.urls = table.column("url").to_pylist()
        self.captions = table.column("caption").to_pylist()
        self._row_of_key: dict[str, int] | None = None
        self._device_searchers: dict[str, object] = {}  # device -> gpu_search.DeviceSearcher

    def row_of(self, key: str) -> int | None:
        """Row of a DB key (``cc12m/0001``) or of a Stark ``url:`` key."""
        if self._row_of_key is None:
            self._row_of_key = {k: i for i, k in enumerate(self.keys)}
            for i, url in enumerate(self.urls):
                if url:
                    self._row_of_key.setdefault(f"url:{url}", i)
        return self._row_of_key.get(key)

    def hit(self, row: int, score: float) -> Hit:
        return Hit(
            self.keys[row],
            self.name,
            float(score),
            int(self.ids[row]),
            self.urls[row],
            self.captions[row],
            int(row),
        )


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

    def __init__(self, root: Path, sources: dict[str, _Source], manifest: dict, embedder=None):
        self.root, self._sources, self.manifest = root, sources, manifest
        self._embedder = embedder

    @classmethod
    def open(cls, path: str | os.PathLike, *, embedder=None) -> ImageDB:
        """Open every embedded source under ``path`` (or ``path`` itself if it is one)."""
        root = Path(path)
        dirs = source_dirs(root)
        indices = [SourceIndex.open(d) for d in dirs]
        first = indices[0].manifest
        for idx in indices[1:]:
            for field in _SAME_SPACE:
                if idx.manifest.get(field) != first.get(field):
                    raise ValueError(
                        f"{idx.source_dir} was embedded with {field}={idx.manifest.get(field)!r} "
                        f"but {indices[0].source_dir} with {first.get(field)!r}: their vectors "
                        "cannot be searched together"
                    )
        sources: dict[str, _Source] = {}
        for idx in indices:
            name = idx.manifest["source"]
            if name in sources:
                raise ValueError(
                    f"two folders hold source {name!r}: {idx.source_dir} and "
                    f"{sources[name].index.source_dir}"
                )
            sources[name] = _Source(name, idx)
        return cls(root, sources, first, embedder)

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
            from .embed import ClipEmbedder

            self._embedder = ClipEmbedder(self.manifest["model"], self.manifest["pretrained"])
        return self._embedder

    # ==== Search ====

    def encode(self, queries: Sequence[str] | np.ndarray) -> np.ndarray:
        """Queries as unit float32 vectors: texts through the text tower, vectors checked."""
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings or an (n, dim) array")
        if isinstance(queries, np.ndarray) or (len(queries) and not isinstance(queries[0], str)):
            vectors = np.asarray(queries, dtype=np.float32)
            if vectors.ndim != 2 or vectors.shape[1] != self.dim:
                raise ValueError(
                    f"query vectors must have shape (n, {self.dim}) for this DB "
                    f"({self.manifest['model']}), got {vectors.shape}"
                )
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            return vectors / np.where(norms > 0, norms, 1)
        return self.embedder.encode_texts(list(queries), dtype="float32")

    def search(
        self,
        queries: Sequence[str] | np.ndarray,
        k: int = 5,
        *,
        sources: Sequence[str] | None = None,
        exclude: Sequence[str] | Sequence[Sequence[str]] | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ) -> list[list[Hit]]:
        """Top ``k`` images of each source for every query, best first.

        ``exclude`` holds image keys never to return: one collection for all queries,
        or one per query. ``device="cuda"`` (or ``"cuda:N"``) scans exactly on the GPU
        (:mod:`starkret.gpu_search`: float32 scores, tiles sized to free GPU memory,
        parts kept resident when they fit) instead of the CPU scan or the approximate
        index; ``device="torch-cpu"`` runs that same code on the CPU.
        """
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        vectors = self.encode(queries)
        names = list(self._sources) if sources is None else list(sources)
        for name in names:
            if name not in self._sources:
                raise ValueError(f"unknown source {name!r}; this DB has {self.sources}")
        banned_keys = _per_query_keys(exclude, len(vectors))
        results: list[list[Hit]] = [[] for _ in range(len(vectors))]
        for name in names:
            source = self._sources[name]
            banned = None
            if banned_keys is not None:
                banned = [
                    {r for r in (source.row_of(key) for key in keys) if r is not None}
                    for keys in banned_keys
                ]
            scores, rows = self._search_source(source, vectors, k, banned, device, threads)
            for q in range(len(vectors)):
                results[q].extend(
                    source.hit(int(r), s) for s, r in zip(scores[q], rows[q], strict=True) if r >= 0
                )
        for hits in results:
            hits.sort(key=lambda h: (-h.score, h.source, h.row))
        return results

    def _search_source(self, source: _Source, vectors, k, banned, device, threads):
        if device != "cpu":
            from .gpu_search import DeviceSearcher

            searcher = source._device_searchers.get(device)
            if searcher is None:
                dev = "cpu" if device == "torch-cpu" else device
                searcher = DeviceSearcher(source.index.parts.arrays, device=dev)
                source._device_searchers[device] = searcher
            return searcher.search(vectors, k, exclude=banned)
        return source.index.search(vectors, k, exclude=banned, threads=threads)

    def locate(self, key: str, sources: Sequence[str] | None = None) -> tuple[str, int] | None:
        """``(source, row)`` of an image key (DB key or Stark ``url:`` key), or None."""
        for name in self.sources if sources is None else sources:
            row = self._sources[name].row_of(key)
            if row is not None:
                return name, row
        return None

    def embeddings(self, source: str) -> list[np.ndarray]:
        """The memory-mapped float16 parts of ``source``, in row order."""
        return list(self._sources[source].index.parts.arrays)

    def part_of(self, source: str, row: int) -> tuple[int, int]:
        """``(part, row within the part)`` of a global row of ``source``."""
        offsets = self._sources[source].index.parts.offsets
        part = int(np.searchsorted(offsets, row, side="right") - 1)
        return part, int(row - offsets[part])

    def source_dir(self, source: str) -> Path:
        return self._sources[source].index.source_dir

    def source_manifest(self, source: str) -> dict:
        """The ``starkret.json`` manifest of ``source`` (as loaded when the DB was opened)."""
        return self._sources[source].index.manifest

    def vectors(self, source: str, rows: Sequence[int]) -> np.ndarray:
        """Image embeddings (float32) of ``rows`` of ``source``."""
        return self._sources[source].index.parts.rows(np.asarray(rows, dtype=np.int64))


def _per_query_keys(exclude, n_queries: int) -> list[set[str]] | None:
    """``exclude`` (None, keys for all queries, or one collection per query) per query."""
    if exclude is None:
        return None
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of keys, not a single key")
    items = list(exclude)
    if items and not isinstance(items[0], str):
        if len(items) != n_queries:
            raise ValueError(f"exclude has {len(items)} collections for {n_queries} queries")
        return [set(e) for e in items]
    return [set(items)] * n_queries
