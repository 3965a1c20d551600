"""Several devices of one machine without Ray: one child process per device.

``embed(..., devices=["cuda:0", "cuda:1"])`` (``embed-shards --devices all|0,1|cpu,cpu``)
keeps the planning, the manifest and the summary in the calling process (the parent)
and starts one child per device. Every child builds its own embedder and takes parts
from the output folder with the usual claim files (:mod:`starkret.store.claims`), exactly
as independent runs sharing a folder do, so resume, ``kill -9`` of anyone and a second
invocation on the same folder behave as documented in :mod:`starkret.ingest.pipeline`:

- a child first goes over every pending part and embeds those nobody holds, then
  waits for the parts others hold and redoes any whose holder died: as long as one
  child lives, all parts get done;
- children never write the manifest (the parent writes it once before they start and
  once after), and register as live runs of the folder (``claims.WorkFolder.join``)
  so a run with other arguments is refused while they work;
- a child reports progress to the parent as JSON lines on its stdout (its own prints
  go to stderr) and exits when the parent goes away (its stdin closes), so a killed
  parent leaves no orphan working;
- a child that dies is reported with its exit status and the end of its stderr; the
  others carry on. The run fails (:class:`WorkersFailed`) only if parts are left undone.

A GPU child sees only its GPU (``CUDA_VISIBLE_DEVICES``) and uses ``cuda:0``; ``cpu``
entries run CPU children (CPU-only machines, tests). Each child decodes with
``threads / len(devices)`` threads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import starkret._core as _core
from starkret.errors import InvalidInputError, WorkersFailed
from starkret.ingest.distributed import build_embedder, embedder_spec
from starkret.ingest.pipeline import EmbedReport, PartRunner, _paths
from starkret.ingest.sources import Part, PreprocessOptions
from starkret.ingest.towers import ClipEmbedder
from starkret.store.claims import STATE_DIR

__all__ = [
    "DevicesReport",
    "WorkersFailed",
    "resolve_devices",
    "run_on_devices",
]

log = logging.getLogger("starkret")

#: Test-only hook read by the children (see :class:`_Debug`): ``kill:K`` or ``pause:PATH``.
DEBUG_ENV = "STARKRET_DEBUG_WORKER"

#: Lines of a dead child's stderr quoted in the report.
STDERR_TAIL = 20


# ==== Devices ====


def resolve_devices(
    devices: str | Sequence[str | int], *, workers: int = 1, ray_address: str | None = None
) -> list[str]:
    """``"all"``, ``"0,1"``, ``"cpu,cpu"`` or a list of such entries -> ``["cuda:0", "cpu", ...]``.

    GPU numbers count the GPUs this process sees (as ``torch.cuda`` numbers them).
    """
    if workers > 1 or ray_address is not None:
        raise InvalidInputError(
            "devices runs local processes; it cannot be combined with Ray workers"
        )
    entries = devices.split(",") if isinstance(devices, str) else list(devices)
    entries = [str(e).strip().lower() for e in entries]
    if not entries or any(not e for e in entries):
        raise InvalidInputError(f"devices must list devices (all, 0,1,... or cpu), got {devices!r}")
    resolved: list[str] = []
    gpus: int | None = None
    for entry in entries:
        if entry == "cpu":
            resolved.append("cpu")
            continue
        if gpus is None:
            gpus = _gpu_count()
        if entry == "all":
            if len(entries) != 1:
                raise InvalidInputError(
                    f"'all' cannot be combined with other devices, got {devices!r}"
                )
            if gpus == 0:
                raise InvalidInputError(
                    "devices 'all': no GPU is visible (torch.cuda.device_count() is 0); "
                    "use --devices cpu,... to run CPU workers"
                )
            return [f"cuda:{i}" for i in range(gpus)]
        number = entry.removeprefix("cuda:")
        if not number.isdigit():
            raise InvalidInputError(
                f"unknown device {entry!r} in {devices!r}: use all, GPU numbers (0,1) or cpu"
            )
        if int(number) >= gpus:
            raise InvalidInputError(
                f"no GPU {int(number)}: this machine shows {gpus} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            )
        resolved.append(f"cuda:{int(number)}")
    return resolved


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _visible_device(device: str) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows a child only ``device`` ("" for cpu)."""
    if device == "cpu":
        return ""
    number = int(device.split(":", 1)[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return str(number)
    return [v.strip() for v in visible.split(",")][number]


# ==== Parent ====


@dataclasses.dataclass
class DevicesReport(EmbedReport):
    """:class:`~starkret.ingest.pipeline.EmbedReport` plus one entry per device worker:
    ``device``, ``pid``, ``parts``, ``embedded``, ``failed``, ``images_per_second``,
    ``input_wait_seconds`` (its model waiting for decoded input), ``exit_status``
    and, for a worker that failed, ``error`` (the end of its stderr)."""

    devices: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [super().summary()]
        for worker in self.devices:
            line = (
                f"  {worker['device']} (pid {worker['pid']}): parts {worker['parts']}, "
                f"{worker['embedded']:,} images, {worker['images_per_second']:,.1f} images/s"
            )
            if worker.get("error") is not None:
                line += f"; {worker['error_status']}"
            lines.append(line)
        return "\n".join(lines)


@dataclasses.dataclass
class _Child:
    number: int
    device: str
    proc: subprocess.Popen
    stderr: deque = dataclasses.field(default_factory=lambda: deque(maxlen=STDERR_TAIL))
    readers: list[threading.Thread] = dataclasses.field(default_factory=list)
    parts: int = 0
    embedded: int = 0
    failed: int = 0
    #: Seconds from its stream's start to its last part written (or to its end).
    busy: float = 0.0
    #: Seconds its model waited for decoded input (``EmbedReport.input_wait_seconds``).
    input_wait: float = 0.0
    ready_at: float | None = None

    def name(self) -> str:
        return f"{self.device} (worker {self.number}, pid {self.proc.pid})"


def run_on_devices(
    devices: list[str],
    parts: list[Part],
    out: Path,
    embedder: ClipEmbedder,
    options: PreprocessOptions,
    source: str,
    progress: bool,
    *,
    threads: int | None = None,
    precision: str | None = None,
    compile: bool | None = None,
    batch_size: int | None = None,
) -> DevicesReport:
    """Embed every unfinished part of ``parts`` with one child process per device.

    Call with the folder joined and the manifest written (``pipeline.embed`` does).
    Returns when every part is done; raises :class:`WorkersFailed` if all children
    died with parts left undone.
    """
    pending = [(i, p) for i, p in enumerate(parts) if not _paths(out, i)[1].exists()]
    report = DevicesReport(str(out), parts_skipped=len(parts) - len(pending))
    if not pending:
        return report
    # the cores this process may use, as the Rust decode pools count them
    total = threads if threads is not None else _core.available_threads()
    per_child = max(1, total // len(devices))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            unit="img",
            desc=f"embedding {len(pending)} parts ({report.parts_skipped} already done) "
            f"on {len(devices)} devices",
            dynamic_ncols=True,
            smoothing=0.1,
            postfix="starting the workers",
        )
    events: queue.Queue = queue.Queue()
    children: list[_Child] = []
    started = time.perf_counter()
    try:
        for number, device in enumerate(devices):
            job = {
                "number": number,
                "workers": len(devices),
                "out": str(out),
                "parts": pending,
                "options": dataclasses.replace(options, threads=per_child),
                "source": source,
                "spec": embedder_spec(
                    embedder, device, precision=precision, compile=compile, batch_size=batch_size
                ),
                "device": "cpu" if device == "cpu" else "cuda:0",
            }
            children.append(_start_child(number, device, job, events))
        _collect(children, events, report, bar, len(pending))
        for child in children:  # all exited, their readers done
            for pipe in (child.proc.stdin, child.proc.stdout, child.proc.stderr):
                if pipe is not None:
                    pipe.close()
    except BaseException:
        _stop(children)
        raise
    finally:
        if bar is not None:
            bar.close()
    ready = [c.ready_at for c in children if c.ready_at is not None]
    report.embed_seconds = time.perf_counter() - (min(ready) if ready else started)
    report.parts_elsewhere = len(pending) - report.parts_done
    for child in children:
        entry: dict[str, Any] = {
            "device": child.device,
            "pid": child.proc.pid,
            "parts": child.parts,
            "embedded": child.embedded,
            "failed": child.failed,
            "images_per_second": round(child.embedded / child.busy, 2) if child.busy else 0.0,
            "input_wait_seconds": round(child.input_wait, 3),
            "exit_status": child.proc.returncode,
            "error": None,
        }
        if child.proc.returncode != 0:
            entry["error_status"] = _describe_status(child.proc.returncode)
            entry["error"] = "\n".join(child.stderr)
        report.devices.append(entry)
    undone = [i for i, _ in pending if not _paths(out, i)[1].exists()]
    if undone:
        dead = [
            f"{c.name()} {_describe_status(c.proc.returncode)}: "
            + (" | ".join(list(c.stderr)[-5:]) or "no error output")
            for c in children
            if c.proc.returncode != 0
        ]
        raise WorkersFailed(
            f"{len(undone)} of {len(parts)} parts left undone (first: part {undone[0]}) because "
            f"the device workers died: {'; '.join(dead) or 'no worker failed'}. "
            "Run the same command again to finish them",
            report,
        )
    return report


def _start_child(number: int, device: str, job: dict, events: queue.Queue) -> _Child:
    threads = job["options"].threads
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": _visible_device(device),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "RAYON_NUM_THREADS": str(threads),
        "PYTHONPATH": _child_python_path(),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "starkret.ingest.localworkers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # Ctrl-C reaches the parent only; the parent stops the children.
        start_new_session=True,
    )
    child = _Child(number, device, proc)
    payload = pickle.dumps(job)
    assert proc.stdin is not None
    try:
        proc.stdin.write(len(payload).to_bytes(8, "little") + payload)
        proc.stdin.flush()  # stdin stays open: the child exits when it closes
    except BrokenPipeError:
        pass  # it died at start: reported with its status and stderr
    child.readers = [
        threading.Thread(target=_read_events, args=(child, events), daemon=True),
        threading.Thread(target=_read_stderr, args=(child,), daemon=True),
    ]
    for reader in child.readers:
        reader.start()
    return child


def _child_python_path() -> str:
    """PYTHONPATH for a child importing this very starkret, wherever the parent found it
    (a site-packages folder is found anyway, and must not go before the standard library)."""
    import site

    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parents[2]
    sites = [*site.getsitepackages(), site.getusersitepackages()]
    if here not in {Path(p).resolve() for p in sites} and str(here) not in paths:
        paths.insert(0, str(here))
    return os.pathsep.join(paths)


def _read_events(child: _Child, events: queue.Queue) -> None:
    assert child.proc.stdout is not None
    for line in child.proc.stdout:
        try:
            message = json.loads(line)
        except ValueError:
            child.stderr.append(line.decode(errors="replace").rstrip())
            continue
        events.put((child, message))
    events.put((child, None))


def _read_stderr(child: _Child) -> None:
    assert child.proc.stderr is not None
    for line in child.proc.stderr:
        child.stderr.append(line.decode(errors="replace").rstrip())


def _collect(
    children: list[_Child], events: queue.Queue, report: DevicesReport, bar, pending: int
) -> None:
    """Take the children's events until every child is gone."""
    running = len(children)
    while running:
        try:
            child, message = events.get(timeout=1.0)
        except queue.Empty:
            continue
        if message is None:  # its stdout closed: it exited (or is exiting)
            running -= 1
            child.proc.wait()
            for reader in child.readers:
                reader.join(timeout=10)
            if child.proc.returncode != 0:
                tail = " | ".join(list(child.stderr)[-5:]) or "no error output"
                others = "the other workers take its parts" if running else "no worker is left"
                _say(
                    bar,
                    f"{child.name()} {_describe_status(child.proc.returncode)} ({tail}); {others}",
                )
            continue
        kind = message.get("event")
        if kind == "ready":
            if bar is not None and all(c.ready_at is None for c in children):
                bar.reset()  # the rate counts from the first worker ready, not model loading
                bar.set_postfix_str(f"parts 0/{pending}")
            child.ready_at = time.perf_counter()
        elif kind == "batch":
            if bar is not None:
                bar.update(message["images"])
        elif kind == "done":
            child.busy = max(child.busy, message["seconds"])
            child.input_wait = message["input_wait_seconds"]
            report.input_wait_seconds += child.input_wait
        elif kind == "part":
            child.parts += 1
            child.embedded += message["embedded"]
            child.failed += message["failed"]
            child.busy = max(child.busy, message["seconds"])
            report.parts_done += 1
            report.embedded += message["embedded"]
            report.failed += message["failed"]
            for reason, count in message["reasons"].items():
                report.failure_reasons[reason] = report.failure_reasons.get(reason, 0) + count
            if bar is not None:
                bar.set_postfix_str(f"parts {report.parts_done}/{pending}")


def _say(bar, text: str) -> None:
    if bar is not None:
        bar.write(f"starkret: {text}", file=sys.stderr)
    else:
        log.warning("%s", text)


def _describe_status(status: int | None) -> str:
    if status is None:
        return "is still running"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name} (exit status {status})"
    return f"exited with status {status}"


