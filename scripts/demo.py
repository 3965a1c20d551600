"""The README's main job on generated example data, offline, with the tiny random-weight model.

It builds a small cc12m-like source (img2dataset-style webdataset shards of photos)
and a chartqa-like image folder, embeds both with `starkret.embed` (Rust shard reader
and bit-exact preprocessing feeding the CLIP image tower), runs it again to show
resume, indexes them, searches, aligns the bundled Stark-style dialogues
(examples/stark_dialogues.jsonl) with an HTML report, and evaluates Recall/MRR on
examples/eval_pairs.jsonl.
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

import starkret
from starkret.dialogue import align_file
from starkret.eval import evaluate, read_pairs
from starkret.report import write_report
from starkret.testing import encode, synthetic_photo

OUT = Path("demo-output")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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

    for source in ("cc12m", "chartqa"):
        infos = starkret.build_index(OUT / "db" / source, kind="auto")
        print(f"index    {source}: {infos['kind']} over {infos['count']} images")

    db = starkret.ImageDB.open(OUT / "db", embedder=emb)
    print(f"\n{db!r}")
    for query, hits in zip(
        ["a golden retriever running on a beach"],
        db.search(["a golden retriever running on a beach"], k=2),
        strict=True,
    ):
        print(f"search   {query!r}:")
        for h in hits:
            print(f"           {h.score:+.3f} {h.source:8} {h.key}")

    # A random-weight model scores every text-image pair below 0.2 and maps all images
    # close together (cosine ~0.96), so the demo relaxes both rules; with real CLIP
    # weights keep the defaults (min_score=0.2, near_duplicate_threshold=0.94).
    aligner = starkret.Aligner(db, k_per_source=3, min_score=-1.0,
                               near_duplicate_threshold=0.999)
    report = align_file(
        db,
        EXAMPLES / "stark_dialogues.jsonl",
        OUT / "aligned.jsonl",
        aligner=aligner,
        progress=False,
        keep=True,
    )
    print(f"\nalign    {report.summary()}")
    write_report(db, report.alignments, OUT / "report.html")
    for a in report.alignments:
        print(
            f"  {a.moment_id:24} {a.status:6} {a.images[0].stark_key if a.images else '-':45} "
            f"{a.description}"
        )
    again = align_file(
        db,
        EXAMPLES / "stark_dialogues.jsonl",
        OUT / "aligned.jsonl",
        aligner=aligner,
        progress=False,
    )
    print(f"re-run   {again.summary()}")
    result = evaluate(db, read_pairs(EXAMPLES / "eval_pairs.jsonl"))
    print(
        f"\neval     R@1 {result.recall_at_1:.1f}  R@5 {result.recall_at_5:.1f}  "
        f"R@10 {result.recall_at_10:.1f}  MRR {result.mrr:.1f}  over {result.count} pairs "
        "(random weights: chance level)"
    )
    print(f"outputs: {OUT}/aligned.jsonl, {OUT}/aligned.jsonl.images.jsonl, {OUT}/report.html")
    print(f"\ndone in {time.perf_counter() - started:.1f} s; outputs in {OUT}/")


if __name__ == "__main__":
    main()
