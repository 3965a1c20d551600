"""``build_index``: the index of one embedded source, chosen by size (exact, ivf, AutoFaiss).

``build_index(dir)`` writes ``dir/index/infos.json`` (and ``dir/index/knn.index`` for
AutoFaiss), and for every kind the memory-mapped metadata (``index/metadata.arrow``,
see :mod:`starkret.store.metadata`) and key index (``index/key_*.npy``, see
:mod:`starkret.store.keyindex`). On a source whose index exists and which has only
gained parts since, it adds their rows instead (:mod:`starkret.index.grow`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from starkret._io import atomic_path, atomic_write_text
from starkret.errors import (
    IndexBuildError,
    InvalidInputError,
    MissingDependencyError,
    OutputBusyError,
)
from starkret.index import grow
from starkret.index.calibrate import calibration_queries, source_text_encoder
from starkret.index.exact import (
    Parts,
    embedding_parts,
    exact_search,
)
from starkret.index.ivf import TARGET_RECALL
from starkret.index.q8 import FIRST_PASS, write_q8
from starkret.index.source import SourceIndex, _manifest, source_dirs
from starkret.store.claims import STATE_DIR, lock_file
from starkret.store.keyindex import write_key_index
from starkret.store.metadata import Metadata, write_metadata_arrow

_logger = logging.getLogger("starkret")

__all__ = [
    "AUTO_EXACT_MAX_ROWS",
    "SourceIndex",
    "auto_kind",
    "build_index",
    "embedding_parts",
    "exact_search",
    "source_dirs",
]

#: ``kind="auto"`` builds an ivf index (:mod:`starkret.index.ivf`) above this many rows and
#: searches exactly up to it.
#: Exact float16 search streams the whole source once per query batch; at ~10 GB/s per
#: machine that is ~0.3 s per batch at 2M x 768 rows, about what 30 single AutoFaiss
#: queries at Stark's 10 ms budget cost, and it has recall 1.0.
AUTO_EXACT_MAX_ROWS = 2_000_000
#: Stark's AutoFaiss settings.
DEFAULT_MAX_INDEX_MEMORY = "16GB"
DEFAULT_MAX_QUERY_TIME_MS = 10.0
RECALL_WARNING = 0.9
#: The lock file (under ``SOURCE/.starkret/``) a build or add holds: one at a time.
BUILD_LOCK = "build-index"


def _write_q8_parts(
    source_dir: Path, parts: Parts, infos: dict, previous: dict | None
) -> tuple[dict, int]:
    """The int8 copies of an exact index's parts (:mod:`starkret.index.q8`): only parts
    whose copy is missing or not current per ``previous`` are written."""
    if infos["kind"] != "exact":
        return {}, 0
    q8 = write_q8(source_dir, parts.arrays, previous)
    return {"first_pass": FIRST_PASS, "q8": q8}, q8["written"]


#: Writers of per-part index files: ``writer(source_dir, parts, infos, previous)`` gets
#: the index's new ``infos`` (its kind...) and ``previous``, the infos of the index before
#: this build or add (None: none), writes the files of the parts that have none or whose
#: file ``previous`` does not record as current (on an add: only the new parts; on an
#: up-to-date index: only missing ones), each atomically and named by part, and returns
#: ``(entries for infos.json, files written)``.
PART_WRITERS: list = [_write_q8_parts]


# ==== Building ====


def build_index(
    source_dir: str | os.PathLike,
    *,
    kind: str = "auto",
    max_index_memory_usage: str = DEFAULT_MAX_INDEX_MEMORY,
    max_index_query_time_ms: float = DEFAULT_MAX_QUERY_TIME_MS,
    auto_exact_max_rows: int = AUTO_EXACT_MAX_ROWS,
    recall_queries: int = 1000,
    seed: int = 0,
    ivf_nlist: int | None = None,
    calibrate_with: str | os.PathLike | np.ndarray | Sequence[str] | None = None,
    target_recall: float = TARGET_RECALL,
    rebuild: bool = False,
) -> dict:
    """Build the index of one embedded source; returns (and writes) its ``infos.json``.

    On a source whose index exists and which has gained parts since (``embed`` appends
    them), only the new rows are added (:mod:`starkret.index.grow`: ivf rows go to the
    trained cells, no retraining); ``infos["added"]`` says how many rows were new to the
    index (all of them on a full build, 0 when it was up to date). It rebuilds from
    scratch, saying why in a log line, when the index predates that record, when parts
    were removed or replaced, when the kind or a build option changes, or with
    ``rebuild=True`` (e.g. after a drift warning: new rows far from the trained cells).
    Only one build runs on a source at a time: a second one raises ``OutputBusyError``.

    ``kind="exact"`` writes an int8 copy of each part (``index/q8/``, about half the bytes
    of the float16 rows) that exact search scans first, re-ranking in float32 only the rows
    its proven error bound keeps (:mod:`starkret.index.q8`; the same results as the float32
    scan, bit for bit); ``"autofaiss"`` runs ``autofaiss.build_index`` with Stark's settings
    (inner product, 16GB, 10 ms; all overridable) and then measures recall@10 against exact
    search on held-out queries (perturbed rows, not rows of the index), stored in the infos
    and warned about below 0.9, and recall@5 on text-like queries
    (:mod:`starkret.index.text_like`); ``"ivf"`` builds :mod:`starkret.index.ivf`'s index
    (IVF with an HNSW coarse quantizer and SQ8/PQ codes, candidates re-ranked exactly,
    nprobe and candidates calibrated to recall@5 >= 0.95 on text-like queries within
    ``max_index_memory_usage``); ``"auto"`` picks exact up to ``auto_exact_max_rows`` rows
    and ivf above.

    ``calibrate_with`` (ivf): the user's own queries, a ``.npy`` file of vectors, a
    moments (``.jsonl``) or text file (one query per line), an array or a list of texts
    (texts are encoded with the source's model; see :mod:`starkret.index.calibrate`):
    nprobe and candidates are then chosen for recall@10 >= ``target_recall`` against
    exact search on those queries, and the recall reached and the number of queries are
    written to the infos (``recall_at_10_calibration``, ``calibration_queries``). Given
    on a source with an index, it means a rebuild (a new calibration).

    >>> build_index("db/cc12m", kind="auto")  # doctest: +SKIP
    """
    if kind not in ("auto", "exact", "autofaiss", "ivf"):
        raise InvalidInputError(f"kind must be 'auto', 'exact', 'ivf' or 'autofaiss', got {kind!r}")
    if calibrate_with is not None and kind not in ("ivf", "auto"):
        raise InvalidInputError(f"calibrate_with calibrates an ivf index; kind={kind!r} has none")
    if not 0.0 < target_recall <= 1.0:
        raise InvalidInputError(f"target_recall must be in (0, 1], got {target_recall}")
    source_dir = Path(source_dir)
    manifest = _manifest(source_dir)
    user_queries = None
    if calibrate_with is not None:  # read (and encode) first: a bad file fails before the build
        user_queries = calibration_queries(
            calibrate_with, dim=manifest["dim"], encode_texts=source_text_encoder(manifest)
        )
    (source_dir / STATE_DIR).mkdir(exist_ok=True)
    lock = lock_file(source_dir / STATE_DIR / BUILD_LOCK)
    if lock is None:
        raise OutputBusyError(
            f"another build-index is running on {source_dir}: wait for it to finish "
            "(it holds .starkret/build-index)"
        )
    with lock:
        if kind != "exact":  # autofaiss reads files in name order: pad a pre-padding folder's names
            from starkret.store.layout import pad_part_names

            pad_part_names(source_dir)
        parts = Parts.load(source_dir)
        index_dir = source_dir / "index"
        index_dir.mkdir(exist_ok=True)
        old = grow.read_infos(index_dir)
        wanted = _wanted_kind(kind, parts.count, auto_exact_max_rows, old)
        options = {
            "max_index_memory_usage": max_index_memory_usage if wanted != "exact" else None,
            "max_index_query_time_ms": max_index_query_time_ms if wanted == "autofaiss" else None,
            "nlist": ivf_nlist if wanted == "ivf" else None,
            # growing past the memory budget of SQ8 codes needs other codes: a rebuild
            "codes": _ivf_codes(parts, max_index_memory_usage) if wanted == "ivf" else None,
            "recall_target": target_recall if wanted == "ivf" else None,
        }
        plan = "asked for (rebuild=True)" if rebuild else None
        if plan is None and user_queries is not None:
            plan = "calibrate_with asks for a new calibration"
        if plan is None:
            plan = grow.plan_add(index_dir, parts, old, wanted, options)
        if isinstance(plan, grow.AddPlan):
            try:
                return _add(source_dir, parts, plan)
            except grow._RebuildNeeded as exc:
                plan = str(exc)
        if old is not None:  # say why, loudly unless asked for
            log = _logger.info if rebuild else _logger.warning
            log("%s: rebuilding the index from scratch: %s", source_dir, plan)
        infos = _build(
            source_dir,
            manifest,
            parts,
            kind,
            max_index_memory_usage=max_index_memory_usage,
            max_index_query_time_ms=max_index_query_time_ms,
            auto_exact_max_rows=auto_exact_max_rows,
            recall_queries=recall_queries,
            seed=seed,
            ivf_nlist=ivf_nlist,
            target_recall=target_recall,
            calibrate_with=calibrate_with,
            user_queries=user_queries,
            previous=old,
        )
        infos["rebuilt"] = plan if old is not None else None
        _publish(index_dir, infos)
        return infos


def _wanted_kind(kind: str, count: int, auto_exact_max_rows: int, old: dict | None) -> str:
    """The kind a build would make: ``auto`` resolved by size, and an index ``auto`` built
    as exact because ivf did not pay off stays exact while it grows."""
    if kind != "auto":
        return kind
    wanted = auto_kind(count, auto_exact_max_rows)
    if wanted == "ivf" and old is not None and "auto_ivf_rejected" in old:
        return "exact"
    return wanted


def _ivf_codes(parts: Parts, max_index_memory_usage: str) -> str:
    from starkret.index.ivf import choose_codes, parse_bytes

    return choose_codes(parts.count, parts.dim, parse_bytes(max_index_memory_usage))


def _add(source_dir: Path, parts: Parts, plan: grow.AddPlan) -> dict:
    """Add the new parts' rows to the index (:mod:`starkret.index.grow`) and publish it."""
    infos = grow.add_rows(source_dir, parts, plan)
    infos["rebuilt"] = None
    written = 0
    for writer in PART_WRITERS:  # on an up-to-date index: puts back missing files only
        entries, wrote = writer(source_dir, parts, infos, plan.infos)
        infos.update(entries)
        written += wrote
    if infos["added"] or written:
        _publish(source_dir / "index", infos)
    if infos["added"]:
        _logger.info("%s: added %d rows to its %s index", source_dir, infos["added"], infos["kind"])
        grow.warn_drift(source_dir, infos.get("drift"))
    else:
        _logger.info("%s: its %s index is up to date", source_dir, infos["kind"])
    return infos


def _publish(index_dir: Path, infos: dict) -> None:
    """Write ``infos.json`` (last: it makes the index files current), then remove the
    files it no longer lists."""
    atomic_write_text(index_dir / "infos.json", json.dumps(infos, indent=2))
    grow.remove_stale_segments(index_dir, infos)


def _build(
    source_dir: Path,
    manifest: dict,
    parts: Parts,
    kind: str,
    *,
    max_index_memory_usage: str,
    max_index_query_time_ms: float,
    auto_exact_max_rows: int,
    recall_queries: int,
    seed: int,
    ivf_nlist: int | None,
    target_recall: float,
    calibrate_with,
    user_queries: np.ndarray | None,
    previous: dict | None,
) -> dict:
    """The full build: every index file from row 0 (per-part files ``previous`` records
    as current are kept); returns the infos to publish."""
    auto = kind == "auto"
    if auto:
        kind = auto_kind(parts.count, auto_exact_max_rows)
    index_dir = source_dir / "index"
    infos = {
        "kind": kind,
        "count": parts.count,
        "dim": manifest["dim"],
        "model": manifest["model"],
        "pretrained": manifest["pretrained"],
    }
    if kind == "autofaiss":
        infos.update(
            _build_autofaiss(
                source_dir, parts, index_dir, max_index_memory_usage, max_index_query_time_ms
            )
        )
        index = SourceIndex.open_with(source_dir, manifest, parts, infos)
        trained = grow.index_similarity(index._faiss, parts, seed)
        if trained is not None:  # what an add's drift check compares with
            infos["centroid_similarity"] = trained
        recall = _recall_at_10(index, parts, recall_queries, seed)
        infos["recall_at_10"] = recall
        infos["recall_at_5_text_like"] = _recall_text_like(index, parts, recall_queries, seed)
        if recall < RECALL_WARNING:
            _logger.warning(
                "%s: AutoFaiss recall@10 is %.3f (< %.2f); consider a larger "
                "max_index_memory_usage or kind='exact'",
                source_dir,
                recall,
                RECALL_WARNING,
            )
    if kind == "ivf":
        from starkret.index.ivf import build_ivf

        infos.update(
            build_ivf(
                source_dir,
                parts,
                index_dir,
                max_index_memory_usage=max_index_memory_usage,
                nlist=ivf_nlist,
                seed=seed,
                target_recall=target_recall,
                calibrate_with=user_queries,
            )
        )
        if isinstance(calibrate_with, (str, os.PathLike)):
            infos["calibration_file"] = str(calibrate_with)
        if auto and not _ivf_pays_off(infos):
            # The calibration had to probe most cells (text-like queries far from every
            # cluster): the ivf would scan about everything, slower than the exact scan.
            _logger.warning(
                "%s: ivf needs nprobe %d of %d cells for recall@5 %.3f on text-like queries; "
                "kind='auto' keeps exact search (build kind='ivf' to use it anyway)",
                source_dir,
                infos["nprobe"],
                infos["nlist"],
                infos["recall_at_5_text_like"],
            )
            (index_dir / infos["index_file"]).unlink(missing_ok=True)
            ivf_infos = {k: infos.pop(k) for k in list(infos) if k not in _BASE_INFOS}
            infos.update(kind="exact", auto_ivf_rejected=ivf_infos)
    for writer in PART_WRITERS:
        infos.update(writer(source_dir, parts, infos, previous)[0])
    infos["metadata_rows"] = write_metadata_arrow(source_dir, parts.offsets)
    metadata = Metadata(source_dir, parts.offsets, source_dir / "index" / "metadata.arrow")
    infos["key_index_rows"] = write_key_index(source_dir, metadata)
    infos.update(grow.coverage(parts))
    infos["added"] = parts.count
    return infos


#: ``kind="auto"`` keeps an ivf index only if its calibrated nprobe probes at most this
#: share of the cells (and reaches the recall target); otherwise it is no faster than exact.
AUTO_IVF_MAX_PROBE_FRACTION = 0.25
_BASE_INFOS = ("kind", "count", "dim", "model", "pretrained")


def _ivf_pays_off(infos: dict) -> bool:
    return bool(infos.get("recall_target_met")) and (
        infos["nprobe"] <= AUTO_IVF_MAX_PROBE_FRACTION * infos["nlist"]
    )


def auto_kind(count: int, auto_exact_max_rows: int = AUTO_EXACT_MAX_ROWS) -> str:
    """``kind="auto"``'s rule: ``"exact"`` up to ``auto_exact_max_rows`` rows, else ``"ivf"``."""
    return "exact" if count <= auto_exact_max_rows else "ivf"


def _build_autofaiss(source_dir, parts, index_dir, memory, query_ms) -> dict:
    try:
        from autofaiss import build_index as autofaiss_build
    except ImportError:
        raise MissingDependencyError(
            "kind='autofaiss' needs the autofaiss extra: pip install 'starkret[autofaiss]' "
            "(it pins numpy<2, pyarrow<18 and faiss-cpu 1.9.0.post1 for autofaiss 2.18); "
            "or use kind='exact'"
        ) from None

    files = embedding_parts(source_dir)
    order = sorted(range(len(files)), key=lambda i: str(files[i]))
    started = time.perf_counter()
    with atomic_path(index_dir / "knn.index") as tmp_index:
        _, af_infos = autofaiss_build(
            embeddings=str(source_dir / "img_emb"),
            index_path=str(tmp_index),
            index_infos_path=str(index_dir / "autofaiss_infos.json"),
            metric_type="ip",
            max_index_memory_usage=memory,
            max_index_query_time_ms=query_ms,
            current_memory_available=_available_memory(),
            verbose=logging.WARNING,
        )
        if not tmp_index.exists():
            raise IndexBuildError(
                f"autofaiss built no index for {source_dir} (memory budget {memory}, "
                f"{_available_memory()} available; its log above says why): lower "
                "max_index_memory_usage, or use kind='exact'"
            )
    return {
        "faiss_order": order,
        "max_index_memory_usage": memory,
        "max_index_query_time_ms": query_ms,
        "build_seconds": round(time.perf_counter() - started, 2),
        "autofaiss": af_infos,
    }


def _available_memory(meminfo: str = "/proc/meminfo") -> str:
    """Memory autofaiss may plan with: what the kernel says is available now, else 16G.

    ``MemAvailable`` counts the page cache the kernel would drop for a new allocation;
    ``MemFree`` (what ``SC_AVPHYS_PAGES`` reports) leaves it out, and on a machine that
    has read a few GB of embeddings it is far below what an index build can really use.
    """
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return f"{max(1, int(line.split()[1]) >> 20)}G"
    except (OSError, ValueError, IndexError):
        pass
    return "16G"


def _recall_at_10(index: SourceIndex, parts: Parts, n: int, seed: int) -> float:
    """recall@10 of the approximate index against exact search, on held-out queries."""
    rng = np.random.default_rng(seed)
    rows = parts.rows(rng.integers(0, parts.count, min(n, parts.count)))
    queries = rows + rng.normal(0, 0.5 / np.sqrt(rows.shape[1]), rows.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, truth = index.search(queries, 10, exact=True)
    _, approx = index.search(queries, 10, exact=False)
    hits = sum(len(set(t[t >= 0]) & set(a[a >= 0])) for t, a in zip(truth, approx, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def _recall_text_like(index: SourceIndex, parts: Parts, n: int, seed: int) -> float:
    """recall@5 of the approximate index against exact search on text-like queries."""
    from starkret.index.text_like import recall_at, text_like_queries

    dim = parts.arrays[0].shape[1]
    queries = text_like_queries(parts.rows, parts.count, min(n, 500), dim, seed=seed + 1)
    _, truth = index.search(queries, 5, exact=True)
    _, approx = index.search(queries, 5, exact=False)
    return round(recall_at(truth, approx, 5), 4)
