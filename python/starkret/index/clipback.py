"""clip-retrieval's ``clip back`` on a starkret source folder, and faiss indices other
tools built there.

``clip back`` loads an *indice folder* as: ``image.index`` (a faiss index) at its root,
and ``metadata/*.parquet`` concatenated in file-name order, row ``i`` describing faiss
id ``i``; it returns the ``url``, ``image_path`` and ``caption`` columns it finds.
A starkret source already has the metadata in that order (zero-padded part names) and
with those columns (``image_path`` = the sample key, or the file for image folders);
:func:`link_for_clip_back` adds ``image.index`` next to them (a relative symlink to the
source's faiss index), so the folder is loadable by clip back unchanged.

The other way round, :func:`adopt_index` takes an index built in the folder by
``autofaiss build_index`` (``index/knn.index`` with no starkret ``infos.json``) or by
``clip-retrieval index`` (``image.index``) and records it as the source's index, after
checking it covers exactly the source's rows in the source's dimension; otherwise it
says why not.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from starkret._io import atomic_symlink, atomic_write, atomic_write_text
from starkret.errors import InvalidInputError, MissingIndexError, OutputExistsError
from starkret.index.exact import Parts, embedding_parts
from starkret.index.source import _manifest
from starkret.store.layout import part_files

__all__ = ["adopt_index", "link_for_clip_back"]


def _count_and_dim(source_dir: Path) -> tuple[int, int]:
    manifest = _manifest(source_dir)
    return Parts.load(source_dir).count, int(manifest["dim"])


def _infos(source_dir: Path) -> dict | None:
    path = source_dir / "index" / "infos.json"
    return json.loads(path.read_text()) if path.exists() else None


def _name_order(source_dir: Path) -> list[int]:
    files = embedding_parts(source_dir)  # number order
    return sorted(range(len(files)), key=lambda i: files[i].name)


def _check_faiss(path: Path, count: int, dim: int) -> str | None:
    """Why the faiss index at ``path`` cannot serve this source, or None if it can."""
    import faiss

    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        return f"corrupt: {path} is not a faiss index ({first[:200]})"
    if index.d != dim:
        return f"{path} has dimension {index.d}, the source's embeddings {dim}"
    if index.ntotal != count:
        return f"{path} holds {index.ntotal:,} vectors, the source {count:,}"
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return f"{path} does not rank by inner product (metric {index.metric_type})"
    return None


def link_for_clip_back(source_dir: str | os.PathLike) -> Path:
    """Make ``source_dir`` loadable by ``clip back``: ``image.index`` -> the source's faiss
    index, and an ``image_path`` column in every metadata file; returns the link.

    Refused (ValueError, one line) when the source has no faiss index (``build-index
    --kind ivf`` makes one with the default install, ``--kind autofaiss`` with the
    ``starkret[autofaiss]`` extra), or when its index numbers rows in another order than
    the metadata file names (built before part names were zero-padded: rebuild it).
    """
    source_dir = Path(source_dir)
    infos = _infos(source_dir)
    if infos is None or infos.get("kind") == "exact":
        raise MissingIndexError(
            f"{source_dir} has no faiss index (clip back needs one): run "
            f"`starkret build-index {source_dir} --kind ivf` first (or `--kind autofaiss`, "
            "which needs the starkret[autofaiss] extra)"
        )
    index_file = source_dir / "index" / infos.get("index_file", "knn.index")
    if not index_file.is_file():
        raise MissingIndexError(f"{index_file} not found: rebuild the index of {source_dir}")
    order = infos.get("faiss_order")
    if order is not None and list(order) != sorted(order):
        raise InvalidInputError(
            f"{source_dir}: its index numbers rows in another order than clip back reads "
            "the metadata (it was built before part names were zero-padded); rebuild it "
            "with `starkret build-index`"
        )
    _add_image_path(source_dir)
    link = source_dir / "image.index"
    target = os.path.relpath(index_file, source_dir)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and os.readlink(link) == target:
            return link
        raise OutputExistsError(f"{link} exists and is not starkret's link to {target}")
    return atomic_symlink(target, link)


def _add_image_path(source_dir: Path) -> None:
    """Give metadata files written before the ``image_path`` column one (the sample key)."""
    import pyarrow.parquet as pq

    for path in part_files(source_dir, "metadata"):
        if "image_path" in pq.ParquetFile(path).schema_arrow.names:
            continue
        table = pq.read_table(path)
        table = table.append_column("image_path", table.column("sample_key"))
        atomic_write(path, lambda f, t=table: pq.write_table(t, f))


def adopt_index(source_dir: str | os.PathLike) -> dict:
    """Record an index autofaiss or clip-retrieval built in ``source_dir`` as its index.

    Looks for ``index/knn.index`` without a starkret ``infos.json`` (``autofaiss
    build_index --embeddings=SRC/img_emb --index_path=SRC/index/knn.index``) and for
    ``image.index`` at the root (``clip-retrieval index``). Both tools read the part files
    in name order, which is recorded. Returns the new infos; ValueError with the reason
    when no index is there or the one found does not fit the source.
    """
    source_dir = Path(source_dir)
    infos = _infos(source_dir)
    if infos is not None and infos.get("kind") != "exact":
        return infos
    count, dim = _count_and_dim(source_dir)
    candidates = [source_dir / "index" / "knn.index", source_dir / "image.index"]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise MissingIndexError(
            f"no faiss index in {source_dir} (looked for index/knn.index and image.index)"
        )
    reasons = []
    for path in found:
        reason = _check_faiss(path, count, dim)
        if reason is not None:
            reasons.append(reason)
            continue
        index_dir = source_dir / "index"
        index_dir.mkdir(exist_ok=True)
        if path.parent != index_dir:
            link = index_dir / "knn.index"
            if link.exists() or link.is_symlink():
                reasons.append(f"{link} exists too and does not fit the source")
                continue
            link.symlink_to(os.path.relpath(path, index_dir))
        manifest = json.loads((source_dir / "starkret.json").read_text())
        infos = {
            "kind": "autofaiss",
            "count": count,
            "dim": dim,
            "model": manifest.get("model"),
            "pretrained": manifest.get("pretrained"),
            "faiss_order": _name_order(source_dir),
            "adopted_from": str(path.relative_to(source_dir)),
        }
        atomic_write_text(index_dir / "infos.json", json.dumps(infos, indent=2))
        return infos
    raise InvalidInputError(f"cannot use the index found in {source_dir}: {'; '.join(reasons)}")
