"""``embed-shards``: image collections to CLIP embeddings, resumable, in clip-retrieval's layout.

Output (readable by autofaiss and clip-retrieval unchanged)::

    OUT/img_emb/img_emb_{i:05d}.npy          float16, L2-normalised rows
    OUT/metadata/metadata_{i:05d}.parquet    one row per embedding, same order
    OUT/failures/failures_{i:05d}.parquet    every sample of part i that could not be embedded
    OUT/starkret.json                    model, preprocessing, counts, parts (the manifest)

Part ``i`` is one input shard or one fixed-size chunk of a folder or table. Each file
is written under a temporary name and renamed; the metadata file is renamed last and
marks the part done, so a killed run (even ``kill -9``) redoes only unfinished parts
and never duplicates or drops a sample.

Several runs with the same arguments can share one output folder (one per GPU of a
machine): each part is claimed by one worker (:mod:`starkret.claims`), a run that
finds all remaining parts claimed waits for them, and a run with other settings is
refused while another is live. A sample key met a second time (in another part, or
twice in one part) is not embedded again: the later one is recorded in the failures
as ``duplicate key: K (first in part N)``, where "later" means committed later (part
order in a single run; :mod:`starkret.keyset`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .claims import WorkFolder
from .keyset import MAX_PARTS, KeySet
from .layout import pad_part_names, part_file
from .sources import Part, PreprocessOptions, plan_parts
from .towers import DEFAULT_MODEL, MODEL_DEFAULT, ClipEmbedder

__all__ = ["EmbedReport", "embed"]

MANIFEST = "starkret.json"
#: Row ids are ``part << ID_PART_SHIFT | row``: stable across resumes and re-runs.
ID_PART_SHIFT = 32


@dataclass
class EmbedReport:
    """What a call of :func:`embed` did."""

    output_dir: str
    embedded: int = 0
    failed: int = 0
    parts_done: int = 0
    parts_skipped: int = 0
    #: Parts another worker on the same folder finished while this run was going.
    parts_elsewhere: int = 0
    seconds: float = 0.0
    embed_seconds: float = 0.0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    #: Embedded and failed samples in the whole output folder after the run.
    total_embedded: int = 0
    total_failed: int = 0

    @property
    def images_per_second(self) -> float:
        """Throughput of the embedding loop (model loading and planning excluded)."""
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.failure_reasons.items()))
        return (
            f"embedded {self.embedded:,} images, failed {self.failed:,}"
            f"{f' ({reasons})' if reasons else ''}, parts written {self.parts_done}, "
            f"skipped as done {self.parts_skipped}"
            f"{f', done by other workers {self.parts_elsewhere}' if self.parts_elsewhere else ''}"
            f", {self.images_per_second:,.1f} images/s, "
            f"wall {self.seconds:,.1f} s -> {self.output_dir}"
        )


# ==== Layout and manifest ====


def _paths(out: Path, i: int) -> tuple[Path, Path, Path]:
    """Part ``i``'s files, zero-padded names (:mod:`starkret.layout`)."""
    return (
        part_file(out, "img_emb", i),
        part_file(out, "metadata", i),
        part_file(out, "failures", i),
    )


#: A temporary file of part N: ``.img_emb_N.npy.tmp-PID`` and the like.
_PART_TEMP = re.compile(r"^\.(?:img_emb|metadata|failures)_(\d+)\.(?:npy|parquet)\.tmp-\d+$")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _manifest_identity(embedder: ClipEmbedder, options: PreprocessOptions, source: str) -> dict:
    from . import __version__

    return {
        "model": embedder.model_name,
        "pretrained": embedder.pretrained,
        "dim": embedder.dim,
        "image_size": options.size,
        "preprocess_mode": options.mode,
        "mean": list(options.mean),
        "std": list(options.std),
        "source": source,
        "starkret_version": __version__,
    }


