"""Command-line interface: ``starkret <command>``, ``python -m starkret`` and ``embed-shards``.

Every option's help shows its default, every command's ``--help`` ends with an example,
and with ``--json`` stdout holds exactly one JSON object (progress, logs and notes go to
stderr).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from starkret.defaults import DEFAULTS
from starkret.errors import (
    InvalidInputError,
    MissingDependencyError,
    NotFoundError,
    StarkretError,
    WorkersFailed,
)

# Errors a user can fix: starkret's own, and the OS refusing a path the user named (a
# file that is not there, or not theirs to read or write). Anything else is a bug and
# keeps its traceback.
_USER_ERRORS = (StarkretError, FileNotFoundError, FileExistsError, PermissionError)


#: The example each command's ``--help`` ends with (run inside ``demo-output/`` after
#: ``make demo``).
EXAMPLES = {
    "doctor": "starkret doctor",
    "bench": "starkret bench -- --quick --only topk",
    "embed": "starkret embed 'sources/cc12m/{00000..00002}.tar' -o mydb/cc12m --source cc12m "
    "--model starkret-mini",
    "embed-shards": "embed-shards 'sources/cc12m/{00000..00002}.tar' -o mydb/cc12m "
    "--source cc12m --model starkret-mini",
    "build-index": "starkret build-index db --json",
    "clip-back": "starkret build-index db --kind ivf && starkret clip-back db",
    "search": 'starkret search db "a purple pie chart with five slices" -k 2',
    "align": "starkret align db ../examples/stark_dialogues.jsonl -o aligned.jsonl "
    "--report report.html",
    "serve": "starkret serve db --port 8080",
    "eval": "starkret eval db ../examples/eval_pairs.jsonl --json",
    "dedup": "starkret dedup db --threshold 0.95 --report dedup.html",
}


def _command(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with its example."""
    return sub.add_parser(
        name,
        help=help,
        description=kwargs.pop("description", help[:1].upper() + help[1:] + "."),
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def _add_common(parser: argparse.ArgumentParser, *, json_help: str | None = None) -> None:
    """``--threads`` and ``--quiet`` (every command that computes), ``--json`` where asked."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for decoding, search and torch (default: all cores)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars and no log lines"
    )
    if json_help is not None:
        parser.add_argument(
            "--json",
            action="store_true",
            help=json_help + " (stdout holds only that object; everything else goes to stderr)",
        )


def _apply_common(args: argparse.Namespace) -> None:
    """Set the thread count everywhere it matters before any work starts; quiet logs."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads <= 0:
            raise InvalidInputError(f"--threads must be a positive number, got {threads}")
        os.environ["RAYON_NUM_THREADS"] = str(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
        try:
            import faiss
        except ImportError:
            pass
        else:
            faiss.omp_set_num_threads(threads)
    if getattr(args, "quiet", False):
        import logging

        logging.getLogger("starkret").setLevel(logging.ERROR)
        logging.getLogger("autofaiss").setLevel(logging.ERROR)


def _show(args: argparse.Namespace) -> bool:
    """Whether progress bars are shown."""
    return not getattr(args, "quiet", False) and not getattr(args, "no_progress", False)


def _find_benches() -> Path:
    """The benches/ folder of a source checkout (editable installs run from one)."""
    candidates = []
    if os.environ.get("STARKRET_BENCHES"):
        candidates.append(Path(os.environ["STARKRET_BENCHES"]))
    candidates.append(Path(__file__).resolve().parents[3] / "benches")
    candidates.append(Path.cwd() / "benches")
    for path in candidates:
        if (path / "run.py").is_file():
            return path
    raise NotFoundError(
        "benches/run.py not found: run `starkret bench` from a starkret source checkout "
        "or set STARKRET_BENCHES to its benches/ folder"
    )


def _cmd_doctor(args: argparse.Namespace) -> int:
    from starkret.cli import doctor

    return doctor.main()


def _cmd_bench(args: argparse.Namespace) -> int:
    run_py = _find_benches() / "run.py"
    saved = sys.argv
    sys.argv = [str(run_py), *args.bench_args]
    try:
        runpy.run_path(str(run_py), run_name="__main__")
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    finally:
        sys.argv = saved
    return 0


def _add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    from starkret.ingest.towers import DEFAULT_MODEL, MINI_MODEL, TINY_MODEL

    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="webdataset shards (paths, globs, {00000..01242} ranges), image "
        "folders, or parquet/Arrow tables (a saved Hugging Face dataset)",
    )
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument(
        "--source",
        required=True,
        help="source name tagging every row; the Stark sources cc12m, redcaps12m, chartqa, "
        "ai2d and mathvision are known (their table columns need no flags)",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="open_clip model name (default: %(default)s, Stark's model; open_clip downloads "
        f"its weights once). No download, works offline: {MINI_MODEL} (a small CLIP of "
        f"drawings whose weights ship with starkret) and {TINY_MODEL} (random weights, for tests). "
        "clip-retrieval's spellings work too (open_clip:NAME/TAG, ViT-L/14@336px)",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="open_clip tag or local checkpoint file (default: the model's "
        "own default, 'openai' for OpenAI CLIP configs); 'none' = random",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per batch, decoded and embedded together (default: 256 on a GPU, 64 on CPU)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)"
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp16", "bf16", "fp32"],
        default=None,
        help="the image tower's precision (default auto: fp16 on a GPU, fp32 on CPU)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the image tower (default: on a GPU only)",
    )
    parser.add_argument(
        "--mode",
        choices=["exact", "fast"],
        default="exact",
        help="preprocessing: bit-exact with open_clip or fast (default: %(default)s)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=10_000,
        help="images per output part for folders and tables (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Ray actors (one per GPU); >1 starts a local Ray instance (default: %(default)s)",
    )
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster")
    parser.add_argument(
        "--devices",
        default=None,
        help="one worker process per device of this machine, no Ray: all (every visible "
        "GPU), GPU numbers (0,1) or cpu entries (cpu,cpu); --threads is shared among them",
    )
    parser.add_argument("--image-column", default=None, help="tables: column with image bytes")
    parser.add_argument("--caption-column", default=None, help="tables: caption column")
    parser.add_argument("--key-column", default=None, help="tables: key column")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over, deleting the files the output's starkret.json names (only those)",
    )
    parser.add_argument(
        "--follow-links",
        action="store_true",
        help="follow symlinks out of the input folders (default: such a file is a failure "
        "'outside input'); serve then reads the same files",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(parser, json_help="print the run's summary as one JSON object")
    parser.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    try:
        report = _embed(args)
    except WorkersFailed as exc:  # device workers died with parts left: a rerun finishes
        if not args.quiet:
            print(exc.report.summary(), file=sys.stderr)
        print(f"starkret {args.command}: error: {exc}", file=sys.stderr)
        return 1
    _print_report(args, report)
    # Design rule: a run that produced nothing exits non-zero.
    if report.total_embedded == 0 or (report.parts_done and not report.embedded):
        if report.failed:
            what = f"all {report.failed:,} samples of its {report.parts_done} parts failed"
        elif report.total_failed:
            what = f"all {report.total_failed:,} samples failed"
        else:
            what = "the inputs hold no samples"
        raise InvalidInputError(
            f"nothing was embedded into {args.output}: {what} "
            f"(reasons in {Path(args.output) / 'failures'})"
        )
    return 0


def _embed(args: argparse.Namespace):
    from starkret.ingest.embed import embed
    from starkret.ingest.towers import MODEL_DEFAULT

    pretrained = MODEL_DEFAULT if args.pretrained is None else args.pretrained
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = None
    return embed(
        args.inputs,
        args.output,
        source_name=args.source,
        model=args.model,
        pretrained=pretrained,
        device=args.device,
        batch_size=args.batch_size,
        precision=args.precision,
        compile=args.compile,
        mode=args.mode,
        chunk_size=args.chunk_size,
        threads=args.threads,
        overwrite=args.overwrite,
        workers=args.workers,
        ray_address=args.ray_address,
        image_column=args.image_column,
        caption_column=args.caption_column,
        key_column=args.key_column,
        progress=_show(args),
        devices=args.devices,
        follow_links=args.follow_links,
    )


def _print_report(args: argparse.Namespace, report) -> None:
    if args.json:
        import dataclasses
        import json

        body = dataclasses.asdict(report)
        body["images_per_second"] = round(report.images_per_second, 2)
        print(json.dumps(body))
    elif not args.quiet:
        print(report.summary())


def _cmd_build_index(args: argparse.Namespace) -> int:
    import json

    from starkret.index.build import build_index
    from starkret.index.source import source_dirs

    dirs = source_dirs(args.path)
    bar = None
    if _show(args):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dirs), unit="source", desc="indexing", dynamic_ncols=True)
    summaries = []
    try:
        for source_dir in dirs:
            if bar is not None:
                bar.set_postfix_str(source_dir.name)
            infos = build_index(
                source_dir,
                kind=args.kind,
                max_index_memory_usage=args.max_index_memory_usage,
                max_index_query_time_ms=args.max_index_query_time_ms,
                auto_exact_max_rows=args.auto_exact_max_rows,
                calibrate_with=args.calibrate_with,
                target_recall=args.target_recall,
                rebuild=args.rebuild,
            )
            summary = {"source_dir": str(source_dir), "kind": infos["kind"]}
            summary["count"] = infos["count"]
            summary["added"] = infos["added"]
            summary["rebuilt"] = infos.get("rebuilt")
            for key in (
                "recall_at_10",
                "recall_at_5_text_like",
                "recall_at_10_calibration",
                "calibration_queries",
                "nprobe",
                "build_seconds",
                "first_pass",
                "drift",
            ):
                if key in infos:
                    summary[key] = infos[key]
            summaries.append(summary)
            if bar is not None:
                bar.update(1)
            if not args.json and not args.quiet:
                recall = (
                    f", recall@10 {infos['recall_at_10']:.3f}" if "recall_at_10" in infos else ""
                )
                if "recall_at_5_text_like" in infos:
                    recall += (
                        f", recall@5 on text-like queries {infos['recall_at_5_text_like']:.3f}"
                    )
                if "recall_at_10_calibration" in infos:
                    recall += (
                        f", recall@10 on your {infos['calibration_queries']:,} queries "
                        f"{infos['recall_at_10_calibration']:.3f} (nprobe {infos['nprobe']})"
                    )
                line = f"{source_dir}: {infos['kind']} index over {infos['count']:,} images{recall}"
                if "q8" in infos:
                    mb = infos["q8"]["bytes_per_million_rows"] / 1e6
                    line += f", int8 first pass ({mb:,.0f} MB per million images)"
                line = _grown_line(source_dir, infos) or line
                (bar.write if bar is not None else print)(line)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps({"sources": summaries}))
    return 0


