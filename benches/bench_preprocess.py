"""Decode + CLIP preprocessing: starkret (Rust) against PIL + open_clip's transform.

Same JPEGs, same run. One core: starkret with one thread against the transform in this
process (torch pinned to one thread). All cores: starkret's thread pool against one
transform process per core, as clip-retrieval's DataLoader workers would run it.
Also prints the bit-exact share and the fallback share on a mixed-format corpus.

Each row gives the best and the median of its repeats: stalls (page faults, a busy
machine) pull the median down while the best stays. Two rows watch for them directly:
the first second of a fresh process's loop against the same loop once warm (a ratio
well under 1 is a start-up stall), and a loop writing into one reused array (``out=``)
against one that gets a fresh array per call (the kernel faults in and zeroes that
memory every call).
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys

import numpy as np
from common import Row, rates

CLASSES = {
    "256px (CC12M)": (256, 256),
    "640x480 photo": (640, 480),
    "1280x960 photo": (1280, 960),
}


def add_arguments(parser) -> None:
    group = parser.add_argument_group("preprocess")
    group.add_argument("--preprocess-images", type=int, default=120, help="images per class")


def _corpus(w: int, h: int, n: int) -> list[bytes]:
    from starkret.testing import encode, synthetic_photo

    return [encode(synthetic_photo(w, h, seed=i), "JPEG", quality=90) for i in range(n)]


_transform = None


def _reference_worker_init() -> None:
    import open_clip
    import torch

    global _transform
    torch.set_num_threads(1)
    _transform = open_clip.image_transform(
        336, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )


def _reference_chunk(chunk: list[bytes]) -> int:
    import PIL.Image

    for data in chunk:
        _transform(PIL.Image.open(io.BytesIO(data)))
    return len(chunk)


def _parity_lines(quick: bool) -> list[str]:
    import starkret
    from starkret.ingest.preprocess import reference_crop
    from starkret.testing import encode, synthetic_photo

    rng = np.random.default_rng(0)
    images = []
    for i in range(12 if quick else 60):
        w, h = (int(v) for v in rng.integers(64, 900, 2))
        photo = synthetic_photo(w, h, seed=i)
        fmt, mode = [
            ("JPEG", "RGB"),
            ("JPEG", "L"),
            ("PNG", "RGB"),
            ("PNG", "RGBA"),
            ("PNG", "P"),
            ("WEBP", "RGB"),
        ][i % 6]
        import PIL.Image

        image = PIL.Image.fromarray(photo)
        image = image.quantize(64) if mode == "P" else image.convert(mode)
        images.append(encode(image, fmt))
    batch = starkret.preprocess(images, dtype="uint8")
    exact = sum(
        np.array_equal(batch.pixels[k].transpose(1, 2, 0), reference_crop(images[i]))
        for k, i in enumerate(batch.index.tolist())
    )
    n = len(images)
    return [
        f"  parity on {n} mixed images (JPEG RGB/L, PNG RGB/RGBA/P, WebP): "
        f"bit-exact {exact}/{n} ({100 * exact / n:.0f}%), "
        f"Pillow fallback {len(batch.fallbacks)}/{n} ({100 * len(batch.fallbacks) / n:.0f}%)"
    ]


#: A fresh process's loop: images/s in its first second and once warm (seconds 1 to 3).
_FIRST_SECOND = """
import json, sys, time
import starkret
from starkret.testing import encode, synthetic_photo
n, side = int(sys.argv[1]), int(sys.argv[2])
images = [encode(synthetic_photo(side, side, seed=i), "JPEG", quality=90) for i in range(n)]
done, start, first = 0, time.perf_counter(), None
while True:
    starkret.preprocess(images, mode="exact", threads=1)
    done += n
    elapsed = time.perf_counter() - start
    if first is None and elapsed >= 1.0:
        first, first_done, first_at = done / elapsed, done, elapsed
    if elapsed >= 3.0:
        break
print(json.dumps({"first": first, "warm": (done - first_done) / (elapsed - first_at)}))
"""


def _fresh_process_rates(n: int, side: int, repeats: int) -> tuple[list[float], list[float]]:
    """(first-second rates, warm rates) of ``repeats`` fresh processes."""
    first, warm = [], []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", _FIRST_SECOND, str(n), str(side)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        result = json.loads(done.stdout)
        first.append(result["first"])
        warm.append(result["warm"])
    return first, warm


def _stall_rows(n: int, repeats: int) -> list[Row]:
    """The fresh-process row and the reused-array row (256 px, exact, one thread)."""
    import starkret

    images = _corpus(256, 256, n)
    first, warm = _fresh_process_rates(n, 256, repeats)
    out = np.empty((n, 3, 336, 336), dtype=np.float32)
    reused = rates(lambda: starkret.preprocess(images, threads=1, out=out), n, repeats=2 * repeats)
    fresh = rates(lambda: starkret.preprocess(images, threads=1), n, repeats=2 * repeats)
    return [
        Row(
            "preprocess stalls",
            "256px exact 1 core, fresh process, first second",
            max(first),
            max(warm),
            "same loop, seconds 1-3",
            "images/s",
            statistics.median(first),
            statistics.median(warm),
        ),
        Row(
            "preprocess stalls",
            "256px exact 1 core, into one reused array (out=)",
            reused[0],
            fresh[0],
            "a fresh array per call",
            "images/s",
            reused[1],
            fresh[1],
        ),
    ]


def run(args) -> list[Row]:
    import starkret

    cores = os.cpu_count() or 1
    n = 24 if args.quick else args.preprocess_images
    repeats = 1 if args.quick else 5
    rows = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(cores, initializer=_reference_worker_init) as pool:
        _reference_worker_init()
        for name, (w, h) in CLASSES.items():
            images = _corpus(w, h, n)
            chunks = [images[i::cores] for i in range(cores)]
            ref1 = rates(lambda images=images: _reference_chunk(images), n, repeats=repeats)
            refn = rates(
                lambda chunks=chunks: sum(pool.map(_reference_chunk, chunks)), n, repeats=repeats
            )
            for mode in ("exact", "fast"):
                ours1 = rates(
                    lambda images=images, mode=mode: starkret.preprocess(
                        images, mode=mode, threads=1
                    ),
                    n,
                    repeats=repeats,
                )
                oursn = rates(
                    lambda images=images, mode=mode: starkret.preprocess(
                        images, mode=mode, threads=cores
                    ),
                    n,
                    repeats=repeats,
                )
                rows += [
                    Row(
                        "preprocess",
                        f"{name} {mode} 1 core",
                        ours1[0],
                        ref1[0],
                        "PIL+open_clip",
                        "images/s",
                        ours1[1],
                        ref1[1],
                    ),
                    Row(
                        "preprocess",
                        f"{name} {mode} {cores} cores",
                        oursn[0],
                        refn[0],
                        f"PIL+open_clip x{cores} procs",
                        "images/s",
                        oursn[1],
                        refn[1],
                    ),
                    Row(
                        "preprocess scaling",
                        f"{name} {mode}",
                        oursn[0],
                        ours1[0],
                        f"starkret 1 core (ideal {cores}x)",
                        "images/s",
                        oursn[1],
                        ours1[1],
                    ),
                ]
    rows += _stall_rows(n, 1 if args.quick else 3)
    for line in _parity_lines(args.quick):
        print(line, flush=True)
    return rows
