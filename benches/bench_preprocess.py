"""Decode + CLIP preprocessing: starkret (Rust) against PIL + open_clip's transform.

Same JPEGs, same run. One core: starkret with one thread against the transform in this
process (torch pinned to one thread). All cores: starkret's thread pool against one
transform process per core, as clip-retrieval's DataLoader workers would run it.
Also prints the bit-exact share and the fallback share on a mixed-format corpus.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os

import numpy as np
from common import Row, best_rate

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


def run(args) -> list[Row]:
    import starkret

    cores = os.cpu_count() or 1
    n = 24 if args.quick else args.preprocess_images
    repeats = 1 if args.quick else 3
    rows = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(cores, initializer=_reference_worker_init) as pool:
        _reference_worker_init()
        for name, (w, h) in CLASSES.items():
            images = _corpus(w, h, n)
            chunks = [images[i::cores] for i in range(cores)]
            ref1 = best_rate(lambda images=images: _reference_chunk(images), n, repeats=repeats)
            refn = best_rate(
                lambda chunks=chunks: sum(pool.map(_reference_chunk, chunks)), n, repeats=repeats
            )
            for mode in ("exact", "fast"):
                ours1 = best_rate(
                    lambda images=images, mode=mode: starkret.preprocess(
                        images, mode=mode, threads=1
                    ),
                    n,
                    repeats=repeats,
                )
                oursn = best_rate(
                    lambda images=images, mode=mode: starkret.preprocess(
                        images, mode=mode, threads=cores
                    ),
                    n,
                    repeats=repeats,
                )
                rows.append(
                    Row(
                        "preprocess",
                        f"{name} {mode} 1 core",
                        ours1,
                        ref1,
                        "PIL+open_clip",
                        "images/s",
                    )
                )
                rows.append(
                    Row(
                        "preprocess",
                        f"{name} {mode} {cores} cores",
                        oursn,
                        refn,
                        f"PIL+open_clip x{cores} procs",
                        "images/s",
                    )
                )
                rows.append(
                    Row(
                        "preprocess scaling",
                        f"{name} {mode}",
                        oursn,
                        ours1,
                        f"starkret 1 core (ideal {cores}x)",
                        "images/s",
                    )
                )
    for line in _parity_lines(args.quick):
        print(line, flush=True)
    return rows
