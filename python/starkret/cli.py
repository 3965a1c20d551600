"""Command-line interface: ``starkret <command>`` (and, later, ``embed-shards``)."""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

# Errors a user can fix; anything else is a bug and keeps its traceback.
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError)


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "bench_args", None) and args.bench_args[0] == "--":
        args.bench_args = args.bench_args[1:]
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as exc:
        print(f"starkret {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"starkret {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