def _grown_line(source_dir, infos: dict) -> str | None:
    """build-index's line for a source it added to (or found up to date); None after a
    full build."""
    kind, count, added = infos["kind"], infos["count"], infos["added"]
    if infos.get("rebuilt") is not None or added >= count:
        return None
    if not added:
        return f"{source_dir}: {kind} index over {count:,} images, up to date"
    line = f"{source_dir}: added {added:,} images to its {kind} index, now {count:,}"
    if infos.get("drift", {}).get("drifted"):
        line += " (the new images drift from its cells: consider --rebuild)"
    return line


def _cmd_clip_back(args: argparse.Namespace) -> int:
    from starkret.index.clipback import adopt_index, link_for_clip_back
    from starkret.index.source import source_dirs

    for source_dir in source_dirs(args.path):
        if args.adopt:
            infos = adopt_index(source_dir)
            if "adopted_from" in infos:
                print(f"{source_dir}: uses {infos['adopted_from']} ({infos['count']:,} images)")
        link = link_for_clip_back(source_dir)
        print(f"{source_dir}: clip back can load it ({link.name} -> {os.readlink(link)})")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import json

    from starkret.index.db import ImageDB

    db = ImageDB.open(args.db, duplicates=_duplicates(args))
    hits = db.search(
        args.queries, k=args.k, sources=args.sources, device=args.device, threads=args.threads
    )
    if args.json:
        results = [
            {"query": q, "hits": [h.__dict__ for h in per_query]}
            for q, per_query in zip(args.queries, hits, strict=True)
        ]
        print(json.dumps({"results": results}))
        return 0
    for query, per_query in zip(args.queries, hits, strict=True):
        print(f"{query}")
        width = max((len(h.key) for h in per_query), default=3)
        for h in per_query:
            print(f"  {h.score:+.4f}  {h.source:<12} {h.key:<{width}}  {h.url or ''}")
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    from starkret.align.dialogue import align_outputs

    # Every path the run writes is checked and locked before any work; a run that fails
    # before its first result leaves nothing behind (starkret.store.outputs).
    guard = align_outputs(
        args.dialogues,
        args.output,
        db_folder=args.db,
        report=args.report,
        parquet=args.parquet,
        export_images=args.export_images,
    )
    with guard.acquire(wait=args.wait):
        return _align_locked(args, guard)


