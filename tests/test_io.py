"""starkret._io: a published file is the old one or the whole new one, never a part."""

from __future__ import annotations

import os
import threading

import pytest

from starkret._io import (
    atomic_path,
    atomic_symlink,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    temp_path,
    temp_target,
)


class Boom(Exception):
    pass


def _half_then_fail(f) -> None:
    f.write(b"half of the new")
    raise Boom


def test_a_failing_writer_leaves_the_target_unchanged_and_no_temp(tmp_path):
    target = tmp_path / "infos.json"
    target.write_bytes(b"old content")
    with pytest.raises(Boom):
        atomic_write(target, _half_then_fail)
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["infos.json"]


def test_a_failing_writer_leaves_a_missing_target_missing(tmp_path):
    with pytest.raises(Boom):
        atomic_write(tmp_path / "part.npy", _half_then_fail)
    assert os.listdir(tmp_path) == []


def test_an_interrupt_in_the_writer_also_removes_the_temp(tmp_path):
    def interrupted(f) -> None:
        f.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a", interrupted)
    assert os.listdir(tmp_path) == []


def test_the_whole_content_replaces_the_target(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    data = os.urandom(3 << 20)
    assert (
        atomic_write(
            target, lambda f: [f.write(data[i : i + 4096]) for i in range(0, len(data), 4096)]
        )
        == target
    )
    assert target.read_bytes() == data
    assert atomic_write_text(tmp_path / "t.txt", "größe\n").read_text("utf-8") == "größe\n"
    assert atomic_write_bytes(tmp_path / "b", b"\0\1").read_bytes() == b"\0\1"
    assert sorted(os.listdir(tmp_path)) == ["b", "out.bin", "t.txt"]


def test_file_and_folder_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to name file descriptors")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "m.json"
    atomic_write_text(target, "{}")
    (kind, synced), replaced, folder = events
    assert kind == "fsync" and temp_target(os.path.basename(synced)) == "m.json"
    assert replaced == ("replace", str(target))
    assert folder == ("fsync", str(tmp_path))


def test_writers_by_path_get_a_temp_name_in_the_same_folder(tmp_path):
    target = tmp_path / "index" / "ivf.index"
    target.parent.mkdir()
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and temp_target(tmp.name) == "ivf.index"
        tmp.write_bytes(b"index")
    assert target.read_bytes() == b"index"
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise Boom
    assert target.read_bytes() == b"index"
    assert os.listdir(target.parent) == ["ivf.index"]


def test_a_writer_by_path_that_wrote_nothing_publishes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "knn.index"):
        pass
    assert os.listdir(tmp_path) == []


def test_temp_names_are_unique_per_call_and_recognised():
    names = {temp_path("/x/part.npy").name for _ in range(1000)}
    assert len(names) == 1000
    assert all(temp_target(n) == "part.npy" for n in names)
    assert temp_target(".img_emb_00001.npy.tmp-222") == "img_emb_00001.npy"  # older releases
    for other in ("part.npy", ".part.npy", ".part.npy.tmp-", ".part.npy.tmp-x1"):
        assert temp_target(other) is None


def test_threads_writing_one_file_never_collide_or_mix(tmp_path):
    target = tmp_path / "starkret.json"
    contents = [bytes([i]) * 200_000 for i in range(16)]
    errors = []

    def write(data: bytes) -> None:
        try:
            for _ in range(5):
                atomic_write_bytes(target, data)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert target.read_bytes() in contents
    assert os.listdir(tmp_path) == ["starkret.json"]


def test_a_symlink_is_replaced_in_one_rename(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    link = tmp_path / "image.index"
    atomic_symlink("a", link)
    atomic_symlink("b", link)
    assert os.readlink(link) == "b" and link.read_text() == "b"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "image.index"]
