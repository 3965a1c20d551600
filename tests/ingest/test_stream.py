"""embed-shards as one continuous stream (issue 12, items 2 and 3): uint8 HWC crops give
the float path's output bit for bit; the reader thread decodes the next part while the
model embeds the current one and the writer thread commits parts; errors in any thread
reach the caller naming the part, leave it unfinished, and a rerun completes."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import starkret
from starkret.ingest import embed as embed_driver
from starkret.ingest import pipeline, preprocess, sources
from starkret.ingest.preprocess import normalisation_table, preprocess_shards
from starkret.ingest.sources import PreprocessOptions, plan_parts
from starkret.store.claims import STATE_DIR
from starkret.testing import encode, synthetic_photo

SOURCE = "cc"


def _tar(path: Path, samples: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image in samples:
            for ext, data in (("jpg", image), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _image(seed: int, fmt: str = "JPEG") -> bytes:
    return encode(synthetic_photo(40 + 7 * (seed % 5), 36, seed=seed), fmt)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """5 shards of 5 samples: a WebP (Pillow fallback), a truncated JPEG, a key met
    again in a later shard, and a shard where every sample fails."""
    folder = tmp_path_factory.mktemp("shards")
    for s in range(5):
        samples = [(f"{s}{i:03d}", _image(10 * s + i)) for i in range(5)]
        if s == 0:
            samples[1] = (samples[1][0], _image(1, "WEBP"))
            samples[3] = (samples[3][0], _image(3)[:40])
        if s == 2:
            samples[4] = ("0002", _image(99))  # already in shard 0
        if s == 3:
            samples = [(k, data[:30]) for k, data in samples]
        _tar(folder / f"{s:05d}.tar", samples)
    return folder


@pytest.fixture(scope="module")
def tiny():
    return starkret.ClipEmbedder("starkret-tiny", device="cpu")


class _Tower:
    """starkret-tiny behind the issue-12 tower contract: takes uint8 (HWC or CHW) crops
    and normalises them with the same table, as a GPU tower does on the device;
    ``hook(call, pixels)`` runs before each batch is embedded."""

    accepts_uint8 = True

    def __init__(self, inner, hook=None) -> None:
        self.inner, self.hook, self.calls, self.seen = inner, hook, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_images(self, pixels, *, dtype="float16"):
        self.calls += 1
        self.seen.append((pixels.dtype, pixels.shape))
        if self.hook is not None:
            self.hook(self.calls, pixels)
        if pixels.dtype == np.uint8:
            chw = pixels.transpose(0, 3, 1, 2) if pixels.shape[-1] == 3 else pixels
            table = normalisation_table(preprocess.OPENAI_MEAN, preprocess.OPENAI_STD)
            pixels = np.stack([table[c][chw[:, c]] for c in range(3)], axis=1)
        return self.inner.encode_images(pixels, dtype=dtype)

    def submit_images(self, pixels, *, dtype="float16"):
        return pipeline._Now(self.encode_images(pixels, dtype=dtype))


def _embed(inputs, out: Path, embedder, **kwargs) -> pipeline.EmbedReport:
    args = dict(source_name=SOURCE, embedder=embedder, batch_size=2, progress=False)
    return embed_driver.embed(inputs, out, **{**args, **kwargs})


def _files(out: Path) -> dict[str, object]:
    """Every output file: npy bytes, parquet tables, the manifest (bit for bit)."""
    found: dict[str, object] = {}
    for sub in ("img_emb", "metadata", "failures"):
        for path in sorted((out / sub).iterdir()):
            if path.suffix == ".npy":
                found[f"{sub}/{path.name}"] = path.read_bytes()
            else:
                found[f"{sub}/{path.name}"] = pq.read_table(path).to_pydict()
    manifest = out / "starkret.json"
    if manifest.exists():
        found["starkret.json"] = json.loads(manifest.read_text())
    return found


@pytest.fixture(scope="module")
def reference(shards, tiny, tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("reference") / "out"
    report = _embed(str(shards / "*.tar"), out, tiny)
    assert report.parts_done == 5 and report.embedded == 18
    assert report.failure_reasons == {"duplicate key": 1, "truncated": 6}
    return _files(out)


def _no_claims_left(out: Path) -> bool:
    return not any((out / STATE_DIR / "claims").iterdir())


# ==== uint8 crops in the Rust core's HWC layout ====


def test_uint8_hwc_crops_are_the_chw_crops_transposed_for_shards_fallbacks_and_folders(
    shards, tmp_path
):
    def crops(layout, **kw):
        return {
            key: pixels
            for batch in preprocess_shards(
                str(shards / "00000.tar"), size=32, dtype="uint8", layout=layout, **kw
            )
            for key, pixels in zip(batch.keys, batch.pixels, strict=True)
        }

    chw, hwc = crops("chw"), crops("hwc")
    assert "0001" in hwc  # the WebP, cropped by Pillow
    assert sorted(chw) == sorted(hwc) and len(hwc) == 4
    for key in chw:
        assert hwc[key].shape == (32, 32, 3) and hwc[key].dtype == np.uint8
        np.testing.assert_array_equal(hwc[key].transpose(2, 0, 1), chw[key])

    images = [_image(5), _image(6, "WEBP"), b"junk", _image(7, "PNG")]
    a = preprocess.preprocess(images, size=32, dtype="uint8")
    b = preprocess.preprocess(images, size=32, dtype="uint8", layout="hwc")
    assert b.pixels.shape == (3, 32, 32, 3) and b.fallbacks == [1]
    np.testing.assert_array_equal(b.pixels.transpose(0, 3, 1, 2), a.pixels)

    (tmp_path / "f").mkdir()
    for i, data in enumerate(images):
        (tmp_path / "f" / f"{i}.{'webp' if i == 1 else 'png'}").write_bytes(data)
    (part,) = plan_parts(tmp_path / "f")
    opts = PreprocessOptions(size=32, dtype="uint8", layout="hwc", batch_size=8)
    (batch,) = list(part.batches(opts))
    assert batch.pixels.shape == (3, 32, 32, 3) and len(batch.failures) == 1

    with pytest.raises(ValueError, match="layout"):
        preprocess.preprocess(images, size=32, dtype="float32", layout="hwc")


def test_uint8_path_writes_the_float_paths_output_bit_for_bit(
    shards, tiny, reference, tmp_path, monkeypatch
):
    monkeypatch.setattr(embed_driver, "input_format", lambda embedder: ("uint8", "hwc"))
    tower = _Tower(tiny)
    report = _embed(str(shards / "*.tar"), tmp_path / "out", tower)
    assert report.embedded == 18
    size = tiny.image_size
    assert {(str(d), s[1:]) for d, s in tower.seen} == {("uint8", (size, size, 3))}
    assert _files(tmp_path / "out") == reference


def test_uint8_crops_through_the_real_tower_give_the_float_paths_output(
    shards, tiny, reference, tmp_path, monkeypatch
):
    if not getattr(tiny, "accepts_uint8", False):
        pytest.skip("this ClipEmbedder takes float pixels only")
    monkeypatch.setattr(embed_driver, "input_format", lambda embedder: ("uint8", "hwc"))
    _embed(str(shards / "*.tar"), tmp_path / "out", tiny)
    assert _files(tmp_path / "out") == reference


def test_uint8_is_sent_on_cuda_only_to_towers_that_take_it(tiny):
    class Cuda:
        type = "cuda"

    class Gpu:
        device = Cuda()

    class GpuUint8(Gpu):
        accepts_uint8 = True

    assert sources.input_format(tiny) == ("float32", "chw")
    assert sources.input_format(Gpu()) == ("float16", "chw")
    assert sources.input_format(GpuUint8()) == ("uint8", "hwc")


# ==== One continuous stream ====


def test_stream_writes_exactly_what_parts_one_by_one_write(shards, tiny, reference, tmp_path):
    # The old way: one part after the other on one thread (still what Ray actors do).
    parts = plan_parts(str(shards / "*.tar"), source=SOURCE)
    options = PreprocessOptions(size=tiny.image_size, batch_size=2)
    runner = pipeline.PartRunner(tmp_path / "seq", tiny, options, SOURCE)
    for sub in ("img_emb", "metadata", "failures"):
        (tmp_path / "seq" / sub).mkdir(parents=True)
    for i, part in enumerate(parts):
        runner.run(i, part)
    streamed = {k: v for k, v in reference.items() if k != "starkret.json"}
    assert _files(tmp_path / "seq") == streamed


def test_stream_keeps_its_output_with_the_smallest_queues(
    shards, tiny, reference, tmp_path, monkeypatch
):
    monkeypatch.setattr(pipeline, "STREAM_BATCHES", 1)
    report = _embed(str(shards / "*.tar"), tmp_path / "out", tiny, batch_size=1)
    assert (report.embedded, report.parts_done) == (18, 5)
    assert 0 <= report.input_wait_seconds <= report.embed_seconds
    assert _files(tmp_path / "out") == reference


def test_next_part_is_claimed_and_read_while_the_current_one_is_embedded(
    shards, tiny, reference, tmp_path
):
    claims = tmp_path / "out" / STATE_DIR / "claims"
    seen = {}

    def hook(call, pixels):
        if call == 2:  # part 0's last batch (4 images in batches of 2) is in the model
            seen["part 1 claimed"] = threading.Event()
            for _ in range(400):
                if (claims / "part_00001").exists():
                    seen["part 1 claimed"].set()
                    break
                threading.Event().wait(0.025)

    report = _embed(str(shards / "*.tar"), tmp_path / "out", _Tower(tiny, hook))
    assert seen["part 1 claimed"].is_set()
    assert report.parts_done == 5
    assert _files(tmp_path / "out") == reference


def test_reading_fallbacks_and_writing_run_off_the_model_thread(
    shards, tiny, tmp_path, monkeypatch
):
    threads: dict[str, set[str]] = {"model": set(), "pillow": set(), "write": set()}
    crop, write = preprocess.reference_crop, pipeline._write_part

    def pillow(*args, **kwargs):
        threads["pillow"].add(threading.current_thread().name)
        return crop(*args, **kwargs)

    def writing(*args, **kwargs):
        threads["write"].add(threading.current_thread().name)
        return write(*args, **kwargs)

    monkeypatch.setattr(preprocess, "reference_crop", pillow)
    monkeypatch.setattr(pipeline, "_write_part", writing)
    tower = _Tower(tiny, lambda call, px: threads["model"].add(threading.current_thread().name))
    _embed(str(shards / "0000[01].tar"), tmp_path / "out", tower)
    assert len(threads["model"]) == len(threads["pillow"]) == len(threads["write"]) == 1
    assert len(set.union(*threads.values())) == 3, threads


# ==== Errors in any thread ====


def test_an_error_on_the_writer_thread_names_the_part_and_a_rerun_completes(
    shards, tiny, reference, tmp_path, monkeypatch
):
    write = pipeline._write_part

    def failing(work, *args, **kwargs):
        if work.index == 1:
            raise OSError(28, "No space left on device")
        return write(work, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_write_part", failing)
    with pytest.raises(OSError, match="No space left") as caught:
        _embed(str(shards / "*.tar"), tmp_path / "out", tiny)
    assert any("part 1 (shard:" in note for note in caught.value.__notes__)
    assert not (tmp_path / "out" / "metadata" / "metadata_00001.parquet").exists()
    assert _no_claims_left(tmp_path / "out")
    monkeypatch.setattr(pipeline, "_write_part", write)
    report = _embed(str(shards / "*.tar"), tmp_path / "out", tiny)
    assert report.parts_skipped >= 1 and report.parts_done + report.parts_skipped == 5
    assert _files(tmp_path / "out") == reference


def test_an_error_on_the_reader_thread_names_the_part_and_a_rerun_completes(
    shards, tiny, reference, tmp_path, monkeypatch
):
    batches = sources.Part.batches

    def failing(self, options):
        for n, batch in enumerate(batches(self, options)):
            if self.name == "00002.tar" and n == 1:
                raise RuntimeError("disk went away")
            yield batch

    monkeypatch.setattr(sources.Part, "batches", failing)
    with pytest.raises(RuntimeError, match="disk went away") as caught:
        _embed(str(shards / "*.tar"), tmp_path / "out", tiny)
    assert any("part 2 (shard:" in note for note in caught.value.__notes__)
    assert not (tmp_path / "out" / "metadata" / "metadata_00002.parquet").exists()
    assert _no_claims_left(tmp_path / "out")
    monkeypatch.setattr(sources.Part, "batches", batches)
    _embed(str(shards / "*.tar"), tmp_path / "out", tiny)
    assert _files(tmp_path / "out") == reference


def test_an_error_in_the_model_names_the_part_and_a_rerun_completes(
    shards, tiny, reference, tmp_path
):
    def hook(call, pixels):
        if call == 4:  # part 1's first batch
            raise ValueError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(ValueError, match="illegal memory") as caught:
        _embed(str(shards / "*.tar"), tmp_path / "out", _Tower(tiny, hook))
    assert any("part 1 (shard:" in note for note in caught.value.__notes__)
    assert _no_claims_left(tmp_path / "out")
    _embed(str(shards / "*.tar"), tmp_path / "out", tiny)
    assert _files(tmp_path / "out") == reference


def test_an_interrupt_stops_every_thread_and_releases_the_claims(shards, tiny, reference, tmp_path):
    def hook(call, pixels):
        if call == 3:
            raise KeyboardInterrupt

    raised: list[BaseException] = []

    def run():
        try:
            _embed(str(shards / "*.tar"), tmp_path / "out", _Tower(tiny, hook))
        except BaseException as exc:
            raised.append(exc)

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(120)
    assert not caller.is_alive(), "embed hung after an interrupt"
    assert len(raised) == 1 and isinstance(raised[0], KeyboardInterrupt)
    names = {t.name for t in threading.enumerate() if t.is_alive()}
    assert not names & {"starkret-reader", "starkret-writer"}, names
    assert _no_claims_left(tmp_path / "out")
    _embed(str(shards / "*.tar"), tmp_path / "out", tiny)
    assert _files(tmp_path / "out") == reference


_CLI = ["embed", "--source", SOURCE, "--model", "starkret-tiny", "--device", "cpu", "--no-progress"]


def test_cli_json_reports_the_time_the_model_waited_for_input(shards, tmp_path, capsys):
    from starkret.cli import commands as cli

    code = cli.main([*_CLI, str(shards / "0000[01].tar"), "-o", str(tmp_path / "out"), "--json"])
    body = json.loads(capsys.readouterr().out)
    assert code == 0 and body["embedded"] == 9
    assert 0 <= body["input_wait_seconds"] <= body["embed_seconds"]


def test_table_part_is_read_as_one_stream_too(tiny, tmp_path):
    rows = [_image(i) for i in range(7)]
    pq.write_table(
        pa.table({"image": rows, "caption": [f"c{i}" for i in range(7)]}), tmp_path / "t.parquet"
    )
    report = _embed(str(tmp_path / "t.parquet"), tmp_path / "out", tiny, chunk_size=3)
    assert (report.embedded, report.parts_done) == (7, 3)
    meta = pa.concat_tables(
        [pq.read_table(p) for p in sorted((tmp_path / "out" / "metadata").glob("*.parquet"))]
    ).to_pydict()
    assert meta["caption"] == [f"c{i}" for i in range(7)]


def test_cli_error_message_names_the_part(shards, tmp_path, capsys, monkeypatch):
    from starkret.cli import commands as cli

    def failing(self, options):
        raise starkret.InvalidInputError(f"{self.path}: no column 'image' (image)")
        yield

    monkeypatch.setattr(sources.Part, "batches", failing)
    code = cli.main([*_CLI, str(shards / "00001.tar"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "no column 'image'" in err
    assert "while embedding part 0 (shard:" in err and "00001.tar" in err


def test_embed_passes_precision_and_compile_to_the_tower_it_builds(
    shards, tiny, tmp_path, monkeypatch
):
    asked = []

    def build(*args, **kwargs):
        asked.append(kwargs)
        return tiny

    monkeypatch.setattr(embed_driver, "ClipEmbedder", build)
    args = dict(source_name=SOURCE, model="starkret-tiny", device="cpu", progress=False)
    embed_driver.embed(str(shards / "00001.tar"), tmp_path / "a", **args)
    embed_driver.embed(
        str(shards / "00001.tar"), tmp_path / "b", precision="fp32", compile=False, **args
    )
    assert asked == [{"device": "cpu"}, {"device": "cpu", "precision": "fp32", "compile": False}]
