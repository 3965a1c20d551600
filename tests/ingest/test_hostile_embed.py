"""embed-shards on hostile inputs and with several workers: table paths never leave the
dataset, duplicate keys are embedded once, workers sharing a folder never lose,
duplicate or delete each other's work, and a run that produced nothing fails."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starkret._io import temp_path
from starkret.cli import commands as cli
from starkret.ingest.embed import embed
from starkret.ingest.pipeline import _remove_unclaimed_temps
from starkret.store import keyset
from starkret.store.claims import WorkFolder
from starkret.store.keyset import KeySet
from starkret.store.layout import part_file, part_files, part_number
from starkret.testing import encode, synthetic_photo

EMBED = [sys.executable, "-m", "starkret", "embed"]


def _jpeg(seed: int, width: int = 64) -> bytes:
    return encode(synthetic_photo(width, 48, seed=seed), "JPEG")


def _tar(path: Path, samples: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image in samples:
            for ext, data in (("jpg", image), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _read(out: Path) -> tuple[np.ndarray, dict, dict]:
    parts = [part_number(p) for p in part_files(out, "metadata")]
    emb = np.concatenate([np.load(part_file(out, "img_emb", i)) for i in parts])
    meta = pa.concat_tables([pq.read_table(part_file(out, "metadata", i)) for i in parts])
    fails = pa.concat_tables([pq.read_table(part_file(out, "failures", i)) for i in parts])
    return emb, meta.to_pydict(), fails.to_pydict()


# ==== Item 8: table image paths stay inside the dataset ====


@pytest.fixture
def opened_files():
    """Paths opened by this process (audit hook) while the test runs."""
    seen: list[str] = []
    state = {"on": True}

    def hook(event, args):
        if state["on"] and event == "open" and args and isinstance(args[0], (str, bytes)):
            seen.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed: switched off after the test
    yield seen
    state["on"] = False


def test_table_image_paths_never_open_files_outside_the_dataset(
    tmp_path, tiny_embedder, opened_files
):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_bytes(_jpeg(1))  # a good image: reading it would embed it
    dataset = tmp_path / "dataset"
    (dataset / "images").mkdir(parents=True)
    (dataset / "images" / "ok.jpg").write_bytes(_jpeg(2))
    (dataset / "images" / "link.jpg").symlink_to(secret)
    (dataset / "images" / "dirlink").symlink_to(outside)
    os.mkfifo(dataset / "images" / "fifo.jpg")
    rows = {
        "passwd": "/etc/passwd",
        "dotdot": "../outside/secret.jpg",
        "absolute": str(secret),
        "symlink": "images/link.jpg",
        "dir-symlink": "images/dirlink/secret.jpg",
        "deep-dotdot": "images/../../outside/secret.jpg",
        "ok-relative": "images/ok.jpg",
        "ok-absolute": str(dataset / "images" / "ok.jpg"),
        "missing": "images/missing.jpg",
        "fifo": "images/fifo.jpg",
        "directory": "images",
        "the-folder-itself": ".",
        "nul": "images/ok.jpg\x00",
    }
    table = pa.table(
        {
            "image": [{"bytes": None, "path": p} for p in rows.values()],
            "key": list(rows),
        }
    )
    pq.write_table(table, dataset / "train.parquet")
    opened_files.clear()  # from here on, only what embed opens
    report = embed(
        dataset, tmp_path / "out", source_name="ds", embedder=tiny_embedder, progress=False
    )
    _, meta, fails = _read(tmp_path / "out")
    assert meta["sample_key"] == ["ok-relative", "ok-absolute"]
    reasons = dict(zip(fails["key"], fails["reason"], strict=True))
    for key in ("passwd", "dotdot", "absolute", "deep-dotdot", "nul"):
        assert reasons[key].startswith("unsafe path: "), (key, reasons[key])
    for key in ("symlink", "dir-symlink"):  # inside by name, out through a link (issue 24)
        assert reasons[key].startswith("outside input: "), (key, reasons[key])
    assert reasons["missing"].startswith("unreadable: ")
    for key in ("fifo", "directory", "the-folder-itself"):  # a per-row failure, not a crash
        assert reasons[key].startswith("unreadable: "), (key, reasons[key])
    assert report.failed == len(rows) - 2
    touched = [p for p in opened_files if "passwd" in p or "outside" in p or "secret" in p]
    assert touched == []


# ==== Item 9: duplicate keys ====


def test_duplicate_keys_across_shards_and_in_a_table_are_embedded_once(tmp_path, tiny_embedder):
    _tar(tmp_path / "s" / "00000.tar", [("a", _jpeg(1)), ("b", _jpeg(2))])
    _tar(tmp_path / "s" / "00001.tar", [("c", _jpeg(3)), ("a", _jpeg(4)), ("d", _jpeg(5))])
    _tar(tmp_path / "s" / "00002.tar", [("b", _jpeg(6)), ("e", _jpeg(7))])
    report = embed(
        str(tmp_path / "s" / "*.tar"),
        tmp_path / "out",
        source_name="cc",
        embedder=tiny_embedder,
        progress=False,
    )
    emb, meta, fails = _read(tmp_path / "out")
    assert meta["sample_key"] == ["a", "b", "c", "d", "e"]
    assert emb.shape[0] == 5 and len(set(meta["id"])) == 5
    assert sorted(fails["reason"]) == [
        "duplicate key: a (first in part 0)",
        "duplicate key: b (first in part 0)",
    ]
    assert report.failure_reasons == {"duplicate key": 2}

    table = pa.table(
        {
            "image": [_jpeg(i) for i in range(6)],
            "key": ["x", "y", "x", "z", "y", "x"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    embed(
        tmp_path / "t.parquet",
        tmp_path / "out2",
        source_name="t",
        embedder=tiny_embedder,
        chunk_size=2,
        progress=False,
    )
    _, meta, fails = _read(tmp_path / "out2")
    assert meta["sample_key"] == ["x", "y", "z"]
    assert sorted(fails["reason"]) == [
        "duplicate key: x (first in part 0)",
        "duplicate key: x (first in part 0)",
        "duplicate key: y (first in part 0)",
    ]


def test_duplicate_detection_survives_resume(tmp_path, tiny_embedder):
    _tar(tmp_path / "s" / "00000.tar", [("a", _jpeg(1)), ("b", _jpeg(2))])
    args = dict(source_name="cc", embedder=tiny_embedder, progress=False)
    embed(str(tmp_path / "s" / "00000.tar"), tmp_path / "out", **args)
    # a later run adds a shard repeating "b": the key set is rebuilt from part 0 on disk
    _tar(tmp_path / "s" / "00001.tar", [("b", _jpeg(3)), ("c", _jpeg(4))])
    shards = [str(tmp_path / "s" / "00000.tar"), str(tmp_path / "s" / "00001.tar")]
    embed(shards, tmp_path / "out", **args)
    _, meta, fails = _read(tmp_path / "out")
    assert meta["sample_key"] == ["a", "b", "c"]
    assert fails["reason"] == ["duplicate key: b (first in part 0)"]
    # redoing part 1 alone gives the same answer
    (tmp_path / "out" / "metadata" / "metadata_00001.parquet").unlink()
    embed(shards, tmp_path / "out", **args)
    assert _read(tmp_path / "out")[1:] == (meta, fails)


def test_a_hash_collision_never_drops_a_good_sample(tmp_path, tiny_embedder, monkeypatch):
    monkeypatch.setattr(
        keyset, "process_local_hashes", lambda keys: np.full(len(keys), 12345, np.uint64)
    )
    _tar(tmp_path / "s" / "00000.tar", [("a", _jpeg(1)), ("b", _jpeg(2))])
    _tar(tmp_path / "s" / "00001.tar", [("c", _jpeg(3)), ("a", _jpeg(4))])
    embed(
        str(tmp_path / "s" / "*.tar"),
        tmp_path / "out",
        source_name="cc",
        embedder=tiny_embedder,
        progress=False,
    )
    _, meta, fails = _read(tmp_path / "out")
    assert meta["sample_key"] == ["a", "b", "c"]
    assert fails["reason"] == ["duplicate key: a (first in part 0)"]


def test_key_set_costs_8_bytes_per_key_and_finds_the_first_part(tmp_path):
    known = KeySet(tmp_path)
    n_parts, per_part = 40, 25_000  # a million keys
    for part in range(n_parts):
        known.add(part, [f"{part:03d}/{i:09d}" for i in range(per_part)])
    assert len(known) == n_parts * per_part
    assert known.nbytes == 8 * n_parts * per_part
    assert len(known._runs) <= 2 * int(np.log2(n_parts) + 1)
    # real keys are confirmed from the part's metadata: write the parts that get asked
    for part in (3, 17):
        keys = [f"{part:03d}/{i:09d}" for i in range(per_part)]
        pq.write_table(pa.table({"sample_key": keys}), tmp_path / f"metadata_{part}.parquet")
    found = known.first_parts(["003/000000007", "017/000024999", "new/0", "017/9"])
    assert found == [3, 17, None, None]


# ==== Item 10: several workers on one folder ====


def _embed_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        *EMBED,
        str(shards / "*.tar"),
        "-o",
        str(out),
        "--source",
        "cc12m",
        "--model",
        "starkret-tiny",
        "--batch-size",
        "1",
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    for s in range(8):
        _tar(
            folder / f"{s:05d}.tar",
            [(f"{s:05d}{i:03d}", _jpeg(100 * s + i, 96 + 8 * i)) for i in range(8)],
        )
    return folder


@pytest.fixture(scope="module")
def reference(many_shards, tmp_path_factory, tiny_embedder):
    out = tmp_path_factory.mktemp("reference")
    embed(
        str(many_shards / "*.tar"),
        out,
        source_name="cc12m",
        embedder=tiny_embedder,
        batch_size=1,
        threads=1,
        progress=False,
    )
    return _read(out)


def _assert_same_output(out: Path, reference) -> None:
    emb, meta, fails = _read(out)
    ref_emb, ref_meta, ref_fails = reference
    assert meta == ref_meta and fails == ref_fails
    assert len(set(meta["sample_key"])) == len(meta["sample_key"]) == 64
    np.testing.assert_allclose(emb.astype(np.float32), ref_emb.astype(np.float32), atol=2e-3)
    assert not list(out.glob("*/.*.tmp-*")), "temporary files left behind"
    manifest = json.loads((out / "starkret.json").read_text())
    assert manifest["complete"] and manifest["count"] == 64


def _parts_written(stdout: str) -> int:
    return int(stdout.split("parts written ", 1)[1].split(",", 1)[0])


def test_two_processes_on_one_folder_write_the_output_of_one(tmp_path, many_shards, reference):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _embed_cmd(many_shards, tmp_path / "out")
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    assert sum(_parts_written(out) for out, _ in results) == 8  # no part done twice
    _assert_same_output(tmp_path / "out", reference)


def test_kill_9_of_one_of_two_workers_loses_and_duplicates_nothing(
    tmp_path, many_shards, reference
):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _embed_cmd(many_shards, tmp_path / "out")
    survivor = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    claims = tmp_path / "out" / ".starkret" / "claims"
    deadline = time.time() + 300
    # kill the victim once it holds a claim (it is inside a part) or has finished parts
    while victim.poll() is None and time.time() < deadline:
        done = len(list((tmp_path / "out" / "metadata").glob("*.parquet")))
        if done >= 2 or (claims.is_dir() and len(list(claims.iterdir())) >= 2):
            break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    _, err = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, err.decode()
    _assert_same_output(tmp_path / "out", reference)
    assert not list(claims.iterdir())


def test_a_run_with_other_arguments_is_refused_while_another_runs(
    tmp_path, many_shards, tiny_embedder
):
    shards = str(many_shards / "0000[01].tar")
    args = dict(source_name="cc12m", embedder=tiny_embedder, progress=False)
    embed(shards, tmp_path / "out", **args)
    other = WorkFolder(tmp_path / "out")
    with other.locked():
        assert other.join() is False  # we are the only live run: plays "another embed"
    try:
        for kwargs in ({"mode": "fast"}, {"overwrite": True}):
            with pytest.raises(ValueError, match="another embed is running on"):
                embed(shards, tmp_path / "out", **args, **kwargs)
        with pytest.raises(ValueError, match=r"another embed is running on .*\(other inputs\)"):
            embed(str(many_shards / "0000[012].tar"), tmp_path / "out", **args)
        report = embed(shards, tmp_path / "out", **args)  # same arguments: cooperates
        assert report.parts_skipped == 2
    finally:
        other.leave()
    # alone again: the usual rules (inputs may be extended)
    assert embed(str(many_shards / "0000[012].tar"), tmp_path / "out", **args).parts_done == 1


def test_start_up_removes_only_temp_files_of_unclaimed_parts(tmp_path):
    out = tmp_path / "out"
    for sub in ("img_emb", "metadata"):
        (out / sub).mkdir(parents=True)
    busy = out / "img_emb" / ".img_emb_00000.npy.tmp-111"
    stale = [
        out / "img_emb" / ".img_emb_00001.npy.tmp-222",
        out / "metadata" / ".metadata_00001.parquet.tmp-3",
    ]
    for path in [busy, *stale]:
        path.write_bytes(b"half")
    folder = WorkFolder(out)
    claim = folder.claim(0)  # another worker is writing part 0
    assert claim is not None and folder.claim(0) is None
    _remove_unclaimed_temps(out, folder)
    assert busy.exists() and not any(p.exists() for p in stale)
    claim.release()
    assert folder.claim(0) is not None


def test_start_up_removes_temps_of_every_name_format_and_nothing_else(tmp_path):
    """Temps of today's writer (``.NAME.tmp-PID-TOKEN``, starkret._io) and of older
    releases (``.NAME.tmp-PID``) of an unclaimed part go; other files stay."""
    out = tmp_path / "out"
    for sub in ("img_emb", "metadata", "failures", "index"):
        (out / sub).mkdir(parents=True)
    stale = [
        temp_path(part_file(out, "img_emb", 3)),
        temp_path(part_file(out, "failures", 3)),
        out / "metadata" / ".metadata_00003.parquet.tmp-77",
        temp_path(out / "starkret.json"),
    ]
    kept = [
        part_file(out, "img_emb", 3),
        out / "img_emb" / ".img_emb_00003.npy.tmp-77-notes",  # not a temp name
        out / "metadata" / ".metadata_00004.npy.tmp-5",  # no such part file
        temp_path(out / "index" / "infos.json"),  # not a part: build-index's business
    ]
    for path in [*stale, *kept]:
        path.write_bytes(b"x")
    _remove_unclaimed_temps(out, WorkFolder(out))
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def _embed_one_shard_cli(tmp_path) -> int:
    """``starkret embed`` of ``tmp_path/s/00000.tar`` into ``tmp_path/out``: its exit code."""
    return cli.main(
        [
            "embed",
            str(tmp_path / "s" / "00000.tar"),
            "-o",
            str(tmp_path / "out"),
            "--source",
            "cc",
            "--model",
            "starkret-tiny",
            "--no-progress",
        ]
    )


def test_cli_fails_when_nothing_was_embedded(tmp_path, capsys):
    _tar(tmp_path / "s" / "00000.tar", [("a", b"<html>404</html>"), ("b", _jpeg(1)[:40])])
    code = _embed_one_shard_cli(tmp_path)
    err = capsys.readouterr().err
    assert code != 0
    assert err.strip().count("\n") == 0 and "nothing was embedded" in err
    assert "all 2 samples" in err


def test_a_filesystem_without_flock_is_one_clear_error_not_a_traceback(
    tmp_path, capsys, monkeypatch
):
    import errno

    from starkret.store import claims

    _tar(tmp_path / "s" / "00000.tar", [("a", _jpeg(1))])

    def no_locks(fd, mode):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(claims.fcntl, "flock", no_locks)
    code = _embed_one_shard_cli(tmp_path)
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert "does not support flock" in err and str(tmp_path / "out") in err