_MUST_MATCH = (
    "model",
    "pretrained",
    "dim",
    "image_size",
    "preprocess_mode",
    "mean",
    "std",
    "source",
)


def _check_manifest(out: Path, identity: dict, plan: list[str], others_running: bool) -> dict:
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); use --overwrite to start over") from exc
    running = f"another embed is running on {out} with different arguments"
    for key in _MUST_MATCH:
        if old.get(key) != identity[key]:
            if others_running:
                raise ValueError(
                    f"{running} ({key}={old.get(key)!r}, this run has {identity[key]!r}); "
                    "wait for it to finish or use another output folder"
                )
            raise ValueError(
                f"{out} was embedded with {key}={old.get(key)!r}, this run has "
                f"{identity[key]!r}: embeddings would not be comparable. Use another output "
                "folder, or --overwrite to start over"
            )
    old_plan = old.get("parts", [])
    if others_running and plan != old_plan:
        raise ValueError(
            f"{running} (other inputs); give it the same inputs to help it, "
            "or wait for it to finish"
        )
    if plan[: len(old_plan)] != old_plan:
        raise ValueError(
            f"the inputs differ from the first run into {out} (part lists disagree); "
            "use the same inputs (new ones may only be added after the old ones), "
            "another output folder, or --overwrite"
        )
    return old


def _write_manifest(out: Path, identity: dict, plan: list[str], totals: dict) -> None:
    body = {**identity, "parts": plan, **totals}
    _atomic(out / MANIFEST, lambda f: f.write(json.dumps(body, indent=2).encode()))


def _clean(out: Path) -> None:
    import shutil

    for sub in ("img_emb", "metadata", "failures"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / MANIFEST).unlink(missing_ok=True)


def _count_done(out: Path) -> tuple[int, int]:
    """Embedded and failed sample counts over all finished parts."""
    import pyarrow.parquet as pq

    embedded = sum(
        pq.ParquetFile(p).metadata.num_rows for p in (out / "metadata").glob("*.parquet")
    )
    failed = sum(pq.ParquetFile(p).metadata.num_rows for p in (out / "failures").glob("*.parquet"))
    return embedded, failed


# ==== One part ====


class PartRunner:
    """Embeds parts into one output folder, claiming each part first (see the module doc).

    One per worker process: the driver's, or each Ray actor's.
    """

    def __init__(
        self, out: Path, embedder: ClipEmbedder, options: PreprocessOptions, source: str
    ) -> None:
        self.out, self.embedder, self.options, self.source = Path(out), embedder, options, source
        self.folder = WorkFolder(self.out)
        self.keys = KeySet(self.out / "metadata")

    def run(self, index: int, part: Part, *, wait: bool = False, progress=None):
        """Embed part ``index`` and return (embedded, failures); None if another worker
        holds it (``wait``: wait for that worker instead) or it is already done."""
        claim = self.folder.claim(index, wait=wait)
        if claim is None:
            return None
        with claim:
            if _paths(self.out, index)[1].exists():
                return None
            _remove_temps(self.out, index)
            return embed_part(
                part,
                index,
                self.out,
                self.embedder,
                self.options,
                self.source,
                progress=progress,
                commit=self._commit,
            )

    def _commit(self, index: int, keys: list[str], write) -> dict[int, str]:
        """Under the folder lock: find duplicate keys, then ``write(drop)`` the part."""
        with self.folder.locked():
            self.keys.refresh()
            drop = _duplicates(keys, index, self.keys)
            write(drop)
            self.keys.add(index, [k for i, k in enumerate(keys) if i not in drop])
        return drop


def _duplicates(keys: list[str], index: int, known: KeySet) -> dict[int, str]:
    """Positions of ``keys`` already in a finished part or earlier in this part -> reason."""
    drop: dict[int, str] = {}
    first_in_part: dict[str, int] = {}
    for position, key in enumerate(keys):
        if first_in_part.setdefault(key, position) != position:
            drop[position] = f"duplicate key: {key} (first in part {index})"
    for position, part in enumerate(known.first_parts(keys)):
        if part is not None:
            drop[position] = f"duplicate key: {keys[position]} (first in part {part})"
    return drop