def _stop(children: list[_Child]) -> None:
    """Stop every child still running (closing its stdin, then SIGTERM, then SIGKILL)."""
    for child in children:
        if child.proc.poll() is None:
            try:
                if child.proc.stdin is not None:
                    child.proc.stdin.close()
            except OSError:
                pass
            child.proc.terminate()
    for child in children:
        try:
            child.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


# ==== Child ====


def _child_main() -> int:
    """A device worker: read the job from stdin, embed parts, report on stdout."""
    # Events go to the original stdout; anything else printed goes to stderr.
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    # Raw reads of fd 0 (no buffered reader a daemon thread would hold at exit).
    size = int.from_bytes(_read_exactly(0, 8), "little")
    job = pickle.loads(_read_exactly(0, size))
    # The parent keeps our stdin open while it lives: stop as soon as it goes away.
    threading.Thread(target=_exit_with_parent, daemon=True).start()

    def send(event: str, **fields) -> None:
        events.write(json.dumps({"event": event, **fields}) + "\n")

    import torch

    from starkret.store.claims import WorkFolder

    torch.set_num_threads(job["options"].threads)
    embedder = build_embedder(job["spec"], job["device"])
    options = job["options"].for_model(embedder)
    out = Path(job["out"])
    folder = WorkFolder(out)
    with folder.locked():
        folder.join()  # a live run of the folder, like the parent
    runner = PartRunner(out, embedder, options, job["source"])
    debug = _Debug(job["number"], job["workers"], out)
    send("ready", device=str(embedder.device))
    debug.before_parts()
    done_here = 0
    started = time.perf_counter()

    def tick(images: int, failed: int) -> None:
        send("batch", images=images, failed=failed)
        debug.after_batch(done_here == 0)

    def finish(index: int, result: tuple[int, list]) -> None:
        nonlocal done_here
        embedded, failures = result
        reasons: dict[str, int] = {}
        for _shard, _key, reason in failures:
            kind = reason.split(":", 1)[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        send(
            "part",
            index=index,
            embedded=embedded,
            failed=len(failures),
            reasons=reasons,
            # parts overlap in the stream: the worker's time so far, not this part's
            seconds=time.perf_counter() - started,
        )
        done_here += 1

    try:
        # One stream, as in a single process: the parts nobody holds, then the held
        # ones (waited for, and redone if their worker died).
        wait = runner.run_all(
            job["parts"], progress=tick, finish=finish, after_free_parts=debug.after_first_pass
        )
        send("done", input_wait_seconds=wait, seconds=time.perf_counter() - started)
    finally:
        folder.leave()
    return 0


class _Debug:
    """The test-only hook (:data:`DEBUG_ENV`) inside a worker.

    ``kill:K``: worker K, holding its first part, waits for the others to go once over
    the parts (they start only when it holds one), then ``kill -9`` s itself: a survivor
    must wait for that part and redo it. ``pause:PATH``: at its first embedded batch, a
    worker waits until PATH exists, holding the parts it claimed so far (none written).
    """

    def __init__(self, number: int, workers: int, out: Path) -> None:
        value = os.environ.get(DEBUG_ENV, "")
        victim = value.removeprefix("kill:") if value.startswith("kill:") else None
        self.victim = victim == str(number)
        self.witness = victim is not None and not self.victim
        self.alone = workers == 1
        self.pause = value.removeprefix("pause:") if value.startswith("pause:") else None
        self.paused = False
        self.number, self.state = number, out / STATE_DIR

    def before_parts(self) -> None:
        if self.witness:
            _wait_for_file(self.state / "debug-victim-holds")

    def after_first_pass(self) -> None:
        if self.witness:
            (self.state / "debug-first-pass-done").touch()

    def after_batch(self, first_part: bool) -> None:
        if self.pause is not None and not self.paused:
            self.paused = True
            _wait_for_file(Path(self.pause), timeout=None)
        if self.victim and first_part:
            (self.state / "debug-victim-holds").touch()
            if not self.alone:
                _wait_for_file(self.state / "debug-first-pass-done")
            print(
                f"debug: worker {self.number} kills itself inside its first part", file=sys.stderr
            )
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _wait_for_file(path: Path, timeout: float | None = 300) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while not path.exists() and (deadline is None or time.monotonic() < deadline):
        time.sleep(0.05)


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise SystemExit("starkret.ingest.localworkers: the parent closed the job pipe early")
        data += chunk
    return data


def _exit_with_parent() -> None:
    while os.read(0, 65536):
        pass
    os._exit(143)


if __name__ == "__main__":
    status = _child_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # skip the interpreter's (torch's) slow teardown: all is written
