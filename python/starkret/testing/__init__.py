"""Synthetic images for starkret's tests, benchmarks and demo (no downloads needed).

The photos are smooth colour fields with texture and edges, so JPEG compresses them
like real photographs (a flat or pure-noise image would not exercise the decoder).
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib

import numpy as np

__all__ = [
    "encode",
    "raw_png",
    "run_img2dataset",
    "serve_directory",
    "synthetic_photo",
    "write_manifest",
    "write_part",
    "write_source",
]


def synthetic_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 photo-like image: gradients, blobs, edges and grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= max(width - 1, 1)
    y /= max(height - 1, 1)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(0.5, 4.0, 3)
        img[..., c] = 0.5 + 0.35 * np.sin(a * np.pi * x + p) * np.cos(b * np.pi * y + c)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
        img[mask] = rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def encode(image, fmt: str, **options) -> bytes:
    """Encode a PIL image or an (H, W[, C]) uint8 array with Pillow (``fmt``: JPEG, PNG, ...)."""
    import PIL.Image

    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(
    rows: np.ndarray,
    *,
    width: int,
    height: int,
    color_type: int,
    bit_depth: int,
    palette: bytes | None = None,
) -> bytes:
    """A PNG written byte by byte, for modes Pillow cannot save (16-bit RGB, 2-bit gray...).

    ``rows`` holds the already packed scanline bytes, (n_rows, bytes_per_row) uint8;
    fewer rows than ``height`` make a truncated image (or, large, a decompression bomb).
    """
    out = b"\x89PNG\r\n\x1a\n"
    out += _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        out += _chunk(b"PLTE", palette)
    raw = b"".join(b"\x00" + bytes(row) for row in np.asarray(rows, np.uint8))
    out += _chunk(b"IDAT", zlib.compress(raw))
    return out + _chunk(b"IEND", b"")


def write_source(
    folder,
    source: str,
    vectors: np.ndarray,
    *,
    keys: list[str] | None = None,
    urls: list[str | None] | None = None,
    captions: list[str | None] | None = None,
    part_size: int = 1000,
    model: str = "starkret-tiny",
    pretrained: str | None = None,
) -> None:
    """Write planted ``vectors`` as an ``embed-shards`` output (for tests of search and
    alignment, which need embeddings of known geometry rather than a random model's)."""
    n, dim = vectors.shape
    keys = keys or [f"{i:09d}" for i in range(n)]
    urls = urls or [f"https://img.example/{source}/{k}.jpg" for k in keys]
    captions = captions or [None] * n
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for part, start in enumerate(range(0, max(n, 1), part_size)):
        stop = min(start + part_size, n)
        write_part(
            folder,
            source,
            part,
            keys[start:stop],
            unit[start:stop],
            urls=urls[start:stop],
            captions=captions[start:stop],
            shard=f"part{part}",
        )
    write_manifest(folder, source, dim, n, model=model, pretrained=pretrained)


def write_part(
    folder,
    source: str,
    part: int,
    keys: list[str],
    vectors: np.ndarray | None,
    *,
    urls: list[str | None],
    captions: list[str | None],
    size: tuple[int | None, int | None] = (None, None),
    shard: str,
) -> None:
    """Part ``part`` of an ``embed-shards`` output: its rows' ``vectors`` (saved as
    float16; ``None``: the caller puts ``layout.part_file(folder, "img_emb", part)`` there
    itself) and the metadata of rows with ``keys``. Creates the output's folders."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    from starkret.store.layout import part_file

    folder = Path(folder)
    for sub in ("img_emb", "metadata", "failures"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    if vectors is not None:
        np.save(part_file(folder, "img_emb", part), vectors.astype(np.float16))
    n = len(keys)
    pq.write_table(
        pa.table(
            {
                "key": [f"{source}/{k}" for k in keys],
                "sample_key": list(keys),
                "source": [source] * n,
                "url": list(urls),
                "caption": pa.array(list(captions), pa.string()),
                "width": pa.array([size[0]] * n, pa.int32()),
                "height": pa.array([size[1]] * n, pa.int32()),
                "shard": [shard] * n,
                "id": [(part << 32) | i for i in range(n)],
            }
        ),
        part_file(folder, "metadata", part),
    )


def write_manifest(
    folder, source: str, dim: int, count: int, *, model: str, pretrained: str | None
) -> None:
    """The ``starkret.json`` of a complete ``embed-shards`` output written by the helpers
    above (exact 336-px preprocessing with OpenAI's mean and std)."""
    import json
    from pathlib import Path

    from starkret.ingest.preprocess import OPENAI_MEAN, OPENAI_STD

    manifest = {
        "model": model,
        "pretrained": pretrained,
        "dim": dim,
        "image_size": 336,
        "preprocess_mode": "exact",
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "source": source,
        "complete": True,
        "count": count,
        "failed": 0,
    }
    (Path(folder) / "starkret.json").write_text(json.dumps(manifest))


def reference_select(
    moments, *, reuse: str, threshold: float, min_score: float, used=(), shown=None
):
    """A straightforward Python version of the aligner's choice (the Rust code's spec).

    ``moments``: dicts with ``episode``, ``k``, ``ids``, ``scores`` (best first) and
    ``vectors`` (one unit row per candidate). ``used``: ids already used anywhere (for
    ``reuse="global"``); ``shown``: ``{episode: [(id, vector), ...]}``, images episodes
    showed before these moments (used and chosen there). Returns ``(picked indices,
    outcome)`` per moment with outcome ``"ok"``, ``"below_threshold"`` or ``"exhausted"``.
    """
    shown = shown or {}
    out = []
    episode, used_episode, chosen = None, set(), []
    used_global = set(used) | {cid for images in shown.values() for cid, _ in images}
    for m in moments:
        if m["episode"] != episode:
            episode = m["episode"]
            before = shown.get(episode, [])
            used_episode = {cid for cid, _ in before}
            chosen = [np.asarray(v, np.float32) for _, v in before]
        picked, outcome = [], "exhausted"
        for i, (cid, score) in enumerate(zip(m["ids"], m["scores"], strict=True)):
            if len(picked) >= m["k"]:
                break
            if score < min_score:
                outcome = "below_threshold"
                break
            taken = {"episode": cid in used_episode, "global": cid in used_global, "none": False}[
                reuse
            ]
            if taken or cid in [m["ids"][p] for p in picked]:
                continue
            v = np.asarray(m["vectors"][i], np.float32)
            better = [np.asarray(m["vectors"][j], np.float32) for j in range(i)]
            if any(float(np.dot(b, v)) >= threshold for b in better):
                continue
            if reuse != "none" and any(float(np.dot(c, v)) >= threshold for c in chosen):
                continue
            picked.append(i)
            used_episode.add(cid)
            used_global.add(cid)
            chosen.append(v)
        if len(picked) >= m["k"]:
            outcome = "ok"
        out.append((picked, outcome))
    return out


@contextlib.contextmanager
def serve_directory(folder):
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) for the block; yields the base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def run_img2dataset(url_list, output_folder, *extra: str, timeout: float = 240, wait: bool = True):
    """Run the real ``img2dataset`` CLI beside this interpreter on one process, quietly,
    with no reencoding; returns the CompletedProcess (None if img2dataset is not installed).
    ``wait=False``: return the running Popen (stdout/stderr to pipes) instead."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "img2dataset"
    if not exe.exists():
        return None
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    command = [
        str(exe),
        f"--url_list={url_list}",
        f"--output_folder={output_folder}",
        "--processes_count=1",
        "--thread_count=4",
        "--timeout=5",
        "--retries=0",
        "--disable_all_reencoding=True",
        "--enable_wandb=False",
        *extra,
    ]
    if not wait:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
