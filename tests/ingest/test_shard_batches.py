"""preprocess_shards: shards straight to preprocessed batches, checked against preprocess()."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import starkret
from starkret.testing import encode, synthetic_photo


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, image: bytes, caption: str) -> list[tuple[str, bytes]]:
    meta = {"url": f"https://example.com/{key}.jpg", "key": key, "width": 1, "height": 2}
    return [
        (f"{key}.jpg", image),
        (f"{key}.txt", caption.encode()),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


@pytest.fixture
def shards(tmp_path):
    """Two shards of 5 samples: JPEGs, a PNG stored as .jpg, a WebP, and a broken image."""
    images = {}
    for s in range(2):
        members = []
        for i in range(5):
            key = f"{s:05d}{i:04d}"
            photo = synthetic_photo(200 + 37 * i, 150 + 23 * s, seed=10 * s + i)
            fmt = {2: "PNG", 3: "WEBP"}.get(i, "JPEG")
            data = encode(photo, fmt) if i != 4 or s != 1 else b"<html>gone</html>"
            images[key] = data
            members += _sample(key, data, f"caption {key}")
        _tar(tmp_path / f"{s:05d}.tar", members)
    return tmp_path, images


def test_batches_equal_preprocess_on_the_same_bytes(shards):
    folder, images = shards
    it = starkret.preprocess_shards(str(folder / "{00000..00001}.tar"), batch_size=4)
    batches = list(it)
    assert [len(b) for b in batches] == [4, 4, 1]
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(k for k in images if k != "000010004")
    for batch in batches:
        ref = starkret.preprocess([images[k] for k in batch.keys])
        np.testing.assert_array_equal(batch.pixels, ref.pixels)
        assert batch.captions == [f"caption {k}" for k in batch.keys]
        assert batch.urls == [f"https://example.com/{k}.jpg" for k in batch.keys]
        assert all(json.loads(j)["key"] == k for j, k in zip(batch.jsons, batch.keys, strict=True))
    assert [k for b in batches for k in b.fallbacks] == ["000000003", "000010003"]
    assert it.failures == [("00001.tar", "000010004", "not an image: unrecognised data")]


def test_per_shard_batches_never_mix_shards(shards):
    folder, _ = shards
    batches = list(starkret.preprocess_shards(str(folder / "*.tar"), batch_size=3, per_shard=True))
    for batch in batches:
        assert len(set(batch.shards)) == 1
    assert [b.shards[0] for b in batches] == ["00000.tar", "00000.tar", "00001.tar", "00001.tar"]


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_other_dtypes(shards, dtype):
    folder, images = shards
    batch = next(iter(starkret.preprocess_shards(str(folder / "00000.tar"), dtype=dtype)))
    ref = starkret.preprocess([images[k] for k in batch.keys], dtype=dtype)
    assert batch.pixels.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(batch.pixels, ref.pixels)


def test_truncated_shard_keeps_its_complete_samples(tmp_path):
    members = []
    for i in range(4):
        members += _sample(f"k{i}", encode(synthetic_photo(120, 90, seed=i), "JPEG"), "c")
    whole = _tar(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        inside_k2 = tar.getmember("k2.jpg").offset_data + 100
    (tmp_path / "cut.tar").write_bytes(whole[:inside_k2])
    it = starkret.preprocess_shards(str(tmp_path / "cut.tar"))
    assert [k for b in it for k in b.keys] == ["k0", "k1"]
    ((_, key, reason),) = it.failures
    assert key == "k2" and reason.startswith("truncated tar: cut inside member 'k2.jpg'")


def test_abandoning_the_iterator_stops_cleanly(shards):
    folder, _ = shards
    it = starkret.preprocess_shards(str(folder / "*.tar"), batch_size=1, prefetch=1)
    next(it)
    del it  # background threads must notice and stop, not hang the process


def test_bad_arguments(shards, tmp_path):
    folder, _ = shards
    with pytest.raises(FileNotFoundError):
        starkret.preprocess_shards(str(tmp_path / "missing-*.tar"))
    with pytest.raises(ValueError, match="batch_size"):
        starkret.preprocess_shards(str(folder / "*.tar"), batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        starkret.preprocess_shards(str(folder / "*.tar"), mode="slow")


def test_pillow_agrees_the_broken_member_is_not_an_image(shards):
    _, images = shards
    with pytest.raises(PIL.UnidentifiedImageError):
        PIL.Image.open(io.BytesIO(images["000010004"]))


# ==== Output buffers recycled across a stream ====


@pytest.fixture
def long_shard(tmp_path):
    """One shard of 24 small JPEGs."""
    members = []
    for i in range(24):
        members += _sample(f"{i:04d}", encode(synthetic_photo(60 + i, 40, seed=i), "JPEG"), "c")
    return str(_tar(tmp_path / "long.tar", members))


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


@pytest.mark.parametrize("keep", ["batch", "view"])
def test_a_batch_buffer_is_not_reused_while_its_pixels_are_held(long_shard, keep):
    held, copies = [], []
    for batch in starkret.preprocess_shards(long_shard, batch_size=2, size=32, prefetch=1):
        held.append(batch if keep == "batch" else batch.pixels[1:])
        copies.append(np.array(batch.pixels[1:] if keep == "view" else batch.pixels))
    arrays = [h.pixels if keep == "batch" else h for h in held]
    assert len(arrays) == 12
    for array, copy in zip(arrays, copies, strict=True):
        assert np.array_equal(array, copy), "a held batch was overwritten by a later one"
    for i, a in enumerate(arrays):
        for b in arrays[i + 1 :]:
            assert not np.shares_memory(a, b)


def test_a_stream_recycles_the_buffers_of_batches_it_no_longer_needs(long_shard):
    addresses = []
    fresh = starkret.preprocess_shards(long_shard, batch_size=2, size=32, prefetch=1)
    want = [np.array(b.pixels) for b in fresh]
    for i, batch in enumerate(
        starkret.preprocess_shards(long_shard, batch_size=2, size=32, prefetch=1)
    ):
        assert batch.pixels.tobytes() == want[i].tobytes()
        addresses.append(_address(batch.pixels))
        del batch
    assert len(addresses) == 12
    assert len(set(addresses)) < len(addresses)


def test_a_long_stream_stops_faulting_in_fresh_output_memory(tmp_path):
    """Batches of 43 MB, over glibc's largest mmap threshold (32 MB): a fresh array per
    batch is fresh memory from the kernel every time, faulted in (and zeroed) page by
    page, a sixth of a one-thread stream's time. The stream's buffers are reused."""
    import resource

    photo = encode(synthetic_photo(64, 64, seed=1), "JPEG")
    members = []
    for i in range(6 * 32):
        members += _sample(f"{i:04d}", photo, "c")
    shard = str(_tar(tmp_path / "big.tar", members))
    faults = []
    stream = starkret.preprocess_shards(shard, batch_size=32, size=336, threads=1, prefetch=1)
    for batch in stream:
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        assert batch.pixels.shape == (32, 3, 336, 336)
        del batch
    assert len(faults) == 6
    # a fresh 43 MB batch: ~880 faults here (2 MiB pages where the kernel has them)
    per_batch = [b - a for a, b in itertools.pairwise(faults[2:])]
    assert max(per_batch) < 15, per_batch


# ==== folder and table sources: pooled output arrays ====


def _raw_stream(n_batches: int, per_batch: int = 3):
    from starkret.ingest.sources import _RawBatch

    for b in range(n_batches):
        photos = [synthetic_photo(40 + i, 30 + b, seed=b * 10 + i) for i in range(per_batch)]
        images = [encode(photo, "JPEG") for photo in photos]
        keys = [f"{b}-{i}" for i in range(per_batch)]
        yield _RawBatch(images, keys, [None] * per_batch, f"part{b}", [])


def test_folder_batches_reuse_output_arrays_only_once_dropped(monkeypatch):
    """Folder and table sources preprocessed every batch into a fresh array (the kernel
    zeroing new memory each time); now they reuse pooled arrays, never one still held."""
    from starkret.ingest import sources
    from starkret.ingest.sources import PreprocessOptions, _prefetched

    targets = []

    def spy(images, **kwargs):
        out = kwargs.get("out")
        targets.append(None if out is None else id(out))
        return starkret.preprocess(images, **kwargs)

    options = PreprocessOptions(size=32, batch_size=3, threads=1)
    fresh = [
        b.pixels.copy()
        for b in _prefetched(_raw_stream(12), options)  # copies: the reference bytes
    ]
    monkeypatch.setattr(sources, "preprocess", spy)
    held = []
    for i, batch in enumerate(_prefetched(_raw_stream(12), options)):
        if i % 4 == 0:
            held.append((i, batch.pixels[1:]))  # a view keeps its array in use
        np.testing.assert_array_equal(batch.pixels, fresh[i])
    for i, view in held:  # never overwritten by a later batch
        np.testing.assert_array_equal(view, fresh[i][1:])
    for (_, a), (_, b) in itertools.combinations(held, 2):
        assert not np.shares_memory(a, b)
    assert len(targets) == 12 and None not in targets
    assert len(set(targets)) < 12  # dropped arrays came back


def test_output_pool_hands_out_no_array_in_use():
    from starkret.ingest.preprocess import OutputPool

    pool = OutputPool(size=8, dtype="float16", layout="chw", limit=2)
    a = pool.take(5)
    b = pool.take(3)
    assert not np.shares_memory(a, b)
    view = b[1:]
    del b
    c = pool.take(2)
    assert not np.shares_memory(c, view) and not np.shares_memory(c, a)
    del a
    assert pool.take(5) is pool._buffers[0]
    big = pool.take(50)  # none large enough: a new array, the pool stays at its limit
    assert big.shape == (50, 3, 8, 8) and len(pool._buffers) == 2
