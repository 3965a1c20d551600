"""Issue 24, "nothing a user owns is ever destroyed": ``embed --overwrite`` deletes only
what a starkret manifest names, an output never overlaps an input, and a symlink out of
an input is a failure ``outside input`` (embed) that nothing serves, unless the user
opts in with ``--follow-links`` (then embed and the image reader both follow it).

The CLI is run as users run it (``python -m starkret embed``), in a subprocess."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from starkret.ingest.embed import embed
from starkret.store.images import ImageReader, part_input
from starkret.store.layout import part_file
from starkret.testing import encode, synthetic_photo

EMBED = [sys.executable, "-m", "starkret", "embed"]
#: A refusal happens before the model is loaded: seconds. A real run of the tiny model
#: on a few images takes ~10 s on a busy 2-core machine.
TIMEOUT_S = 180


def _jpeg(seed: int) -> bytes:
    return encode(synthetic_photo(48, 40, seed=seed), "JPEG")


def _cli(inputs: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--source", "s", "--model", "starkret-tiny", "--threads", "1", "--no-progress"]
    return subprocess.run(
        [*EMBED, *inputs, "-o", str(out), *args, *extra],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The run exited 2 with one line on stderr holding ``words``; returns the line."""
    line = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert line.count("\n") == 0 and "Traceback" not in line, line
    for word in words:
        assert word in line, line
    return line


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i}.jpg").write_bytes(_jpeg(i))
    return folder


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".starkret" not in p.parts
    }


# ==== Item 3: --overwrite deletes only what the manifest names ====


def test_a_folder_starkret_never_wrote_is_refused_with_or_without_overwrite(tmp_path):
    imgs = _images(tmp_path / "imgs")
    user = tmp_path / "user"
    for rel in ("img_emb/mine.npy", "metadata/notes.parquet", "failures/todo.txt", "keep.txt"):
        (user / rel).parent.mkdir(parents=True, exist_ok=True)
        (user / rel).write_bytes(rel.encode())
    before = _tree(user)
    for extra in (("--overwrite",), ()):
        line = _refused(_cli([str(imgs)], user, *extra), "not written by starkret", "starkret.json")
        assert str(user) in line
        assert _tree(user) == before  # nothing deleted, renamed or added
        assert not (user / "starkret.json").exists()


def test_overwrite_keeps_a_users_extra_file_and_refuses_a_part_it_did_not_list(
    tmp_path, tiny_embedder
):
    imgs = _images(tmp_path / "imgs")
    out = tmp_path / "out"
    embed(imgs, out, source_name="s", embedder=tiny_embedder, progress=False)
    (out / "img_emb" / "README.txt").write_text("my notes")  # not a part's name: stays
    (out / "notes.md").write_text("mine")
    proc = _cli([str(imgs)], out, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "img_emb" / "README.txt").read_text() == "my notes"
    assert (out / "notes.md").read_text() == "mine"
    assert pq.read_table(part_file(out, "metadata", 0)).num_rows == 2

    # A file named as a part the manifest does not list would be read as a part of the
    # new output: refused, and nothing is deleted.
    stray = part_file(out, "img_emb", 7)
    stray.write_bytes(b"a user's array")
    before = _tree(out)
    _refused(_cli([str(imgs)], out, "--overwrite"), str(stray), "did not write it")
    assert _tree(out) == before


def test_overwrite_refuses_a_manifest_it_cannot_read(tmp_path):
    imgs = _images(tmp_path / "imgs")
    out = tmp_path / "out"
    (out / "img_emb").mkdir(parents=True)
    (out / "img_emb" / "img_emb_00000.npy").write_bytes(b"x")
    (out / "starkret.json").write_text("{not json")
    _refused(_cli([str(imgs)], out, "--overwrite"), "starkret.json", "unreadable")
    assert (out / "img_emb" / "img_emb_00000.npy").read_bytes() == b"x"


# ==== Item 4: an output never overlaps an input ====


def test_an_output_inside_an_input_or_holding_one_is_refused(tmp_path):
    imgs = _images(tmp_path / "imgs")
    line = _refused(_cli([str(imgs)], imgs / "out"), "inside the input")
    assert str(imgs) in line
    assert not (imgs / "out").exists()  # refused before anything was written

    # through a symlink: the resolved paths decide
    (tmp_path / "alias").symlink_to(imgs)
    _refused(_cli([str(imgs)], tmp_path / "alias" / "out"), "inside the input")
    assert not (imgs / "out").exists()

    # an input inside the output: a folder, and shards given as a glob
    held = tmp_path / "db"
    _images(held / "imgs")
    _refused(_cli([str(held / "imgs")], held), "holding the input")
    shards = held / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        data = _jpeg(0)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    _refused(_cli([str(shards / "*.tar")], held), "holding the input")
    assert not (held / "starkret.json").exists()


