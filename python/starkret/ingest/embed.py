"""``starkret.embed`` (``embed-shards``): plan the parts, then run them here, on local
devices (:mod:`starkret.ingest.localworkers`) or on Ray actors
(:mod:`starkret.ingest.distributed`); the part work itself is :mod:`starkret.ingest.pipeline`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from starkret._io import is_inside
from starkret.errors import InvalidInputError, OutputBusyError, OutputExistsError
from starkret.ingest.pipeline import (
    EmbedReport,
    PartRunner,
    _check_manifest,
    _clean,
    _count_done,
    _manifest_identity,
    _paths,
    _refuse_foreign,
    _remove_unclaimed_temps,
    _write_manifest,
)
from starkret.ingest.shards import expand_shard_paths
from starkret.ingest.sources import Part, PreprocessOptions, input_format, plan_parts
from starkret.ingest.towers import DEFAULT_MODEL, MODEL_DEFAULT, ClipEmbedder
from starkret.store.claims import WorkFolder
from starkret.store.keyset import MAX_PARTS
from starkret.store.layout import pad_part_names

__all__ = ["EmbedReport", "embed"]

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
    batch_size: int | None = None,
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
    precision: str | None = None,
    compile: bool | None = None,
    devices: str | Sequence[str] | None = None,
    follow_links: bool = False,
) -> EmbedReport:
    """Embed every image of ``sources`` into ``output_dir`` (clip-retrieval's layout).

    ``sources`` are webdataset shards (paths, globs, brace ranges), image folders, or
    parquet / Arrow tables (a Hugging Face dataset saved locally). ``source_name`` tags
    every row and namespaces its key (``cc12m/000000123``): img2dataset keys restart
    at zero in every dataset. Re-running the same call resumes: finished parts are
    skipped, unfinished ones redone. A different model or preprocessing into the same
    folder is refused; ``overwrite=True`` starts over. ``workers > 1`` or
    ``ray_address`` runs parts on Ray actors (one per GPU), with the same output.
    ``precision`` and ``compile`` go to the :class:`ClipEmbedder` built here (none is
    built when ``embedder`` is given), or to each device's worker.

    In one process the parts run as one stream: the next part is read and decoded
    while the current one is embedded, and finished parts are written on a writer
    thread. On CUDA, crops cross to the GPU as uint8 when the tower normalises them
    there (``embedder.accepts_uint8``): four times fewer bytes, same embeddings.
    ``devices`` (``"all"``, ``"0,1"``, ``["cpu", "cpu"]``) runs one child process per
    device on this machine (:mod:`starkret.ingest.localworkers`), with the same output.

    Nothing the user owns is destroyed: ``output_dir`` must not lie inside an input nor
    hold one; a folder without a starkret manifest whose ``img_emb/``, ``metadata/`` or
    ``failures/`` hold files is refused (with or without ``overwrite``); ``overwrite``
    deletes only the files the manifest names (OutputExistsError otherwise). A symlink
    that leads out of an input folder is a failure ``outside input`` unless
    ``follow_links=True`` (recorded in the manifest, so ``serve`` reads the same files).

    >>> report = embed("cc12m/{00000..01242}.tar", "db/cc12m", source_name="cc12m",
    ...                embedder=ClipEmbedder("starkret-tiny"))  # doctest: +SKIP
    """
    started = time.perf_counter()
    if not isinstance(source_name, str) or not source_name or "/" in source_name:
        raise InvalidInputError(
            f"source_name must be a non-empty name without '/', got {source_name!r}"
        )
    for name, value in (("batch_size", batch_size or 1), ("workers", workers)):
        if not isinstance(value, int) or value <= 0:
            raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    if devices is not None:  # one child process per device: starkret.ingest.localworkers
        from starkret.ingest.localworkers import resolve_devices

        devices = resolve_devices(devices, workers=workers, ray_address=ray_address)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(
            f"{out} exists and is not a folder: the output of embed is a folder"
        )
    _refuse_overlap(sources, out)
    _refuse_foreign(out, overwrite)
    parts = plan_parts(
        sources,
        chunk_size=chunk_size,
        image_column=image_column,
        caption_column=caption_column,
        key_column=key_column,
        source=source_name,
        follow_links=follow_links,
    )
    plan = [p.describe() for p in parts]
    if len(parts) > MAX_PARTS:
        raise InvalidInputError(
            f"{len(parts):,} parts: at most {MAX_PARTS:,} fit one output folder; "
            "use a larger chunk_size or split the inputs over several folders"
        )
    if embedder is None and devices:
        # only its identity is used here: the workers build their own
        embedder = ClipEmbedder(model, pretrained, device="cpu")
    elif embedder is None:
        extra: dict = {}
        if batch_size is not None:
            extra["batch_size"] = batch_size
        if precision is not None:
            extra["precision"] = precision
        if compile is not None:
            extra["compile"] = compile
        embedder = ClipEmbedder(model, pretrained, device=device, **extra)
    cfg = embedder.preprocess_config
    dtype, layout = input_format(embedder)
    options = PreprocessOptions(
        size=embedder.image_size,
        mode=mode,
        dtype=dtype,
        layout=layout,
        batch_size=batch_size or embedder.batch_size,
        threads=threads,
        mean=tuple(cfg.get("mean", PreprocessOptions.mean)),
        std=tuple(cfg.get("std", PreprocessOptions.std)),
    )
    identity = _manifest_identity(embedder, options, source_name)
    # Where each part's images live, so reports can show them later.
    identity["part_inputs"] = [p.input_record() for p in parts]
    folder = WorkFolder(out)
    with folder.locked():
        others_running = folder.join()
        try:
            if overwrite:
                if others_running:
                    raise OutputBusyError(
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
            from starkret.ingest.localworkers import run_on_devices

            report = run_on_devices(
                devices,
                parts,
                out,
                embedder,
                options,
                source_name,
                progress,
                threads=threads,
                precision=precision,
                compile=compile,
                batch_size=batch_size,
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


def _refuse_overlap(sources, out: Path) -> None:
    """InvalidInputError if the output folder is an input, lies inside one, or holds one
    (resolved paths, symlinks followed): a run would read its own files as inputs."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    for item in sources:
        text = os.fspath(item)
        found = [text] if os.path.exists(text) else expand_shard_paths(text)
        for path in found:
            if is_inside(out, path):
                where = "inside the input"
            elif is_inside(path, out):
                where = "holding the input"
            else:
                continue
            raise InvalidInputError(
                f"the output folder {out} is {where} {text} (resolved: "
                f"{os.path.realpath(out)} and {os.path.realpath(path)}): a run would read "
                "its own output; use a folder outside the inputs"
            )


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
            from starkret.ingest.distributed import run_on_ray

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
            # Parts other workers held: wait for each; redo it if its worker died.
            pending_here = [(i, p) for i, p in pending if not _paths(out, i)[1].exists()]
        else:
            pending_here = pending
        # One stream: the same claims, waits and order, without idle part boundaries.
        report.input_wait_seconds = runner.run_all(
            pending_here,
            progress=lambda n, f: _tick(bar, n, f),
            finish=lambda _index, result: finish(result),
        )
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