def _align_locked(args: argparse.Namespace, guard) -> int:
    import json

    from starkret.align.aligner import Aligner
    from starkret.align.dialogue import align_file, records_path
    from starkret.index.db import ImageDB

    db = ImageDB.open(args.db, duplicates=_duplicates(args))
    aligner = Aligner(
        db,
        k_per_source=args.k_per_source,
        min_score=args.min_score,
        near_duplicate_threshold=args.near_duplicate_threshold,
        reuse=args.reuse,
        device=args.device,
    )
    report = align_file(
        db,
        args.dialogues,
        args.output,
        aligner=aligner,
        progress=_show(args),
        keep=args.report is not None,
        keys=args.keys,
        fill=tuple("" if m == "none" else m for m in args.fill_modules.split(",")),
        outputs=guard,
    )
    # Every file written is named in the JSON object (--json) or on stdout.
    paths = {"output": str(args.output), "images": str(args.output) + ".images.jsonl"}
    if args.parquet:
        from starkret.align.stark import write_parquet

        paths["parquet"] = str(write_parquet(args.output, args.parquet))
    exported = None
    if args.export_images:
        from starkret.align.stark import export_images

        with open(records_path(args.output), encoding="utf-8") as f:
            written, problems = export_images(
                db,
                (json.loads(line) for line in f if line.strip()),
                args.export_images,
                before_write=guard.record,
            )
        for problem in problems[:5]:
            print(f"starkret align: not exported: {problem}", file=sys.stderr)
        paths["export_images"] = str(args.export_images)
        exported = {"exported_images": written, "not_exported": len(problems)}
    if args.report:
        from starkret.align.report import write_report

        paths["report"] = str(write_report(db, report.alignments, args.report))
    if args.json:
        body = {
            name: getattr(report, name)
            for name in (
                "episodes",
                "skipped_episodes",
                "moments",
                "chosen",
                "below_threshold",
                "exhausted",
            )
        }
        body["seconds"] = round(report.seconds, 3)
        print(json.dumps({**body, **(exported or {}), **paths}))
        return 0
    if not args.quiet:
        print(report.summary())
    if args.report:
        print(f"report: {paths['report']}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from starkret.serve.app import read_api_key, serve
        from starkret.serve.schema import ServeConfig
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "starkret":
            raise  # our own module is missing: a bug, not an extra to install
        raise MissingDependencyError(
            f"starkret serve needs fastapi and uvicorn ({exc}): pip install 'starkret[serve]'"
        ) from exc

    if args.workers < 1 or args.max_batch < 1 or args.batch_wait_ms < 0:
        raise InvalidInputError(
            "--workers and --max-batch must be at least 1, --batch-wait-ms >= 0"
        )
    config = ServeConfig(
        device=args.device,
        workers=args.workers,
        batch_wait_ms=args.batch_wait_ms,
        max_batch=args.max_batch,
        min_score=args.min_score,
        near_duplicate_threshold=args.near_duplicate_threshold,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_s=args.keep_alive,
        max_connections=args.max_connections,
        max_conversation_bytes=int(args.max_conversation_mb * (1 << 20)),
        api_key=None if args.api_key_file is None else read_api_key(args.api_key_file),
        public_url=args.public_url,
        allow_image_urls=args.allow_image_urls,
        duplicates=_duplicates(args),
    )
    serve(args.db, host=args.host, port=args.port, config=config)
    return 0


def _duplicates(args: argparse.Namespace) -> str:
    """``ImageDB.open``'s ``duplicates``: ``keep`` with ``--keep-duplicates``."""
    return "keep" if getattr(args, "keep_duplicates", False) else DEFAULTS.duplicates


def _add_keep_duplicates(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="also return images `starkret dedup` recorded as near duplicates "
        f"(default: {DEFAULTS.duplicates} them)",
    )


def _cmd_dedup(args: argparse.Namespace) -> int:
    import json

    from starkret.index.dedup import dedup, describe

    sources = None if args.sources is None else [s for s in args.sources.split(",") if s]
    guard = None
    if args.report:
        from starkret.index.dedup_report import report_outputs

        guard = report_outputs(args.db, args.report).acquire()
    try:
        summary = dedup(
            args.db,
            args.threshold,
            sources=sources,
            margin=args.margin,
            max_clusters=args.max_clusters,
            full=args.full,
            threads=args.threads,
        )
        if args.report or not args.json:
            from starkret.index.db import ImageDB
            from starkret.index.dedup_report import largest_groups, text_report, write_dedup_report

            db = ImageDB.open(args.db, duplicates="keep")
            if args.report:
                summary["report"] = str(write_dedup_report(db, args.report))
                guard.keep()
            text = text_report(largest_groups(db, 5, 8)) if not args.json else ""
    finally:
        if guard is not None:
            guard.release()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(describe(summary))
    if text:
        print("largest groups (keep/drop, cosine to the kept image, source, key):")
        print(text)
    if args.report:
        print(f"report: {summary['report']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from starkret.align.eval import evaluate, read_pairs
    from starkret.index.db import ImageDB

    result = evaluate(
        ImageDB.open(args.db, duplicates=_duplicates(args)),
        read_pairs(args.pairs),
        sources=args.sources,
        progress=_show(args),
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(
            f"R@1 {result.recall_at_1:.2f}  R@5 {result.recall_at_5:.2f}  "
            f"R@10 {result.recall_at_10:.2f}  MRR {result.mrr:.2f}  ({result.count} pairs)"
        )
    return 0


def embed_shards_parser() -> argparse.ArgumentParser:
    """The parser of the ``embed-shards`` command (``starkret embed`` under its own name)."""
    parser = argparse.ArgumentParser(
        prog="embed-shards",
        description="Embed image collections with CLIP into clip-retrieval's layout, "
        "resumably. The same command as `starkret embed` and `starkret embed-shards`.",
        epilog=f"example:\n  {EXAMPLES['embed-shards']}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_embed_arguments(parser)
    return parser


def embed_shards_main(argv: Sequence[str] | None = None) -> int:
    """The ``embed-shards`` command: ``starkret embed`` under its own name."""
    args = embed_shards_parser().parse_args(argv)
    args.command = "embed-shards"
    return _run(args)


def build_parser() -> argparse.ArgumentParser:
    from starkret._version import __version__

    parser = argparse.ArgumentParser(
        prog="starkret",
        description="Image retrieval core for multimodal-dialogue pipelines (also `python -m "
        "starkret`).\n`starkret COMMAND --help` lists a command's options and an example.",
        epilog=f"example:\n  {EXAMPLES['doctor']}\n  {EXAMPLES['embed']}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"starkret {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    doctor = _command(sub, "doctor", "report what this install can do")
    doctor.set_defaults(func=_cmd_doctor)

    bench = _command(
        sub,
        "bench",
        "run the throughput benchmarks (same-run ratios)",
        description="Runs benches/run.py; arguments after `bench` are passed to it "
        "(see `starkret bench -- --help`).",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benches/run.py")
    bench.set_defaults(func=_cmd_bench)

    embed = _command(
        sub,
        "embed",
        "embed shards, folders or tables (= `starkret embed-shards` = `embed-shards`)",
        aliases=["embed-shards"],
    )
    _add_embed_arguments(embed)

    from starkret.index.build import (
        AUTO_EXACT_MAX_ROWS,
        DEFAULT_MAX_INDEX_MEMORY,
        DEFAULT_MAX_QUERY_TIME_MS,
    )
    from starkret.index.dedup import DEFAULT_MARGIN as DEDUP_MARGIN
    from starkret.index.dedup import DEFAULT_MAX_CLUSTERS as DEDUP_MAX_CLUSTERS
    from starkret.index.dedup import DEFAULT_THRESHOLD as DEDUP_THRESHOLD
    from starkret.index.ivf import TARGET_RECALL

    build = _command(
        sub,
        "build-index",
        "index embedded sources (exact, ivf or AutoFaiss)",
        description="Index embedded sources (exact, ivf or AutoFaiss). A source whose "
        "index exists and which has gained parts since (`embed` appends them) gets only "
        "the new images added: no retraining, a fraction of a full build. It is built "
        "from scratch when its index predates that record, parts were removed or "
        "replaced, the kind or an index option changes, or with --rebuild.",
    )
    build.add_argument("path", help="an embed-shards output, or a DB folder of them")
    build.add_argument(
        "--kind",
        choices=["auto", "exact", "ivf", "autofaiss"],
        default="auto",
        help="exact search, a faiss ivf index re-ranked exactly, or AutoFaiss (the "
        "starkret[autofaiss] extra); auto: exact up to --auto-exact-max-rows, ivf above "
        "(default: %(default)s)",
    )
    build.add_argument(
        "--max-index-memory-usage",
        default=DEFAULT_MAX_INDEX_MEMORY,
        help="ivf and autofaiss: memory budget of the index (default: %(default)s)",
    )
    build.add_argument(
        "--max-index-query-time-ms",
        type=float,
        default=DEFAULT_MAX_QUERY_TIME_MS,
        help="autofaiss: target query time (default: %(default)s)",
    )
    build.add_argument(
        "--auto-exact-max-rows",
        type=int,
        default=AUTO_EXACT_MAX_ROWS,
        help="kind=auto: exact search up to this many images, ivf above (default: %(default)s)",
    )
    build.add_argument(
        "--calibrate-with",
        metavar="QUERIES",
        help="ivf: choose the probe count on your own queries instead of generated "
        "text-like ones: a .npy file of query vectors (n x dim), a moments .jsonl "
        '(one {"description": ...} or {"vector": [...]} per line) or a text file (one '
        "query per line, encoded with the source's model); recall@10 against exact "
        "search on them is written to index/infos.json",
    )
    build.add_argument(
        "--target-recall",
        type=float,
        default=TARGET_RECALL,
        help="ivf: the recall the probe count is chosen for (recall@10 on --calibrate-with "
        "queries, else recall@5 on text-like ones) (default: %(default)s)",
    )
    build.add_argument(
        "--rebuild",
        action="store_true",
        help="build from scratch even where an index exists (by default a source that "
        "gained parts since its index was built gets only the new rows added, the ivf "
        "cells kept as trained; rebuild when build-index warns that new images drift)",
    )
    _add_common(build, json_help="print one JSON object: kind, count, added, recall per source")
    build.set_defaults(func=_cmd_build_index)

    clip_back = _command(
        sub,
        "clip-back",
        "make indexed sources loadable by clip-retrieval's clip back (image.index)",
        description="Make sources with a faiss index (`build-index --kind ivf`, or "
        "`--kind autofaiss`) loadable by clip-retrieval's clip back: image.index at each "
        "source's root.",
    )
    clip_back.add_argument("path", help="an indexed source folder, or a DB folder of them")
    clip_back.add_argument(
        "--adopt",
        action="store_true",
        help="first take an index autofaiss or clip-retrieval built in the folder "
        "(index/knn.index or image.index) as the source's index, if it fits",
    )
    clip_back.set_defaults(func=_cmd_clip_back)

    search = _command(sub, "search", "top images of every source for descriptions")
    search.add_argument("db", help="DB folder (one sub-folder per source)")
    search.add_argument("queries", nargs="+", help="image descriptions")
    search.add_argument(
        "-k",
        type=int,
        default=DEFAULTS.k_per_source,
        help="results per source (default: %(default)s)",
    )
    search.add_argument(
        "--sources", nargs="+", default=None, help="only these sources (default: every source)"
    )
    search.add_argument(
        "--device",
        default=DEFAULTS.device,
        help="cpu, or cuda / cuda:N for exact search on a GPU (default: %(default)s)",
    )
    _add_keep_duplicates(search)
    _add_common(search, json_help='print {"results": [{"query", "hits"}, ...]}')
    search.set_defaults(func=_cmd_search)

    align = _command(sub, "align", "choose an image for every sharing moment of a file")
    align.add_argument("db", help="DB folder (one sub-folder per source)")
    align.add_argument("dialogues", help="Stark-style episodes (JSON/JSONL) or moment JSONL")
    align.add_argument("-o", "--output", required=True, help="aligned JSONL (appended, resumable)")
    align.add_argument(
        "--k-per-source",
        type=int,
        default=DEFAULTS.k_per_source,
        help="candidates shown per source (default: %(default)s)",
    )
    align.add_argument(
        "--min-score",
        type=float,
        default=DEFAULTS.min_score,
        help="below: no image, the moment says below_threshold (default: %(default)s)",
    )
    align.add_argument(
        "--near-duplicate-threshold",
        type=float,
        default=DEFAULTS.near_duplicate_threshold,
        help="cosine at which two images are near duplicates (default: %(default)s)",
    )
    align.add_argument(
        "--reuse",
        choices=["episode", "global", "none"],
        default=DEFAULTS.reuse,
        help="where an image may not be chosen twice (default: %(default)s)",
    )
    align.add_argument(
        "--device",
        default=DEFAULTS.device,
        help="cpu, or cuda / cuda:N for exact search on a GPU (default: %(default)s)",
    )
    align.add_argument("--report", default=None, help="also write this HTML report (default: none)")
    align.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing the same output, wait for it to finish and then "
        "resume (default: refuse at once, exit 2)",
    )
    align.add_argument("--no-progress", action="store_true", help="no progress bar")
    align.add_argument(
        "--keys",
        choices=["stark", "db"],
        default="stark",
        help="images_key: Stark's image UUIDs (url:UUID for CC12M/RedCaps12M) or the DB "
        "keys (url:URL for CC12M/RedCaps12M) (default: %(default)s)",
    )
    align.add_argument(
        "--fill-modules",
        default="retrieval,none",
        help="align only turns whose images_module_name is one of these, comma-separated "
        "('none': turns without one); p-t2i, t2i and web turns are left as they are "
        "(default: %(default)s)",
    )
    align.add_argument(
        "--parquet", default=None, help="also write the output as this parquet (default: none)"
    )
    align.add_argument(
        "--export-images",
        default=None,
        metavar="DIR",
        help="write the chosen local images (not CC12M/RedCaps12M) as stark-image-style tars "
        "(default: none)",
    )
    _add_keep_duplicates(align)
    _add_common(align, json_help="print the run's summary and the paths written as one JSON object")
    align.set_defaults(func=_cmd_align)

    srv = _command(sub, "serve", "serve a DB over HTTP: batched search, align, a page")
    srv.add_argument("db", help="DB folder (one sub-folder per source)")
    srv.add_argument(
        "--host", default=DEFAULTS.host, help="address to listen on (default: %(default)s)"
    )
    srv.add_argument("--port", type=int, default=DEFAULTS.port, help="(default: %(default)s)")
    srv.add_argument(
        "--device",
        default=DEFAULTS.device,
        help="cpu, or cuda for exact GPU search (default: %(default)s)",
    )
    srv.add_argument(
        "--workers",
        type=int,
        default=DEFAULTS.workers,
        help="batches searched in parallel (default: %(default)s)",
    )
    srv.add_argument(
        "--batch-wait-ms",
        type=float,
        default=DEFAULTS.batch_wait_ms,
        help="longest wait to fill a batch (default: %(default)s)",
    )
    srv.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULTS.max_batch,
        help="most queries searched together (1: one query per request, like clip back; "
        "default: %(default)s)",
    )
    srv.add_argument(
        "--min-score",
        type=float,
        default=DEFAULTS.min_score,
        help="align: below = fallback (default: %(default)s)",
    )
    srv.add_argument(
        "--near-duplicate-threshold",
        type=float,
        default=DEFAULTS.near_duplicate_threshold,
        help="align: cosine at which two images are near duplicates (default: %(default)s)",
    )
    limits = srv.add_argument_group("limits and access (docs/serve.md)")
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULTS.header_timeout_s,
        help="seconds to send a request line and headers (default: %(default)s)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULTS.body_timeout_s,
        help="seconds to send a request body (default: %(default)s)",
    )
    limits.add_argument(
        "--keep-alive",
        type=float,
        default=DEFAULTS.keep_alive_s,
        help="seconds an idle connection stays open after a response (default: %(default)s)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULTS.max_connections,
        help="most open connections (default: %(default)s)",
    )
    limits.add_argument(
        "--max-conversation-mb",
        type=float,
        default=DEFAULTS.max_conversation_bytes / (1 << 20),
        help="MiB all conversations' shown images may hold (default: %(default)s)",
    )
    limits.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="clients must send 'Authorization: Bearer KEY', KEY the file's first line "
        "(default: the STARKRET_API_KEY environment variable, else no key)",
    )
    limits.add_argument(
        "--public-url",
        help="base of the URLs in answers (default: http://HOST:PORT)",
    )
    limits.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="let /knn-service fetch image_url queries: the server then requests any "
        "http(s) URL a client names (off by default)",
    )
    _add_keep_duplicates(srv)
    srv.set_defaults(func=_cmd_serve)

    ev = _command(sub, "eval", "Recall@1/5/10 and MRR of descriptions against a gallery")
    ev.add_argument("db", help="DB folder (the gallery)")
    ev.add_argument("pairs", help='JSONL: {"description"|"ultron_output", "image_key"}')
    ev.add_argument(
        "--sources", nargs="+", default=None, help="only these sources (default: every source)"
    )
    _add_keep_duplicates(ev)
    _add_common(ev, json_help="JSON output")
    ev.set_defaults(func=_cmd_eval)

    dd = _command(
        sub,
        "dedup",
        "find near-duplicate images across the DB and leave all but one per group out",
        description="Find every group of images whose embeddings are at least --threshold "
        "similar (cosine), within and across sources; keep one per group (the most pixels, "
        "then the earlier source and row) and record the others in DB/duplicates.npz, "
        "which search, align, serve and eval then leave out (--keep-duplicates there keeps "
        "them). A rerun compares only the rows added since. See docs/index.md.",
    )
    dd.add_argument("db", help="DB folder (one sub-folder per source)")
    dd.add_argument(
        "--threshold",
        type=float,
        default=DEDUP_THRESHOLD,
        help="cosine at or above which two images are near duplicates (default: %(default)s)",
    )
    dd.add_argument(
        "--sources", default=None, help="comma-separated sources only (default: every source)"
    )
    dd.add_argument(
        "--margin",
        type=float,
        default=DEDUP_MARGIN,
        help="a row also joins every cluster within this of its nearest: wider finds more "
        "border pairs, slower (default: %(default)s)",
    )
    dd.add_argument(
        "--max-clusters",
        type=int,
        default=DEDUP_MAX_CLUSTERS,
        help="most clusters a row joins (default: %(default)s)",
    )
    dd.add_argument(
        "--full", action="store_true", help="ignore the earlier record: compare every row again"
    )
    dd.add_argument(
        "--report", default=None, help="also write this HTML page of the largest groups"
    )
    _add_common(dd, json_help="print the summary as one JSON object")
    dd.set_defaults(func=_cmd_dedup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "bench_args", None) and args.bench_args[0] == "--":
        args.bench_args = args.bench_args[1:]
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        _apply_common(args)
        return int(args.func(args) or 0)
    except _USER_ERRORS as exc:
        # notes say where it happened ("while embedding part 3 (shard:...)")
        message = " ".join([*str(exc).splitlines(), *getattr(exc, "__notes__", ())])
        print(f"starkret {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"starkret {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
