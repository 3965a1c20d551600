"""Command-line interface: ``starkret <command>`` (and, later, ``embed-shards``)."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

# Errors a user can fix; anything else is a bug and keeps its traceback.
_USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    ImportError,
)


def _find_benches() -> Path:
    """The benches/ folder of a source checkout (editable installs run from one)."""
    candidates = []
    if os.environ.get("STARKRET_BENCHES"):
        candidates.append(Path(os.environ["STARKRET_BENCHES"]))
    candidates.append(Path(__file__).resolve().parents[2] / "benches")
    candidates.append(Path.cwd() / "benches")
    for path in candidates:
        if (path / "run.py").is_file():
            return path
    raise FileNotFoundError(
        "benches/run.py not found: run `starkret bench` from a starkret source checkout "
        "or set STARKRET_BENCHES to its benches/ folder"
    )


def _cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

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
    from .embed import DEFAULT_MODEL

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
        help="source name tagging every row (cc12m, redcaps12m, chartqa, ...)",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"open_clip model name (default {DEFAULT_MODEL}; starkret-tiny needs no download)",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="open_clip tag or local checkpoint file (default: the model's "
        "own default, 'openai' for OpenAI CLIP configs); 'none' = random",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--mode",
        choices=["exact", "fast"],
        default="exact",
        help="preprocessing: bit-exact with open_clip (default) or fast",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=10_000,
        help="images per output part for folders and tables",
    )
    parser.add_argument("--threads", type=int, default=None, help="decoder threads (all cores)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Ray actors (one per GPU); >1 starts a local Ray instance",
    )
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster")
    parser.add_argument("--image-column", default=None, help="tables: column with image bytes")
    parser.add_argument("--caption-column", default=None, help="tables: caption column")
    parser.add_argument("--key-column", default=None, help="tables: key column")
    parser.add_argument("--overwrite", action="store_true", help="start over, deleting output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_embed)


def _cmd_embed(args: argparse.Namespace) -> int:
    from .embed import MODEL_DEFAULT
    from .pipeline import embed

    pretrained = MODEL_DEFAULT if args.pretrained is None else args.pretrained
    if isinstance(pretrained, str) and pretrained.lower() == "none":
        pretrained = None
    report = embed(
        args.inputs,
        args.output,
        source_name=args.source,
        model=args.model,
        pretrained=pretrained,
        device=args.device,
        batch_size=args.batch_size,
        mode=args.mode,
        chunk_size=args.chunk_size,
        threads=args.threads,
        overwrite=args.overwrite,
        workers=args.workers,
        ray_address=args.ray_address,
        image_column=args.image_column,
        caption_column=args.caption_column,
        key_column=args.key_column,
        progress=not args.no_progress,
    )
    print(report.summary())
    # Design rule: a run that produced nothing exits non-zero.
    if report.total_embedded == 0 or (report.parts_done and not report.embedded):
        if report.failed:
            what = f"all {report.failed:,} samples of its {report.parts_done} parts failed"
        elif report.total_failed:
            what = f"all {report.total_failed:,} samples failed"
        else:
            what = "the inputs hold no samples"
        raise ValueError(
            f"nothing was embedded into {args.output}: {what} "
            f"(reasons in {Path(args.output) / 'failures'})"
        )
    return 0


def _cmd_build_index(args: argparse.Namespace) -> int:
    from .index import build_index, source_dirs

    for source_dir in source_dirs(args.path):
        infos = build_index(
            source_dir,
            kind=args.kind,
            max_index_memory_usage=args.max_index_memory_usage,
            max_index_query_time_ms=args.max_index_query_time_ms,
            auto_exact_max_rows=args.auto_exact_max_rows,
        )
        recall = f", recall@10 {infos['recall_at_10']:.3f}" if "recall_at_10" in infos else ""
        if "recall_at_5_text_like" in infos:
            recall += f", recall@5 on text-like queries {infos['recall_at_5_text_like']:.3f}"
        print(f"{source_dir}: {infos['kind']} index over {infos['count']:,} images{recall}")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    import json

    from .db import ImageDB

    db = ImageDB.open(args.db)
    hits = db.search(args.queries, k=args.k, sources=args.sources, device=args.device)
    if args.json:
        print(
            json.dumps(
                [
                    {"query": q, "hits": [h.__dict__ for h in per_query]}
                    for q, per_query in zip(args.queries, hits, strict=True)
                ],
                indent=2,
            )
        )
        return 0
    for query, per_query in zip(args.queries, hits, strict=True):
        print(f"{query}")
        width = max((len(h.key) for h in per_query), default=3)
        for h in per_query:
            print(f"  {h.score:+.4f}  {h.source:<12} {h.key:<{width}}  {h.url or ''}")
    return 0


def _is_starkret_report(path: Path) -> bool:
    from .report import _STYLE

    with open(path, "rb") as f:
        head = f.read(4096)
    return head.startswith(b"<!doctype html>") and _STYLE.encode() in head


def _cmd_align(args: argparse.Namespace) -> int:
    from .aligner import Aligner
    from .db import ImageDB
    from .dialogue import STATE_SUFFIX, align_file, check_writable_output

    if args.report:
        output = Path(args.output)
        written = [output, output.with_name(output.name + ".images.jsonl")]
        written.append(output.with_name(output.name + STATE_SUFFIX))
        check_writable_output(
            Path(args.report),
            [Path(args.dialogues), *written],
            _is_starkret_report,
            "a starkret report",
        )
    db = ImageDB.open(args.db)
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
        progress=not args.no_progress,
        keep=args.report is not None,
    )
    print(report.summary())
    if args.report:
        from .report import write_report

        path = write_report(db, report.alignments, args.report)
        print(f"report: {path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .db import ImageDB
    from .eval import evaluate, read_pairs

    result = evaluate(ImageDB.open(args.db), read_pairs(args.pairs), sources=args.sources)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(
            f"R@1 {result.recall_at_1:.2f}  R@5 {result.recall_at_5:.2f}  "
            f"R@10 {result.recall_at_10:.2f}  MRR {result.mrr:.2f}  ({result.count} pairs)"
        )
    return 0


def embed_shards_main(argv: Sequence[str] | None = None) -> int:
    """The ``embed-shards`` command: ``starkret embed`` under its own name."""
    parser = argparse.ArgumentParser(
        prog="embed-shards",
        description="Embed image collections with CLIP into clip-retrieval's layout, "
        "resumably (same as `starkret embed`).",
    )
    _add_embed_arguments(parser)
    args = parser.parse_args(argv)
    args.command = "embed-shards"
    return _run(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="starkret",
        description="Image retrieval core for multimodal-dialogue pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"starkret {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    doctor = sub.add_parser("doctor", help="report what this install can do")
    doctor.set_defaults(func=_cmd_doctor)

    bench = sub.add_parser(
        "bench",
        help="run the throughput benchmarks (same-run ratios)",
        description="Runs benches/run.py; arguments after `bench` are passed to it "
        "(see `starkret bench -- --help`).",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benches/run.py")
    bench.set_defaults(func=_cmd_bench)

    embed = sub.add_parser("embed", help="embed shards, folders or tables (= embed-shards)")
    _add_embed_arguments(embed)

    from .index import AUTO_EXACT_MAX_ROWS, DEFAULT_MAX_INDEX_MEMORY, DEFAULT_MAX_QUERY_TIME_MS

    build = sub.add_parser("build-index", help="index embedded sources (exact, ivf or AutoFaiss)")
    build.add_argument("path", help="an embed-shards output, or a DB folder of them")
    build.add_argument("--kind", choices=["auto", "exact", "ivf", "autofaiss"], default="auto")
    build.add_argument("--max-index-memory-usage", default=DEFAULT_MAX_INDEX_MEMORY)
    build.add_argument("--max-index-query-time-ms", type=float, default=DEFAULT_MAX_QUERY_TIME_MS)
    build.add_argument(
        "--auto-exact-max-rows",
        type=int,
        default=AUTO_EXACT_MAX_ROWS,
        help="kind=auto: exact search up to this many images, ivf above",
    )
    build.set_defaults(func=_cmd_build_index)

    search = sub.add_parser("search", help="top images of every source for descriptions")
    search.add_argument("db", help="DB folder (one sub-folder per source)")
    search.add_argument("queries", nargs="+", help="image descriptions")
    search.add_argument("-k", type=int, default=5, help="results per source")
    search.add_argument("--sources", nargs="+", default=None, help="only these sources")
    search.add_argument(
        "--device", default="cpu", help="cpu, or cuda / cuda:N for exact search on a GPU"
    )
    search.add_argument("--json", action="store_true", help="JSON output")
    search.set_defaults(func=_cmd_search)

    align = sub.add_parser("align", help="choose an image for every sharing moment of a file")
    align.add_argument("db", help="DB folder (one sub-folder per source)")
    align.add_argument("dialogues", help="Stark-style episodes (JSON/JSONL) or moment JSONL")
    align.add_argument("-o", "--output", required=True, help="aligned JSONL (appended, resumable)")
    align.add_argument("--k-per-source", type=int, default=5)
    align.add_argument("--min-score", type=float, default=0.2)
    align.add_argument("--near-duplicate-threshold", type=float, default=0.94)
    align.add_argument("--reuse", choices=["episode", "global", "none"], default="episode")
    align.add_argument(
        "--device", default="cpu", help="cpu, or cuda / cuda:N for exact search on a GPU"
    )
    align.add_argument("--report", default=None, help="also write this HTML report")
    align.add_argument("--no-progress", action="store_true")
    align.set_defaults(func=_cmd_align)

    ev = sub.add_parser("eval", help="Recall@1/5/10 and MRR of descriptions against a gallery")
    ev.add_argument("db", help="DB folder (the gallery)")
    ev.add_argument("pairs", help='JSONL: {"description"|"ultron_output", "image_key"}')
    ev.add_argument("--sources", nargs="+", default=None, help="only these sources")
    ev.add_argument("--json", action="store_true", help="JSON output")
    ev.set_defaults(func=_cmd_eval)
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
        return int(args.func(args) or 0)
    except _USER_ERRORS as exc:
        message = " ".join(str(exc).splitlines())
        print(f"starkret {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"starkret {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