def test_an_output_that_is_an_existing_file_is_one_line(tmp_path):
    imgs = _images(tmp_path / "imgs")
    target = tmp_path / "out.npy"
    target.write_bytes(b"mine")
    _refused(_cli([str(imgs)], target), "exists and is not a folder")
    assert target.read_bytes() == b"mine"


# ==== Item 5: links out of an input ====


@pytest.fixture
def linked_folder(tmp_path) -> Path:
    """``imgs/`` with two images, a link to one of them (inside), and links to an image
    and to a text file outside the folder."""
    imgs = _images(tmp_path / "imgs")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.jpg").write_bytes(_jpeg(9))
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (imgs / "alias.jpg").symlink_to(imgs / "0.jpg")
    (imgs / "private.jpg").symlink_to(outside / "private.jpg")
    (imgs / "passwd.jpg").symlink_to(outside / "passwd")
    (imgs / "0.txt").symlink_to(outside / "passwd")  # a caption sidecar out of the folder
    return imgs


def _outcome(out: Path) -> tuple[list[str], dict[str, str], list]:
    meta = pq.read_table(part_file(out, "metadata", 0)).to_pydict()
    fails = pq.read_table(part_file(out, "failures", 0)).to_pydict()
    reasons = dict(zip(fails["key"], fails["reason"], strict=True))
    return sorted(meta["sample_key"]), reasons, meta["caption"]


def test_a_link_out_of_an_image_folder_is_a_failure_that_nothing_serves(linked_folder, tmp_path):
    out = tmp_path / "out"
    proc = _cli([str(linked_folder)], out, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["failure_reasons"] == {"outside input": 2}
    keys, reasons, captions = _outcome(out)
    assert keys == ["0.jpg", "1.jpg", "alias.jpg"]  # a link that stays inside is followed
    assert set(reasons) == {"private.jpg", "passwd.jpg"}
    for reason in reasons.values():
        assert reason.startswith("outside input: "), reason
    assert not any(c and "root:" in c for c in captions)  # the sidecar link was not read

    manifest = json.loads((out / "starkret.json").read_text())
    record = part_input(manifest, 0)
    assert "follow_links" not in record
    reader = ImageReader()  # what serve's /image, the report and the export read through
    assert reader.read(record, "alias.jpg") == _jpeg(0)
    for key in ("private.jpg", "passwd.jpg"):
        assert reader.read(record, key) is None

    # a resume cannot change the choice: serve must read what embed read
    _refused(_cli([str(linked_folder)], out, "--follow-links"), "follow_links")


def test_follow_links_embeds_and_serves_what_the_links_point_to(linked_folder, tmp_path):
    out = tmp_path / "out"
    proc = _cli([str(linked_folder)], out, "--follow-links", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys, reasons, _ = _outcome(out)
    assert keys == ["0.jpg", "1.jpg", "alias.jpg", "private.jpg"]
    assert reasons["passwd.jpg"].startswith("not an image")  # followed, then not an image
    record = part_input(json.loads((out / "starkret.json").read_text()), 0)
    assert record["follow_links"] is True
    assert ImageReader().read(record, "private.jpg") == _jpeg(9)


def _shard(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        data = _jpeg(seed)
        info = tarfile.TarInfo(f"{seed:04d}.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_a_globbed_shard_linking_out_of_its_folder_is_a_failure(tmp_path, tiny_embedder):
    shards = tmp_path / "shards"
    _shard(shards / "00000.tar", 1)
    _shard(tmp_path / "elsewhere" / "00001.tar", 2)
    (shards / "00001.tar").symlink_to(tmp_path / "elsewhere" / "00001.tar")
    args = dict(source_name="s", embedder=tiny_embedder, progress=False)

    report = embed(str(shards / "*.tar"), tmp_path / "out", **args)
    assert (report.embedded, report.failure_reasons) == (1, {"outside input": 1})
    fails = pq.read_table(part_file(tmp_path / "out", "failures", 1)).to_pylist()
    assert [(f["shard"], f["key"]) for f in fails] == [("00001.tar", None)]
    manifest = json.loads((tmp_path / "out" / "starkret.json").read_text())
    assert ImageReader().read(part_input(manifest, 1), "0002") is None

    # named by path, a shard is the user's own choice; --follow-links follows globbed ones
    named = embed(str(shards / "00001.tar"), tmp_path / "named", **args)
    followed = embed(str(shards / "*.tar"), tmp_path / "followed", **args, follow_links=True)
    assert (named.embedded, followed.embedded) == (1, 2)
    manifest = json.loads((tmp_path / "followed" / "starkret.json").read_text())
    assert ImageReader().read(part_input(manifest, 1), "0002") == _jpeg(2)
