"""Several devices of one machine without Ray (``--devices``, starkret.ingest.localworkers) and the
settings Ray actors build their embedder with (starkret.ingest.distributed).

CPU worker processes (``cpu,cpu``) stand in for GPUs: the claim files, the children's
progress reports, ``kill -9`` of a child or of the parent and a second invocation are
the same whatever device a child embeds on. The test-only hook ``STARKRET_DEBUG_WORKER``
makes a child kill itself inside a part, or pause after its first part.
"""

from __future__ import annotations

import _thread
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from starkret import ClipEmbedder
from starkret.cli import commands as cli
from starkret.ingest.distributed import actor_plan, build_embedder, embedder_spec
from starkret.ingest.embed import embed
from starkret.ingest.localworkers import DEBUG_ENV, WorkersFailed, _visible_device, resolve_devices
from starkret.ingest.sources import PreprocessOptions
from starkret.store.claims import WorkFolder
from starkret.testing import encode, synthetic_photo

SHARDS = 6
PER_SHARD = 3
#: This sample's JPEG is cut short: a failure row, the same wherever it is embedded.
BROKEN = "00002001"
TIMEOUT = 300


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    for s in range(SHARDS):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(PER_SHARD):
                key = f"{s:05d}{i:03d}"
                image = encode(synthetic_photo(72 + 8 * i, 56, seed=10 * s + i), "JPEG")
                if key == BROKEN:
                    image = image[: len(image) // 3]
                for ext, data in (("jpg", image), ("txt", f"caption {key}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


#: The same arguments for every run: one decode thread and one torch thread per worker
#: (children get threads // len(devices)), two images per model batch.
ARGS = dict(source_name="cc12m", model="starkret-tiny", batch_size=2, progress=False)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict:
    """The output of one ordinary process (this one: torch has one thread in the tests)."""
    out = tmp_path_factory.mktemp("single")
    embed(str(shards / "*.tar"), out, threads=1, **ARGS)
    return _snapshot(out)


def _snapshot(out: Path) -> dict:
    """Every output file: npy bytes, parquet tables, the manifest; no temporary left."""
    assert not list(out.glob("*/.*.tmp-*")), "temporary files left behind"
    return {
        "img_emb": {p.name: p.read_bytes() for p in sorted((out / "img_emb").iterdir())},
        "metadata": {p.name: pq.read_table(p) for p in sorted((out / "metadata").iterdir())},
        "failures": {p.name: pq.read_table(p) for p in sorted((out / "failures").iterdir())},
        "manifest": json.loads((out / "starkret.json").read_text()),
    }


def _assert_same(out: Path, reference: dict) -> None:
    got = _snapshot(out)
    assert got["manifest"] == reference["manifest"]
    assert got["manifest"]["complete"] and got["manifest"]["count"] == SHARDS * PER_SHARD - 1
    assert got["img_emb"] == reference["img_emb"]  # same parts, same bytes
    for kind in ("metadata", "failures"):
        assert got[kind].keys() == reference[kind].keys()
        for name, table in got[kind].items():
            assert table.equals(reference[kind][name]), name


def _cli(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "starkret",
        "embed",
        str(shards / "*.tar"),
        "-o",
        str(out),
        "--source",
        "cc12m",
        "--model",
        "starkret-tiny",
        "--batch-size",
        "2",
        "--threads",
        "2",
        "--no-progress",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _done(out: Path) -> int:
    folder = out / "metadata"
    return len(list(folder.glob("*.parquet"))) if folder.is_dir() else 0


def _claimed(out: Path) -> bool:
    """Whether a worker holds a part (its claim file exists while it does)."""
    claims = out / ".starkret" / "claims"
    return claims.is_dir() and any(claims.iterdir())


def _nobody_works_on(out: Path) -> bool:
    folder = WorkFolder(out)
    with folder.locked():
        others = folder.join()
    folder.leave()
    return not others


# ==== Several processes, one output ====


def test_cpu_workers_on_one_folder_write_exactly_the_output_of_one_process(
    tmp_path, shards, reference
):
    report = embed(str(shards / "*.tar"), tmp_path / "out", devices="cpu,cpu", threads=2, **ARGS)
    _assert_same(tmp_path / "out", reference)
    assert (report.embedded, report.failed, report.parts_done) == (17, 1, SHARDS)
    assert report.failure_reasons == {"truncated": 1}
    assert [d["device"] for d in report.devices] == ["cpu", "cpu"]
    assert sum(d["parts"] for d in report.devices) == SHARDS  # no part done twice
    assert sum(d["embedded"] for d in report.devices) == 17
    assert all(d["exit_status"] == 0 and d["error"] is None for d in report.devices)
    assert "cpu (pid" in report.summary()
    assert _nobody_works_on(tmp_path / "out")


def test_kill_9_of_a_worker_inside_a_part_loses_and_duplicates_nothing(
    tmp_path, shards, reference, monkeypatch
):
    # Worker 0 kills itself holding its first part once worker 1 went over the parts
    # (skipping that one): worker 1 must wait for it and redo it.
    monkeypatch.setenv(DEBUG_ENV, "kill:0")
    report = embed(str(shards / "*.tar"), tmp_path / "out", devices="cpu,cpu", threads=2, **ARGS)
    victim, survivor = report.devices
    assert victim["exit_status"] == -signal.SIGKILL and victim["parts"] == 0
    assert "killed by SIGKILL" in victim["error_status"]
    assert "kills itself inside its first part" in victim["error"]  # its stderr tail
    assert survivor["exit_status"] == 0 and survivor["parts"] == SHARDS
    assert (report.embedded, report.parts_done) == (17, SHARDS)
    _assert_same(tmp_path / "out", reference)


def test_parts_left_by_dead_workers_fail_the_run_and_a_rerun_finishes_them(
    tmp_path, shards, reference, monkeypatch, capsys
):
    out = tmp_path / "out"
    for name in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS"):  # the CLI sets them: restore after
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv(DEBUG_ENV, "kill:0")  # the only worker dies in its first part
    argv = _cli(shards, out, "--devices", "cpu")[3:]
    argv[argv.index("--threads") + 1] = "1"
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{SHARDS} of {SHARDS} parts left undone" in err
    assert "killed by SIGKILL" in err and "Run the same command again" in err
    assert not json.loads((out / "starkret.json").read_text())["complete"]
    monkeypatch.delenv(DEBUG_ENV)
    report = embed(str(shards / "*.tar"), out, threads=1, **ARGS)
    assert report.parts_done == SHARDS
    _assert_same(out, reference)


def test_kill_9_of_the_parent_stops_its_workers_and_a_rerun_completes(tmp_path, shards, reference):
    out = tmp_path / "out"
    # The worker pauses at its first batch (the go file never comes).
    parent = subprocess.Popen(
        _cli(shards, out, "--devices", "cpu"),
        env=_env(**{DEBUG_ENV: f"pause:{tmp_path / 'never'}"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: _claimed(out) or parent.poll() is not None, "a claimed part")
        assert parent.poll() is None
    finally:
        parent.kill()
        parent.wait(timeout=TIMEOUT)
    # The worker notices its parent is gone (its stdin closes) and leaves the folder.
    _wait_for(lambda: _nobody_works_on(out), "the worker to exit")
    report = embed(str(shards / "*.tar"), out, threads=1, **ARGS)
    assert report.parts_skipped + report.parts_done == SHARDS
    _assert_same(out, reference)


@pytest.fixture
def python_handles_sigint():
    """SIGINT raises KeyboardInterrupt here, whatever the shell left it as. Under nohup
    (and some CI runners) SIGINT is ignored, so Python installs no handler for it and
    ``_thread.interrupt_main()`` does nothing: the test below waited forever."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_the_parent_stops_its_workers(
    tmp_path, shards, monkeypatch, python_handles_sigint
):
    out = tmp_path / "out"
    monkeypatch.setenv(DEBUG_ENV, f"pause:{tmp_path / 'never'}")

    def press_ctrl_c() -> None:
        _wait_for(lambda: _claimed(out), "a claimed part")
        # SIGINT's KeyboardInterrupt, in the thread running embed
        _thread.interrupt_main(signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        embed(str(shards / "*.tar"), out, devices="cpu", threads=1, **ARGS)
    assert _nobody_works_on(out)  # the worker was stopped before embed returned


def test_the_ctrl_c_test_passes_where_the_shell_ignores_sigint():
    """The test above run as under `nohup make test` (SIGINT ignored by the parent and so
    inherited as ignored); it used to hang there."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command.append(f"{__file__}::test_ctrl_c_in_the_parent_stops_its_workers")
    ignoring = "import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    ignoring += "sys.exit(subprocess.call(sys.argv[1:]))"
    run = subprocess.Popen(
        [sys.executable, "-c", ignoring, *command],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killed whole on a timeout
    )
    try:
        output, _ = run.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        output, _ = run.communicate()
        pytest.fail(f"the Ctrl-C test hung with SIGINT ignored:\n{output[-3000:]}")
    assert run.returncode == 0, output[-3000:]
    assert "1 passed" in output


def test_a_second_invocation_helps_the_first_and_both_end_with_the_same_output(
    tmp_path, shards, reference
):
    out, go = tmp_path / "out", tmp_path / "go"
    first = subprocess.Popen(
        _cli(shards, out, "--devices", "cpu"),
        env=_env(**{DEBUG_ENV: f"pause:{go}"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: _claimed(out) or first.poll() is not None, "a claimed part")
        assert first.poll() is None
        # The first run's worker pauses at its first batch, holding the parts it has read
        # so far; the second run (one process) takes the others, then waits for those.
        before = _done(out)
        runs: dict = {}
        second = threading.Thread(
            target=lambda: runs.setdefault("report", embed(str(shards / "*.tar"), out, **ARGS))
        )
        second.start()
        deadline = time.monotonic() + 60
        while _done(out) == before and second.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        go.touch()
        second.join(TIMEOUT)
        stdout, stderr = first.communicate(timeout=TIMEOUT)
    finally:
        go.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    report = runs["report"]
    written_first = int(stdout.split("parts written ", 1)[1].split(",", 1)[0])
    # every part written exactly once, by one of the two runs, and both did some
    assert report.parts_done >= 1 and written_first >= 1
    assert report.parts_done + written_first == SHARDS
    _assert_same(out, reference)


# ==== Choosing devices ====


def test_device_lists_are_read_and_bad_ones_refused(monkeypatch):
    assert resolve_devices("cpu,cpu") == ["cpu", "cpu"]
    assert resolve_devices(["cpu"]) == ["cpu"]
    monkeypatch.setattr("starkret.ingest.localworkers._gpu_count", lambda: 0)
    with pytest.raises(ValueError, match="no GPU is visible"):
        resolve_devices("all")
    with pytest.raises(ValueError, match="no GPU 0: this machine shows 0"):
        resolve_devices("0,1")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_devices("gpu")
    with pytest.raises(ValueError, match="cannot be combined with Ray"):
        resolve_devices("cpu", workers=2)
    monkeypatch.setattr("starkret.ingest.localworkers._gpu_count", lambda: 4)
    assert resolve_devices("all") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert resolve_devices(" 1, cuda:3 ,cpu") == ["cuda:1", "cuda:3", "cpu"]
    with pytest.raises(ValueError, match="no GPU 4: this machine shows 4"):
        resolve_devices("1,4")
    with pytest.raises(ValueError, match="'all' cannot be combined"):
        resolve_devices("all,cpu")


def test_a_gpu_worker_sees_only_its_gpu_counted_as_this_process_counts(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible_device("cuda:1") == "1" and _visible_device("cpu") == ""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # this process sees GPUs 4 and 6
    assert _visible_device("cuda:1") == "6"


def test_embed_refuses_devices_with_ray_before_any_work(tmp_path, shards):
    with pytest.raises(ValueError, match="cannot be combined with Ray"):
        embed(str(shards / "*.tar"), tmp_path / "out", devices="cpu", workers=2, **ARGS)
    assert not (tmp_path / "out").exists()


# ==== What a Ray actor or a device worker builds ====


def test_workers_build_the_drivers_embedder_with_its_precision_and_batch_size():
    driver = ClipEmbedder(
        "starkret-tiny", device="cpu", precision="fp32", batch_size=7, seed=3, image_size=64
    )
    spec = embedder_spec(driver, "cpu")
    assert spec["precision"] == "fp32" and spec["batch_size"] == 7
    assert (spec["model"], spec["seed"], spec["image_size"]) == ("starkret-tiny", 3, 64)
    worker = build_embedder(spec, "cpu")
    assert (worker.precision, worker.batch_size, worker.seed) == ("fp32", 7, 3)
    assert worker.image_size == driver.image_size
    # A GPU worker of a CPU driver uses its own device's defaults, unless told otherwise.
    gpu = embedder_spec(driver, "cuda:0")
    assert gpu["precision"] is None and gpu["batch_size"] is None
    assert embedder_spec(driver, "cuda", precision="bf16")["precision"] == "bf16"


def test_ray_actors_reserve_the_cpus_they_decode_with():
    driver = ClipEmbedder("starkret-tiny", device="cpu", batch_size=5)
    count, remote, spec, options = actor_plan(driver, PreprocessOptions(threads=3), 2, {"CPU": 8.0})
    assert (count, remote) == (2, {"num_gpus": 0, "num_cpus": 3})
    assert options.threads == 3 and spec["batch_size"] == 5
    # one actor per GPU; no --threads: an equal share of the CPUs each
    count, remote, spec, options = actor_plan(
        driver, PreprocessOptions(), 1, {"CPU": 16.0, "GPU": 4.0}
    )
    assert (count, remote, options.threads) == (4, {"num_gpus": 1, "num_cpus": 4}, 4)
    assert spec["batch_size"] is None  # a GPU actor of a CPU driver: its own default
    with pytest.raises(ValueError, match="need 16 CPUs, the cluster has 8"):
        actor_plan(driver, PreprocessOptions(threads=8), 2, {"CPU": 8.0})


def test_device_reports_serialise_as_json(tmp_path):
    from dataclasses import asdict

    from starkret.ingest.localworkers import DevicesReport

    report = DevicesReport(str(tmp_path), devices=[{"device": "cpu", "pid": 1}])
    assert json.loads(json.dumps(asdict(report)))["devices"][0]["device"] == "cpu"
    assert isinstance(WorkersFailed("x", report), RuntimeError)
