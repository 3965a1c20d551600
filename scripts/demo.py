"""The README's main job on bundled example data, offline, with the tiny random-weight model.

For now (package foundation) it shows the embedding towers at work; the later steps
(shard reading, embedding, indexing, alignment) join it as they land.
"""

from __future__ import annotations

import time

import numpy as np

import starkret


def main() -> None:
    print(f"starkret {starkret.__version__}: demo on CPU with {starkret.TINY_MODEL}")
    print("note: starkret-tiny has RANDOM weights, so scores below carry no meaning; with network")
    print("      access use ClipEmbedder('ViT-L-14-336-quickgelu', pretrained='openai')")
    start = time.perf_counter()
    emb = starkret.ClipEmbedder(starkret.TINY_MODEL, device="cpu")
    descriptions = [
        "a golden retriever running on a beach",
        "a bar chart of monthly rainfall",
        "a diagram of the water cycle",
    ]
    texts = emb.encode_texts(descriptions, dtype="float32")
    pixels = np.random.default_rng(0).standard_normal((4, 3, emb.image_size, emb.image_size))
    images = emb.encode_images(pixels.astype(np.float32), dtype="float32")
    scores = texts @ images.T
    for description, row in zip(descriptions, scores, strict=True):
        print(f"  {description!r:45} best image {int(row.argmax())} (score {row.max():+.3f})")
    print(f"done in {time.perf_counter() - start:.2f} s ({emb!r})")


if __name__ == "__main__":
    main()
