"""The README's main job on generated example data, offline, with the bundled starkret-mini model.

It builds a small cc12m-like source (img2dataset-style webdataset shards of generated
"photos": coloured shapes on plain, striped or dotted backgrounds) and a chartqa-like
image folder (bar, line and pie charts and box diagrams), embeds both with
`starkret.embed` (Rust shard reader and bit-exact preprocessing feeding the CLIP image
tower), runs it again to show resume, indexes them, searches, aligns the bundled
Stark-style dialogues (examples/stark_dialogues.jsonl, whose image descriptions match
planted images) with an HTML report, and evaluates Recall/MRR on examples/eval_pairs.jsonl.

starkret-mini is a small CLIP trained from scratch on real drawings (clip art, emoji) and
`starkret.testing.synthetic` scenes: it checks the install and the whole chain; it knows
nothing of photos. The demo ends with its recall on held-out real drawings
(examples/clipart_heldout) and on shapes and charts drawn by other code
(`starkret.testing.drawings`), not only on the generator's pictures.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import starkret
from starkret.align.dialogue import align_file
from starkret.align.eval import evaluate, read_pairs
from starkret.align.report import write_report
from starkret.testing import drawings, synthetic

OUT = Path("demo-output")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# Images the example dialogues and eval pairs talk about, planted among random ones:
# (key, attributes). Keys are those of examples/*.jsonl.
PHOTO = {"size": "large", "pattern": "plain", "position": None}
PLANTED_PHOTOS = {
    "000000003": dict(PHOTO, count=3, colour="red", shape="star", background="yellow"),
    "000000017": dict(
        PHOTO,
        count=1,
        colour="blue",
        shape="circle",
        background="white",
        size="small",
        position="left",
    ),
    "000010005": dict(
        PHOTO, count=2, colour="green", shape="triangle", background="grey", pattern="striped"
    ),
    "000010022": dict(
        PHOTO,
        count=4,
        colour="pink",
        shape="square",
        background="blue",
        size="small",
        pattern="dotted",
    ),
    "000020008": dict(
        PHOTO, count=1, colour="orange", shape="cross", background="brown", position="centre"
    ),
}
CHART = {"background": "white", "grid": False, "topic": "monthly rainfall"}
PLANTED_CHARTS = {
    "chart_003.png": dict(CHART, chart="bar", colour="blue", count=4, orientation="vertical"),
    "chart_011.png": dict(
        CHART, chart="line", colour="green", count=1, trend="up", topic="sales by region"
    ),
    "chart_020.png": dict(CHART, chart="pie", colour="purple", count=5, topic="votes per party"),
    "chart_027.png": dict(
        CHART, chart="diagram", colour="yellow", count=3, orientation="row", background="dark"
    ),
}


def make_sources() -> None:
    """40 photos in each of three shards (one truncated download) and 36 charts."""
    planted = {synthetic.captions("photo", a)[0] for a in PLANTED_PHOTOS.values()}
    planted |= {synthetic.captions("chart", a)[0] for a in PLANTED_CHARTS.values()}
    photos = iter(s for s in synthetic.gallery(10, 200, kind="photo") if s.caption not in planted)
    charts = iter(s for s in synthetic.gallery(11, 80, kind="chart") if s.caption not in planted)
    shards = OUT / "sources" / "cc12m"
    shards.mkdir(parents=True, exist_ok=True)
    for s in range(3):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(40):
                key = f"{s:05d}{i:04d}"
                if key in PLANTED_PHOTOS:
                    item = synthetic.make("photo", PLANTED_PHOTOS[key], seed=i)
                else:
                    item = next(photos)
                photo, ext = item.data, "jpg" if item.format == "JPEG" else "png"
                if (s, i) == (2, 39):
                    photo = photo[: len(photo) // 2]  # a truncated download: recorded, not fatal
                meta = {"url": f"https://example.com/{key}.{ext}", "key": key}
                for name, data in (
                    (ext, photo),
                    ("txt", item.captions[1].encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    folder = OUT / "sources" / "chartqa" / "png"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(36):
        name = f"chart_{i:03d}.png"
        if name in PLANTED_CHARTS:
            item = synthetic.make(
                "chart", PLANTED_CHARTS[name], width=480, height=360, seed=i, format="PNG"
            )
        else:
            item = next(charts)
        # ChartQA ships PNG files; whatever the generator encoded, store it as PNG.
        data = item.data if item.format == "PNG" else _as_png(item.data)
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(item.captions[1])


def _as_png(data: bytes) -> bytes:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.open(io.BytesIO(data)).save(buf, "PNG")
    return buf.getvalue()


def _gallery_recall(emb, name: str, galleries: list[list[tuple[bytes, str]]]) -> str:
    """Embed each gallery as a source of its own, search every caption, rank it among
    its own gallery: R@1 / R@5 in %."""
    db_dir = OUT / "heldout" / name
    truth = []
    for g, pairs in enumerate(galleries):
        folder = OUT / "heldout" / f"{name}-images" / f"g{g}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, (data, caption) in enumerate(pairs):
            (folder / f"{i:03d}.png").write_bytes(data)
            truth.append((f"g{g}", f"g{g}/{i:03d}.png", caption))
        starkret.embed(folder, db_dir / f"g{g}", source_name=f"g{g}", embedder=emb, progress=False)
        starkret.build_index(db_dir / f"g{g}", kind="auto")
    db = starkret.ImageDB.open(db_dir, embedder=emb)
    ranks = []
    for (source, key, _), hits in zip(truth, db.search([t[2] for t in truth], k=5), strict=True):
        ranked = [h.key for h in sorted(hits, key=lambda h: -h.score) if h.source == source]
        ranks.append(ranked.index(key) + 1 if key in ranked else 6)
    r1 = 100 * sum(r == 1 for r in ranks) / len(ranks)
    r5 = 100 * sum(r <= 5 for r in ranks) / len(ranks)
    size = len(galleries[0])
    return (
        f"R@1 {r1:.1f}  R@5 {r5:.1f}  over {len(ranks)} captions, galleries of {size} "
        f"(chance R@1 {100 / size:.1f})"
    )


def heldout_eval(emb) -> None:
    """What the model does on pictures its training never saw, beyond the generator."""
    rows = [
        json.loads(line)
        for line in (EXAMPLES / "clipart_heldout" / "captions.jsonl").open(encoding="utf-8")
    ]
    pairs = [((EXAMPLES / "clipart_heldout" / r["file"]).read_bytes(), r["caption"]) for r in rows]
    print(
        f"eval     real held-out drawings (examples/clipart_heldout): "
        f"{_gallery_recall(emb, 'clipart', [pairs[:100], pairs[100:200]])}"
    )
    drawn = [(d.data, d.caption) for d in drawings.scenes()]
    print(
        f"eval     shapes and charts drawn by other code (starkret.testing.drawings): "
        f"{_gallery_recall(emb, 'drawings', [drawn])}"
    )


def main() -> None:
    started = time.perf_counter()
    print(f"starkret {starkret.__version__} demo (CPU, offline)")
    print("NOTE: starkret-mini is a SMALL CLIP (96 px, ~10 MB) trained on a CPU on ~8,000 clip-art")
    print("      drawings and emoji and on generated shapes and charts (scripts/train_mini.py): it")
    print("      checks the install and the whole chain, finds drawings by their description (its")
    print("      recall on held-out drawings is printed at the end) and knows nothing of photos.")
    print("      For real data use OpenAI CLIP, as Stark does:")
    print("      --model ViT-L-14-336-quickgelu --pretrained openai (or a local checkpoint file)")
    print("      on a machine that can download the weights.\n")
    shutil.rmtree(OUT, ignore_errors=True)
    make_sources()
    emb = starkret.ClipEmbedder(starkret.MINI_MODEL, device="cpu")
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
    queries = [
        "three large red stars on a yellow background",
        "a pie chart with five purple slices",
        "a photo of my cat asleep on the sofa",
    ]
    for query, hits in zip(queries, db.search(queries, k=2), strict=True):
        print(f"search   {query!r}:")
        for h in sorted(hits, key=lambda h: -h.score)[:3]:
            print(f"           {h.score:+.3f} {h.source:8} {h.key:28} {h.caption}")
    print("         (the demo DB holds no cat and no sofa: low scores, as it should)")

    # The aligner's defaults: min_score=0.2, near_duplicate_threshold=0.94.
    aligner = starkret.Aligner(db, k_per_source=3)
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
    # The keys as aligned.jsonl stores them (images_key: Stark's url:UUID / UUID), and where
    # each image is in the DB.
    for line in (OUT / "aligned.jsonl").read_text(encoding="utf-8").splitlines():
        for a in json.loads(line)["alignments"]:
            image = a["images"][0] if a["images"] else {"key": "-", "db_key": ""}
            print(
                f"  {a['moment_id']:24} {a['status']:6} {image['key']:40} "
                f"{image['db_key']:22} {a['description']}"
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
        f"R@10 {result.recall_at_10:.1f}  MRR {result.mrr:.1f}  over {result.count} pairs, "
        f"gallery of {len(db)} images (chance R@1 {100 / len(db):.1f})"
    )
    heldout_eval(emb)
    print(f"outputs: {OUT}/aligned.jsonl, {OUT}/aligned.jsonl.images.jsonl, {OUT}/report.html")
    print(f"\ndone in {time.perf_counter() - started:.1f} s; outputs in {OUT}/")


if __name__ == "__main__":
    main()
