"""Shared helpers for the benchmarks: timing and the result row every benchmark returns."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Row:
    """One same-run comparison: our throughput against the alternative's, same data, same run."""

    benchmark: str
    case: str
    ours: float
    baseline: float
    baseline_name: str
    unit: str
    #: Medians over the repeats beside the best figures above, where a benchmark
    #: reports the spread (a median far below the best shows stalls).
    ours_median: float | None = None
    baseline_median: float | None = None
    #: Further same-run figures shown as extra columns (e.g. recall and index size of both
    #: sides of an approximate-search row); left out of the JSON when empty.
    details: dict | None = None

    @property
    def ratio(self) -> float:
        return self.ours / self.baseline if self.baseline > 0 else float("inf")

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None and v != {}}
        return {**out, "ratio": self.ratio}


def best_rate(fn: Callable[[], object], items: int, *, repeats: int = 3, warmup: int = 1) -> float:
    """Items per second of ``fn`` (which processes ``items`` items), best of ``repeats`` runs.

    The best run is the least disturbed by other work on the machine, so it is the
    fairest figure when both sides of a ratio are measured the same way.
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def rates(
    fn: Callable[[], object], items: int, *, repeats: int = 3, warmup: int = 1
) -> tuple[float, float]:
    """Items per second of ``fn`` over ``repeats`` runs: (best, median).

    The best is the fairest same-run comparison on a shared machine; the median shows
    how often a run is slowed down (stalls, page faults, other load).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return items / min(times), items / statistics.median(times)
