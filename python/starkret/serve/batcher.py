"""Micro-batching: concurrent queries collected into one batched search."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from starkret.index.db import ImageDB
from starkret.index.topk import Exclusions
from starkret.serve.middleware import _Stats
from starkret.serve.schema import ServeConfig

# ==== Micro-batching ====


@dataclass
class _Job:
    texts: list[str]
    text_positions: list[int]
    vectors: np.ndarray | None  # (m, dim), not yet normalised
    vector_positions: list[int]
    k: int
    sources: tuple[str, ...] | None
    done: Any  # a callable(result | exception)
    #: Image keys none of the job's queries may return.
    exclude_keys: tuple[str, ...] = ()
    #: Per source name, rows none of the job's queries may return.
    exclude_rows: Mapping[str, np.ndarray] | None = None
    #: Answer with :class:`Results` arrays instead of one list of hits per query.
    arrays: bool = False
    size: int = 0


class Batcher:
    """Background threads that search the queries of concurrent requests together.

    ``submit`` hands a request's queries to the queue; a worker takes the first job,
    waits at most ``wait_ms`` for more (up to ``max_batch`` queries), encodes all texts
    in one batch, and runs one ``ImageDB.search_arrays`` per group of jobs asking for the
    same sources, with ``k`` the largest asked for and per-query exclusions; each job
    gets the top ``k`` of every source it asked for.
    """

    def __init__(self, db: ImageDB, config: ServeConfig, stats: _Stats) -> None:
        self.db, self.config, self.stats = db, config, stats
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._last_size = 0
        self._threads = [
            threading.Thread(target=self._loop, name=f"starkret-batcher-{i}", daemon=True)
            for i in range(max(1, config.workers))
        ]
        for t in self._threads:
            t.start()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)

    def pending(self) -> int:
        """Jobs waiting for a batcher thread."""
        return self._queue.qsize()

    def submit(self, job: _Job) -> None:
        job.size = len(job.texts) + len(job.vector_positions)
        self._queue.put(job)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, size = [first], first.size
            deadline = time.perf_counter() + self.config.batch_wait_ms / 1000
            # Linger for more queries only under load (the last batch had company):
            # a lone client is answered at once.
            linger = self._last_size > 1 or not self._queue.empty()
            while size < self.config.max_batch:
                left = deadline - time.perf_counter() if linger else 0
                try:
                    job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)  # let this thread finish after the batch
                    break
                jobs.append(job)
                size += job.size
            self._last_size = size
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            # a source grown or rebuilt by build-index is picked up here (one stat each)
            self.db.refresh()
            vectors = self._encode(jobs)
        except Exception as exc:  # a broken model must not kill the batcher
            for job in jobs:
                job.done(exc)
            return
        groups: dict[tuple[str, ...] | None, list[int]] = {}
        for n, job in enumerate(jobs):
            groups.setdefault(job.sources, []).append(n)
        for sources, members in groups.items():
            try:
                group = [jobs[n] for n in members]
                results = self.db.search_arrays(
                    np.concatenate([vectors[n] for n in members]),
                    max(job.k for job in group),
                    sources=None if sources is None else list(sources),
                    exclude=_key_exclusions(group),
                    exclude_rows=_row_exclusions(group),
                    device=self.config.device,
                    threads=self.config.threads,
                )
            except Exception as exc:
                for n in members:
                    jobs[n].done(exc)
                continue
            self.stats.batch(len(results.rows))
            start = 0
            for job in group:
                mine = results.slice(start, start + job.size).first_per_source(job.k)
                start += job.size
                try:
                    answer = mine if job.arrays else self.db.hits(mine)
                except Exception as exc:  # metadata unreadable: this job fails, not the batch
                    answer = exc
                job.done(answer)

    def _encode(self, jobs: list[_Job]) -> list[np.ndarray]:
        texts = [t for job in jobs for t in job.texts]
        encoded = self.db.encode(texts) if texts else np.zeros((0, self.db.dim), np.float32)
        out, start = [], 0
        for job in jobs:
            v = np.zeros((job.size, self.db.dim), np.float32)
            if job.texts:
                v[job.text_positions] = encoded[start : start + len(job.texts)]
                start += len(job.texts)
            if job.vectors is not None and len(job.vector_positions):
                v[job.vector_positions] = self.db.encode(job.vectors)
            out.append(v)
        return out


def _key_exclusions(jobs: list[_Job]) -> list[tuple[str, ...]] | None:
    """The jobs' excluded keys, one collection per query (None if there are none)."""
    if not any(job.exclude_keys for job in jobs):
        return None
    return [job.exclude_keys for job in jobs for _ in range(job.size)]


def _row_exclusions(jobs: list[_Job]) -> dict[str, Exclusions] | None:
    """The jobs' excluded rows, per source, one array per query (None if there are none)."""
    names = {name for job in jobs for name in (job.exclude_rows or {})}
    if not names:
        return None
    none = np.zeros(0, np.int64)
    return {
        name: Exclusions(
            per_query=tuple(
                np.asarray((job.exclude_rows or {}).get(name, none), np.int64)
                for job in jobs
                for _ in range(job.size)
            )
        )
        for name in names
    }
