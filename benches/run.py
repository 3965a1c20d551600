"""Run starkret's throughput benchmarks and print one table of same-run ratios.

Every ``benches/bench_*.py`` module that exposes ``run(args) -> list[Row]`` is one
benchmark (``bench_gpu.py`` is a script of its own: ``benches/gpu.sh``) and may add its
own options through ``add_arguments(parser)``. Usage::

    python benches/run.py [--quick] [--only NAME ...] [--json results.json]

``starkret bench`` runs this file with the same arguments. The JSON holds the machine,
the date, the arguments and the rows; ``python benches/results.py results.json -o
benches/RESULTS.md`` turns it into the results page.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import Row  # noqa: E402


def discover() -> dict[str, object]:
    modules = {}
    for path in sorted(HERE.glob("bench_*.py")):
        # Imported by plain module name (benches/ is on sys.path) so that worker
        # processes a benchmark spawns can import its functions too.
        module = importlib.import_module(path.stem)
        if hasattr(module, "run"):
            modules[path.stem.removeprefix("bench_")] = module
    return modules


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    import torch

    from starkret import _core

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu_name(),
        "cores": str(os.cpu_count()),
        "simd": _core.simd_level(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def print_table(rows: list[Row]) -> None:
    headers = ("benchmark", "case", "starkret", "baseline", "alternative", "unit", "ratio")
    cells = [
        (
            r.benchmark,
            r.case,
            f"{r.ours:,.1f}",
            f"{r.baseline:,.1f}",
            r.baseline_name,
            r.unit,
            f"{r.ratio:.2f}x",
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    modules = discover()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", nargs="+", choices=sorted(modules), help="benchmarks to run")
    parser.add_argument("--json", type=Path, help="also write the rows and machine to this file")
    for module in modules.values():
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)

    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    rows: list[Row] = []
    for name, module in modules.items():
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", flush=True)
        rows.extend(module.run(args))
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "date": started.isoformat(timespec="seconds"),
                    "args": list(sys.argv[1:] if argv is None else argv),
                    "rows": [r.as_dict() for r in rows],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
