"""The README's main job on generated example data, offline, with the tiny random-weight model.

It builds a small cc12m-like source (img2dataset-style webdataset shards of photos)
and a chartqa-like image folder, embeds both with `starkret.embed` (Rust shard reader
and bit-exact preprocessing feeding the CLIP image tower), runs the same command again
to show resume, and looks up a few descriptions. Indexing and dialogue alignment join
as they land.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pyarrow.parquet as pq

import starkret
from starkret.testing import encode, synthetic_photo

OUT = Path("demo-output")


def make_sources() -> None:
    shards = OUT / "sources" / "cc12m"
    shards.mkdir(parents=True, exist_ok=True)
    captions = ["a dog on a beach", "a red bicycle", "sunset over the sea", "a city street"]
    for s in range(3):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(16):
                key = f"{s:05d}{i:04d}"
                photo = encode(synthetic_photo(256, 256, seed=s * 100 + i), "JPEG", quality=90)
                if (s, i) == (2, 15):
                    photo = photo[: len(photo) // 2]  # a truncated download: recorded, not fatal
                meta = {"url": f"https://example.com/{key}.jpg", "key": key}
                for ext, data in (
                    ("jpg", photo),
                    ("txt", captions[i % 4].encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    charts = OUT / "sources" / "chartqa" / "png"
    charts.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        image = PIL.Image.new("RGB", (480, 360), "white")
        draw = PIL.ImageDraw.Draw(image)
        for b, height in enumerate(rng.integers(40, 300, 6)):
            draw.rectangle([40 + 70 * b, 330 - int(height), 90 + 70 * b, 330], fill=(60, 90, 200))
        image.save(charts / f"chart_{i:03d}.png")
        (charts / f"chart_{i:03d}.txt").write_text(f"bar chart number {i}")


def main() -> None:
    started = time.perf_counter()
    print(f"starkret {starkret.__version__} demo (CPU, offline)")
    print("NOTE: starkret-tiny has RANDOM weights: embeddings and scores below carry no meaning.")
    print("      For real retrieval: --model ViT-L-14-336-quickgelu --pretrained openai")
    print("      (or a local checkpoint file) on a machine that can download the weights.\n")
    shutil.rmtree(OUT, ignore_errors=True)
    make_sources()
    emb = starkret.ClipEmbedder(starkret.TINY_MODEL, device="cpu")
    for source, inputs in (
        ("cc12m", str(OUT / "sources/cc12m/{00000..00002}.tar")),
        ("chartqa", OUT / "sources/chartqa/png"),
    ):
        report = starkret.embed(
            inputs,
            OUT / "db" / source,
            source_name=source,
            embedder=emb,
            batch_size=16,
            chunk_size=8,
            progress=False,
        )
        print(f"{source:8} {report.summary()}")
    again = starkret.embed(
        str(OUT / "sources/cc12m/{00000..00002}.tar"),
        OUT / "db" / "cc12m",
        source_name="cc12m",
        embedder=emb,
        progress=False,
    )
    print(f"re-run   {again.summary()}")

    vectors, keys = [], []
    for source in ("cc12m", "chartqa"):
        for meta in sorted((OUT / "db" / source / "metadata").glob("*.parquet")):
            part = meta.stem.rsplit("_", 1)[1]
            vectors.append(np.load(OUT / "db" / source / "img_emb" / f"img_emb_{part}.npy"))
            keys += pq.read_table(meta, columns=["key"]).column(0).to_pylist()
    matrix = np.concatenate(vectors).astype(np.float32)
    queries = ["a golden retriever running on a beach", "a bar chart of monthly rainfall"]
    scores = emb.encode_texts(queries, dtype="float32") @ matrix.T
    print(f"\nbrute-force lookup over {len(keys)} images (the index arrives with `build-index`):")
    for query, row in zip(queries, scores, strict=True):
        best = np.argsort(-row)[:3]
        hits = ", ".join(f"{keys[i]} ({row[i]:+.3f})" for i in best)
        print(f"  {query!r}: {hits}")
    print(f"\ndone in {time.perf_counter() - started:.1f} s; outputs in {OUT}/")


if __name__ == "__main__":
    main()
