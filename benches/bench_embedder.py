"""ClipEmbedder.encode_images against calling the open_clip model directly on the same tensors.

The ratio is the cost of starkret's wrapper (input checks, chunking, normalisation,
conversion to numpy); it should stay close to 1. On a GPU machine pass
``--embedder-model ViT-L-14-336-quickgelu`` (random weights are fine for speed).
"""

from __future__ import annotations

import numpy as np
from common import Row, best_rate


def add_arguments(parser) -> None:
    group = parser.add_argument_group("embedder")
    group.add_argument("--embedder-model", default="starkret-tiny", help="open_clip model name")
    group.add_argument("--embedder-batch", type=int, default=64, help="images per forward")


def run(args) -> list[Row]:
    import torch

    from starkret import ClipEmbedder

    emb = ClipEmbedder(args.embedder_model, pretrained=None, batch_size=args.embedder_batch)
    n = args.embedder_batch * (1 if args.quick else 4)
    size = emb.image_size
    pixels = np.random.default_rng(0).standard_normal((n, 3, size, size), dtype=np.float32)
    tensor = torch.from_numpy(pixels)
    model = emb.model

    def direct() -> None:
        with torch.inference_mode(), emb._autocast():
            for start in range(0, n, args.embedder_batch):
                chunk = tensor[start : start + args.embedder_batch].to(emb.device)
                model.encode_image(chunk).float().cpu()

    repeats = 2 if args.quick else 3
    ours = best_rate(lambda: emb.encode_images(pixels), n, repeats=repeats)
    base = best_rate(direct, n, repeats=repeats)
    case = f"{args.embedder_model} b{args.embedder_batch} {emb.device.type}"
    return [Row("encode_images", case, ours, base, "open_clip forward", "images/s")]
