"""embed-shards end to end against the model alone and against clip-retrieval's approach.

Same shards (img2dataset-style: 256 px JPEGs with captions), same model, same batch
size, same run:
- ``starkret.embed``: Rust shard reader + decoder threads feeding the model, writing
  the clip-retrieval layout (the number includes the writes);
- model forward alone on ready tensors (the ceiling: the pipeline ratio is the target,
  >= 0.9 means the model never waits for data);
- clip-retrieval's approach: webdataset + PIL + open_clip transform in torch DataLoader
  worker processes (one per core), model in the main process.
On CPU this uses ``starkret-tiny``; on a GPU pass ``--embed-model ViT-L-14-336-quickgelu``
(random weights are fine for speed).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from common import Row


def add_arguments(parser) -> None:
    group = parser.add_argument_group("embed")
    group.add_argument("--embed-model", default="starkret-tiny", help="open_clip model name")
    group.add_argument("--embed-batch", type=int, default=64, help="batch size")
    group.add_argument("--embed-images", type=int, default=1024, help="images in the shards")


def _make_shards(folder: Path, n: int, per_shard: int = 256) -> list[str]:
    from starkret.testing import encode, synthetic_photo

    photos = [encode(synthetic_photo(256, 256, seed=i), "JPEG", quality=90) for i in range(64)]
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(s + per_shard, n)):
                for ext, data in (
                    ("jpg", photos[i % 64]),
                    ("txt", f"photo {i}".encode()),
                    ("json", json.dumps({"url": f"http://x/{i}"}).encode()),
                ):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _clip_retrieval_style(paths, embedder, batch, workers) -> float:
    import open_clip
    import torch
    import webdataset as wds

    transform = open_clip.image_transform(embedder.image_size, is_train=False)
    dataset = (
        wds.WebDataset(paths, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(transform, lambda t: t)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    n = 0
    for pixels, _captions in loader:
        embedder.encode_images(pixels)
        n += len(pixels)
    return n / (time.perf_counter() - start)


def run(args) -> list[Row]:
    import torch

    import starkret

    n = 256 if args.quick else args.embed_images
    cores = os.cpu_count() or 1
    embedder = starkret.ClipEmbedder(args.embed_model, pretrained=None, batch_size=args.embed_batch)
    device = embedder.device.type
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = _make_shards(Path(tmp), n)
        # warm-up: first forward passes allocate and pick kernels
        embedder.encode_images(
            np.zeros((args.embed_batch, 3, embedder.image_size, embedder.image_size), np.float32)
        )
        report = starkret.embed(
            paths,
            Path(tmp) / "out",
            source_name="bench",
            embedder=embedder,
            batch_size=args.embed_batch,
            progress=False,
        )
        ours = report.images_per_second

        pixels = np.random.default_rng(0).standard_normal(
            (args.embed_batch, 3, embedder.image_size, embedder.image_size), dtype=np.float32
        )
        if device == "cuda":
            pixels = pixels.astype(np.float16)
        batches = max(1, n // args.embed_batch)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            embedder.encode_images(pixels)
        model_only = batches * args.embed_batch / (time.perf_counter() - start)

        reference = _clip_retrieval_style(paths, embedder, args.embed_batch, cores)
    case = f"{args.embed_model} b{args.embed_batch} {device}, 256px JPEG shards"
    rows.append(Row("embed pipeline", case, ours, model_only, "model forward alone", "images/s"))
    rows.append(
        Row(
            "embed pipeline",
            case,
            ours,
            reference,
            f"webdataset+PIL DataLoader x{cores} workers",
            "images/s",
        )
    )
    return rows