def _remove_temps(out: Path, index: int) -> None:
    """Remove part ``index``'s temporary files (call only while holding its claim)."""
    for sub in ("img_emb", "metadata", "failures"):
        for stale in (out / sub).glob(f".{sub}_*.tmp-*"):
            match = _PART_TEMP.match(stale.name)
            if match is not None and int(match.group(1)) == index:
                stale.unlink(missing_ok=True)


def _remove_unclaimed_temps(out: Path, folder: WorkFolder) -> None:
    """Remove temporary files of parts nobody is working on (left by a killed run)."""
    parts = set()
    for stale in out.glob("*/.*.tmp-*"):
        match = _PART_TEMP.match(stale.name)
        if match is not None:
            parts.add(int(match.group(1)))
    for index in sorted(parts):
        claim = folder.claim(index)
        if claim is not None:
            with claim:
                _remove_temps(out, index)
    for stale in out.glob(f".{MANIFEST}.tmp-*"):  # manifests are written under the lock
        stale.unlink(missing_ok=True)


def embed_part(
    part: Part,
    index: int,
    out: Path,
    embedder: ClipEmbedder,
    options: PreprocessOptions,
    source: str,
    progress=None,
    commit=None,
) -> tuple[int, list]:
    """Embed one part and write its three files; returns (embedded, failures).

    ``commit(index, keys, write)`` decides which rows are duplicates and calls
    ``write(drop)`` (see :class:`PartRunner`); without it every row is written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunks: list[np.ndarray] = []
    meta: dict[str, list] = {
        k: [] for k in ("sample_key", "caption", "url", "width", "height", "shard")
    }
    failures: list[tuple[str, str | None, str]] = []
    for batch in part.batches(options):
        failures.extend(batch.failures)
        if len(batch):
            chunks.append(embedder.encode_images(batch.pixels, dtype="float16"))
        meta["sample_key"] += batch.keys
        meta["caption"] += batch.captions
        meta["url"] += batch.urls
        meta["width"] += batch.widths
        meta["height"] += batch.heights
        meta["shard"] += batch.shards
        if progress is not None:
            progress(len(batch), len(batch.failures))
    emb = np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float16)
    emb_path, meta_path, fail_path = _paths(out, index)
    kept = len(meta["sample_key"])

    def write(drop: dict[int, str]) -> None:
        nonlocal emb, kept
        if drop:
            rows = [i for i in range(len(meta["sample_key"])) if i not in drop]
            failures.extend((meta["shard"][i], meta["sample_key"][i], drop[i]) for i in drop)
            emb = emb[rows]
            for name in meta:
                meta[name] = [meta[name][i] for i in rows]
        n = kept = len(meta["sample_key"])
        table = pa.table(
            {
                "key": pa.array([f"{source}/{k}" for k in meta["sample_key"]], pa.string()),
                "sample_key": pa.array(meta["sample_key"], pa.string()),
                "source": pa.array([source] * n, pa.string()),
                "url": pa.array(meta["url"], pa.string()),
                "caption": pa.array(meta["caption"], pa.string()),
                "width": pa.array(meta["width"], pa.int32()),
                "height": pa.array(meta["height"], pa.int32()),
                "shard": pa.array(meta["shard"], pa.string()),
                "id": pa.array((np.int64(index) << ID_PART_SHIFT) + np.arange(n, dtype=np.int64)),
                # clip-retrieval's column: the file of a folder image, else the sample key
                "image_path": pa.array(
                    [_image_path(part, k) for k in meta["sample_key"]], pa.string()
                ),
            }
        )
        fails = pa.table(
            {
                "source": pa.array([source] * len(failures), pa.string()),
                "shard": pa.array([f[0] for f in failures], pa.string()),
                "key": pa.array([f[1] for f in failures], pa.string()),
                "reason": pa.array([f[2] for f in failures], pa.string()),
            }
        )
        _atomic(emb_path, lambda f: np.save(f, emb))
        _atomic(fail_path, lambda f: pq.write_table(fails, f))
        # Written last: its presence marks the part as done.
        _atomic(meta_path, lambda f: pq.write_table(table, f))

    if commit is None:
        write({})
    else:
        commit(index, list(meta["sample_key"]), write)
    return kept, failures


def _image_path(part: Part, key: str) -> str:
    if part.kind == "files" and not part.layout:
        return os.path.join(part.path, key)
    return key


# ==== Driver ====


def embed(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    source_name: str,
    embedder: ClipEmbedder | None = None,
    model: str = DEFAULT_MODEL,
    pretrained=MODEL_DEFAULT,
    device: str = "auto",
    batch_size: int = 256,
    mode: str = "exact",
    chunk_size: int = 10_000,
    threads: int | None = None,
    overwrite: bool = False,
    workers: int = 1,
    ray_address: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    key_column: str | None = None,
    progress: bool = True,
    devices: str | Sequence[str] | None = None,
) -> EmbedReport:
    """Embed every image of ``sources`` into ``output_dir`` (clip-retrieval's layout).

    ``sources`` are webdataset shards (paths, globs, brace ranges), image folders, or
    parquet / Arrow tables (a Hugging Face dataset saved locally). ``source_name`` tags
    every row and namespaces its key (``cc12m/000000123``): img2dataset keys restart
    at zero in every dataset. Re-running the same call resumes: finished parts are
    skipped, unfinished ones redone. A different model or preprocessing into the same
    folder is refused; ``overwrite=True`` starts over. ``workers > 1`` or
    ``ray_address`` runs parts on Ray actors (one per GPU), with the same output.
    ``devices`` (``"all"``, ``"0,1"``, ``["cpu", "cpu"]``) runs one child process per
    device on this machine (:mod:`starkret.localworkers`), with the same output.

    >>> report = embed("cc12m/{00000..01242}.tar", "db/cc12m", source_name="cc12m",
    ...                embedder=ClipEmbedder("starkret-tiny"))  # doctest: +SKIP
    """
    started = time.perf_counter()
    if not isinstance(source_name, str) or not source_name or "/" in source_name:
        raise ValueError(f"source_name must be a non-empty name without '/', got {source_name!r}")
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if devices is not None:  # one child process per device: starkret.localworkers
        from .localworkers import resolve_devices

        devices = resolve_devices(devices, workers=workers, ray_address=ray_address)
    out = Path(output_dir)
    parts = plan_parts(
        sources,
        chunk_size=chunk_size,
        image_column=image_column,
        caption_column=caption_column,
        key_column=key_column,
        source=source_name,
    )
    plan = [p.describe() for p in parts]
    if len(parts) > MAX_PARTS:
        raise ValueError(
            f"{len(parts):,} parts: at most {MAX_PARTS:,} fit one output folder; "
            "use a larger chunk_size or split the inputs over several folders"
        )
    if embedder is None:  # with devices, only its identity is used here: the children embed
        embedder = ClipEmbedder(model, pretrained, device="cpu" if devices else device)
    cfg = embedder.preprocess_config
    options = PreprocessOptions(
        size=embedder.image_size,
        mode=mode,
        # half the bytes to move to the GPU; the model runs in half precision there anyway
        dtype="float16" if embedder.device.type == "cuda" else "float32",
        batch_size=batch_size,
        threads=threads,
        mean=tuple(cfg.get("mean", PreprocessOptions.mean)),
        std=tuple(cfg.get("std", PreprocessOptions.std)),
    )
    identity = _manifest_identity(embedder, options, source_name)
    # Where each part's images live, so reports can show them later.
    identity["part_inputs"] = [{"kind": p.kind, "path": p.path} for p in parts]
    folder = WorkFolder(out)
    with folder.locked():
        others_running = folder.join()
        try:
            if overwrite:
                if others_running:
                    raise ValueError(
                        f"another embed is running on {out}: --overwrite would delete its "
                        "work; wait for it to finish or use another output folder"
                    )
                _clean(out)
            _check_manifest(out, identity, plan, others_running)
            if not others_running:
                # a folder from before zero-padded names: rename its finished parts
                pad_part_names(out)
            for sub in ("img_emb", "metadata", "failures"):
                (out / sub).mkdir(parents=True, exist_ok=True)
            _remove_unclaimed_temps(out, folder)
            _write_manifest(out, identity, plan, {"complete": False})
        except BaseException:
            folder.leave()
            raise
    try:
        if devices is not None:
            from .localworkers import run_on_devices

            report = run_on_devices(
                devices, parts, out, embedder, options, source_name, progress, threads=threads
            )
        else:
            report = _run_parts(
                parts, out, embedder, options, source_name, workers, ray_address, progress
            )
        with folder.locked():
            report.total_embedded, report.total_failed = _count_done(out)
            if all(_paths(out, i)[1].exists() for i in range(len(parts))):
                totals = {"count": report.total_embedded, "failed": report.total_failed}
                _write_manifest(out, identity, plan, {"complete": True, **totals})
    finally:
        folder.leave()
    report.seconds = time.perf_counter() - started
    return report


def _run_parts(
    parts: list[Part],
    out: Path,
    embedder: ClipEmbedder,
    options: PreprocessOptions,
    source: str,
    workers: int,
    ray_address: str | None,
    progress: bool,
) -> EmbedReport:
    """Embed every unfinished part; returns when all are done (here or by other workers)."""
    pending = [(i, p) for i, p in enumerate(parts) if not _paths(out, i)[1].exists()]
    report = EmbedReport(str(out), parts_skipped=len(parts) - len(pending))
    bar = _progress_bar(progress, len(pending), report.parts_skipped)
    runner = PartRunner(out, embedder, options, source)
    started = time.perf_counter()

    def finish(result) -> None:
        if result is None:
            return
        _account(report, *result)
        if bar is not None:
            bar.update(0)
            bar.set_postfix_str(f"parts {report.parts_done}/{len(pending)}")

    try:
        if workers > 1 or ray_address is not None:
            from .distributed import run_on_ray

            for result in run_on_ray(
                pending,
                out,
                embedder,
                options,
                source,
                workers,
                ray_address,
                on_part=lambda n, f: _tick(bar, n, f),
                runner_class=PartRunner,
            ):
                finish(result)
        else:
            for i, part in pending:
                finish(runner.run(i, part, progress=lambda n, f: _tick(bar, n, f)))
        # Parts other workers held: wait for each; redo it if its worker died.
        for i, part in pending:
            if not _paths(out, i)[1].exists():
                finish(runner.run(i, part, wait=True, progress=lambda n, f: _tick(bar, n, f)))
    finally:
        if bar is not None:
            bar.close()
    report.embed_seconds = time.perf_counter() - started
    report.parts_elsewhere = len(pending) - report.parts_done
    return report


def _account(report: EmbedReport, n: int, failures) -> None:
    report.embedded += n
    report.failed += len(failures)
    report.parts_done += 1
    for _shard, _key, reason in failures:
        kind = reason.split(":", 1)[0]
        report.failure_reasons[kind] = report.failure_reasons.get(kind, 0) + 1


def _progress_bar(enabled: bool, pending: int, skipped: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        unit="img",
        desc=f"embedding {pending} parts ({skipped} already done)",
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _tick(bar, images: int, failed: int) -> None:
    if bar is not None:
        bar.update(images)
        if failed:
            bar.set_postfix_str(f"{failed} failed in the last batch", refresh=False)
