"""Train starkret-mini, the small CLIP that ships with starkret, from scratch on CPU.

    python scripts/prepare_mini_data.py  # once: drawings -> ~/.cache/starkret/mini-data
    python scripts/train_mini.py         # 1-1.5 hours on 2 cores; prints held-out recalls
    cp ~/.cache/starkret/mini-data/starkret-mini.safetensors python/starkret/model_configs/

The defaults are the shipped weights' run (docs/models.md): the same command on the same
data with the same ``--threads`` writes the same tensors.

What it learns from (from scratch: no pretrained weights start either tower):

* real drawings: the training split of scripts/prepare_mini_data.py (Open Clip Art Library
  drawings with cleaned titles, categories and keywords, and Noto Color Emoji named by
  Unicode), composited on white, black (what `starkret.preprocess` makes of transparent
  pixels), grey, coloured or noisy backgrounds, zoomed, shifted and mirrored
  (``--framed F`` also shrinks a share F of them into wide margins, as pictures in the
  wild are not cropped to the drawing: measured, not chosen, so off by default);
* a text corpus (scripts/prepare_mini_data.py: the training captions, WordNet's common
  nouns of drawable things with their definitions, adjective-noun phrases) whose
  all-MiniLM-L6-v2 sentence embeddings the text tower learns to predict through a linear
  head used only in training (``--distill-weight``): words the drawings' captions never
  use land near words they do ("puppy" near "dog"), and their token rows ship;
* `starkret.testing.synthetic` pairs (seed 1): shapes on plain, striped or dotted
  backgrounds and bar, line, pie and box charts, cropped and noised (never mirrored: the
  captions say left and right).

Held out, never trained on: the ``heldout`` split of the real drawings (by drawing group),
the ``outside`` split (Tux Paint's stamps: another collection, other artists; cropped like
the training drawings, and as their files are, with their own margins),
`starkret.testing.drawings` (shapes and charts drawn by other code) and synthetic seeds 2
(the tests' gallery) and 3 (validation). Real-drawing recall is measured among 100
candidates (galleries of 100 different captions), on drawings composited on white and
on the same drawings with their transparency as `starkret.preprocess` turns it (black).

Text: open_clip's CLIP tokenizer (BPE, 49,408 ids). Only the embedding rows of ids that
the training text and the corpus use are stored, plus one shared *unknown* row: 5 % of
training tokens are replaced by it, and `ClipEmbedder` fills every id the training never
saw with it.
Sentences of everyday words are extra negatives for the synthetic pictures only (pushed
below cosine 0), and pairs that do not match are pushed below cosine 0.1, so the
aligner's ``min_score`` keeps its meaning.

Reproducible: seeds are fixed, `torch.use_deterministic_algorithms(True)`, and the thread
count is an argument; the same command with the same thread count gives the same tensors.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import starkret  # noqa: E402
from starkret.ingest.preprocess import OPENAI_MEAN, OPENAI_STD, normalisation_table  # noqa: E402
from starkret.ingest.towers import MINI_MODEL, _open_clip  # noqa: E402
from starkret.testing import drawings, synthetic  # noqa: E402

TRAIN_SEED, HELDOUT_SEED, VAL_SEED = 1, 2, 3
#: The shared row of every token id the training text does not use.
UNKNOWN_ID = 49405
#: Everyday words for descriptions outside the synthetic world ("a dog on the beach"),
#: negatives for the synthetic pictures only (real drawings of dogs exist).
EVERYDAY = [
    "dog",
    "cat",
    "beach",
    "sunset",
    "city",
    "street",
    "car",
    "bicycle",
    "grandmother",
    "recipe",
    "family",
    "birthday",
    "cake",
    "mountain",
    "river",
    "food",
    "pizza",
    "friends",
    "party",
    "house",
    "garden",
    "tree",
    "flower",
    "baby",
    "wedding",
    "coffee",
    "book",
    "phone",
    "computer",
    "train",
    "plane",
    "snow",
    "rain",
    "ocean",
    "boat",
    "bridge",
    "tower",
    "night",
    "park",
    "horse",
    "bird",
    "kitchen",
    "sofa",
    "window",
    "door",
    "road",
    "forest",
    "lake",
    "sky",
    "cloud",
    "selfie",
    "concert",
    "guitar",
    "dinner",
    "breakfast",
    "school",
    "office",
    "shoes",
    "dress",
    "hat",
    "painting",
    "statue",
    "museum",
    "market",
    "bread",
    "cheese",
    "handwritten",
    "letter",
    "old",
    "photo",
    "happy",
    "my",
    "our",
    "the",
    "golden",
    "retriever",
    "running",
    "asleep",
    "holiday",
    "invoice",
    "plumber",
    "quarterly",
]
FUNCTION = ("a", "the", "on", "in", "of", "with", "at", "my", "and", "from", "two")
#: The shipped architecture (96 px ResNet image tower, BPE text tower, 128-d) and weights.
CONFIG = ROOT / "python" / "starkret" / "model_configs" / "starkret-mini.json"
DEFAULT_DATA = Path.home() / ".cache" / "starkret" / "mini-data"
EVAL_DIR = ROOT / "examples" / "clipart_heldout"
MEAN = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


# ==== data ====


def _make(span: tuple[int, int]) -> list[tuple[bytes, list[str], str]]:
    start, stop = span
    out = []
    for i in range(start, stop):
        s = synthetic.sample(TRAIN_SEED * 1_000_003 + i, max_side=192)
        out.append((s.data, s.captions, s.caption))
    return out


def synthetic_data(count: int, size: int, workers: int):
    spans = [(i, min(i + 500, count)) for i in range(0, count, 500)]
    with Pool(workers) as pool:
        parts = pool.map(_make, spans)
    items = [x for part in parts for x in part]
    pixels = []
    for start in range(0, len(items), 2000):
        batch = starkret.preprocess(
            [d for d, _, _ in items[start : start + 2000]], size=size, dtype="uint8", threads=2
        )
        assert not batch.failures, batch.failures[:3]
        pixels.append(batch.pixels)
    return np.concatenate(pixels), [c for _, c, _ in items], [k for _, _, k in items]


def real_data(folder: Path):
    items = [json.loads(line) for line in (folder / "items.jsonl").open(encoding="utf-8")]
    pixels = np.load(folder / "images.npy", mmap_mode="r")
    assert len(items) == len(pixels), (len(items), pixels.shape)
    return items, pixels


def text_corpus(folder: Path) -> tuple[list[str], torch.Tensor]:
    """The texts of scripts/prepare_mini_data.py's corpus and their teacher embeddings."""
    if not (folder / "teacher.npy").is_file():
        raise SystemExit(
            f"{folder} has no text corpus (corpus.json, teacher.npy): rerun "
            "scripts/prepare_mini_data.py, or train without it (--distill-weight 0)"
        )
    texts = json.loads((folder / "corpus.json").read_text(encoding="utf-8"))
    teacher = torch.from_numpy(np.load(folder / "teacher.npy"))
    if len(texts) != len(teacher):
        raise SystemExit(
            f"{folder}: corpus.json has {len(texts)} texts but teacher.npy {len(teacher)} rows: "
            "rerun scripts/prepare_mini_data.py"
        )
    return texts, teacher


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def tokens_of(tokenizer, captions: list[list[str]], variants: int) -> torch.Tensor:
    """(N, variants, context) token ids, cycling through each item's captions."""
    return torch.stack(
        [tokenizer([c[v % len(c)] for c in captions]) for v in range(variants)], dim=1
    )


def negatives(tokenizer, count: int, seed: int = 7) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        n = int(rng.integers(1, 10))
        words = [
            str(rng.choice(FUNCTION)) if rng.random() < 0.3 else str(rng.choice(EVERYDAY))
            for _ in range(n)
        ]
        texts.append(" ".join(words) if rng.random() > 0.02 else "")
    return tokenizer(texts)


def drop_tokens(tokens: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Replace ``rate`` of the word tokens (not start, end or padding) by UNKNOWN_ID."""
    eot = tokens.argmax(-1, keepdim=True)
    cols = torch.arange(tokens.shape[-1]).expand_as(tokens)
    word = (cols > 0) & (cols < eot)
    hit = (torch.rand(tokens.shape, generator=gen) < rate) & word
    return torch.where(hit, torch.full_like(tokens, UNKNOWN_ID), tokens)


def unknown_words(tokens: torch.Tensor, known: set[int]) -> torch.Tensor:
    """Token rows as the shipped model sees them: ids outside ``known`` become UNKNOWN_ID."""
    lookup = torch.full((49408,), UNKNOWN_ID, dtype=tokens.dtype)
    ids = torch.tensor(sorted(known), dtype=tokens.dtype)
    lookup[ids] = ids
    return lookup[tokens]


# ==== augmentation (whole batches, driven by one torch.Generator) ====


def _uniform(gen, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _affine(
    images: torch.Tensor, size: int, scale, shift_x, shift_y, flip, angle=None, padding="border"
) -> torch.Tensor:
    n = len(images)
    theta = torch.zeros(n, 2, 3)
    if angle is None:
        theta[:, 0, 0] = flip / scale
        theta[:, 1, 1] = 1 / scale
    else:  # rotation (radians) after the mirror
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta[:, 0, 0], theta[:, 0, 1] = flip * cos, -sin
        theta[:, 1, 0], theta[:, 1, 1] = flip * sin, cos
    theta[:, 0, 2] = shift_x
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def augment_real(
    rgba_u8: torch.Tensor,
    size: int,
    gen: torch.Generator,
    strong: bool = False,
    framed: float = 0.0,
) -> torch.Tensor:
    """(B, 128, 128, 4) uint8 drawings -> (B, 3, size, size) floats in [0, 1]. ``strong``
    adds rotation (up to 20 degrees), a wider zoom (0.55-1.45), grey scale (10 %) and one
    erased rectangle of background (30 %). ``framed``: that share of the drawings is shrunk
    to 30-65 % of the side, as drawings with wide margins of their own look."""
    x = rgba_u8.permute(0, 3, 1, 2).float() / 255
    n = len(x)
    rgb, alpha = x[:, :3], x[:, 3:]
    kind = torch.rand(n, generator=gen)
    # white 35 %, black 30 % (transparency through starkret.preprocess), grey 10 %,
    # a flat random colour 15 %, a smooth random colour field 10 %
    flat = torch.rand(n, 3, 1, 1, generator=gen)
    grey = _uniform(gen, n, 0.3, 0.85).view(n, 1, 1, 1).expand(n, 3, 1, 1)
    white = _uniform(gen, n, 0.9, 1.0).view(n, 1, 1, 1).expand(n, 3, 1, 1)
    black = torch.zeros(n, 3, 1, 1)
    k = kind.view(n, 1, 1, 1)
    colour = torch.where(
        k < 0.35, white, torch.where(k < 0.65, black, torch.where(k < 0.75, grey, flat))
    )
    background = colour.expand(n, 3, x.shape[2], x.shape[3])
    field = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=x.shape[2:], mode="bilinear")
    background = torch.where(k >= 0.9, field, background)
    composed = rgb * alpha + background * (1 - alpha)
    zoom = (0.55, 1.45) if strong else (0.65, 1.35)
    scale = torch.exp(_uniform(gen, n, math.log(zoom[0]), math.log(zoom[1])))
    if framed:
        far = torch.rand(n, generator=gen) < framed
        scale = torch.where(far, torch.exp(_uniform(gen, n, math.log(0.3), math.log(0.65))), scale)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    shift_x, shift_y = _uniform(gen, n, -0.15, 0.15), _uniform(gen, n, -0.15, 0.15)

    def place(angle=None) -> torch.Tensor:
        if not framed:
            return _affine(composed, size, scale, shift_x, shift_y, flip, angle)
        # warp the drawing with its transparency, then lay it on the background: margins
        # are background, not the drawing's edge pixels drawn out (border padding)
        drawing = torch.cat([rgb * alpha, alpha], 1)
        warped = _affine(drawing, size, scale, shift_x, shift_y, flip, angle, padding="zeros")
        ground = F.interpolate(background, size=(size, size), mode="bilinear")
        return warped[:, :3] + ground * (1 - warped[:, 3:])

    if not strong:
        return _finish(place(), gen)
    angle = _uniform(gen, n, -math.radians(20), math.radians(20))
    out = place(angle)
    grey = (torch.rand(n, generator=gen) < 0.1).view(n, 1, 1, 1)
    out = torch.where(grey, out.mean(1, keepdim=True).expand_as(out), out)
    # erase one rectangle (20-50 % of the side each way) with the background colour
    erase = torch.rand(n, generator=gen) < 0.3
    h = (_uniform(gen, n, 0.2, 0.5) * size).long()
    w = (_uniform(gen, n, 0.2, 0.5) * size).long()
    top = (torch.rand(n, generator=gen) * (size - h)).long()
    left = (torch.rand(n, generator=gen) * (size - w)).long()
    rows = torch.arange(size).view(1, size, 1)
    cols = torch.arange(size).view(1, 1, size)
    box = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + h).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + w).view(n, 1, 1))
        & erase.view(n, 1, 1)
    ).unsqueeze(1)
    fill = F.interpolate(colour.expand(n, 3, 1, 1).contiguous(), size=(size, size))
    out = torch.where(box, fill, out)
    return _finish(out, gen)


def augment_synthetic(pixels_u8: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 3, S, S) uint8 crops -> (B, 3, size, size): mild zoom-in, shift, noise (no flip)."""
    x = pixels_u8.float() / 255
    n = len(x)
    scale = _uniform(gen, n, 1.0, 1.2)
    out = _affine(
        x, size, scale, _uniform(gen, n, -0.06, 0.06), _uniform(gen, n, -0.06, 0.06), torch.ones(n)
    )
    return _finish(out, gen)


def _finish(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = len(x)
    contrast = _uniform(gen, n, 0.85, 1.15).view(n, 1, 1, 1)
    bright = _uniform(gen, n, -0.06, 0.06).view(n, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + bright
    sigma = _uniform(gen, n, 0.0, 0.04).view(n, 1, 1, 1)
    x = x + sigma * torch.randn(x.shape, generator=gen)
    blur = torch.rand(n, generator=gen) < 0.15
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        x = torch.where(blur.view(n, 1, 1, 1), F.conv2d(x, kernel, padding=1, groups=3), x)
    return x.clamp(0, 1)


def normalise(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - MEAN) / STD


def normalise_u8(pixels_u8: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the float32 values `starkret.preprocess` returns (lookup table)."""
    channel = torch.arange(3).view(1, 3, 1, 1)
    return table[channel, pixels_u8.long()]


# ==== evaluation ====


@torch.no_grad()
def _image_features(model, pixels_u8: np.ndarray, table) -> torch.Tensor:
    out = []
    for start in range(0, len(pixels_u8), 256):
        chunk = torch.from_numpy(pixels_u8[start : start + 256])
        out.append(F.normalize(model.encode_image(normalise_u8(chunk, table)), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def _text_features(model, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            F.normalize(model.encode_text(tokens[s : s + 512]), dim=-1)
            for s in range(0, len(tokens), 512)
        ]
    )


def _ranks(text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    scores = text @ image.T
    truth = scores.diag().unsqueeze(1)
    return (scores > truth + 1e-6).sum(1) + 1


def _recalls(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict:
    return {f"R@{k}": round(float((ranks <= k).float().mean()), 4) for k in ks}


class EvalSet:
    """Pictures (uint8 crops through `starkret.preprocess`) with one caption each, scored
    in galleries of ``gallery`` images (all of them when None)."""

    def __init__(self, name: str, datas: list[bytes], captions: list[str], size: int, gallery=None):
        self.name, self.captions, self.gallery = name, captions, gallery
        batch = starkret.preprocess(datas, size=size, dtype="uint8", threads=2)
        assert not batch.failures, batch.failures[:3]
        self.pixels = batch.pixels

    def score(self, model, tokenizer, table, map_tokens) -> dict:
        image = _image_features(model, self.pixels, table)
        text = _text_features(model, map_tokens(tokenizer(self.captions)))
        step = self.gallery or len(self.captions)
        ranks = [
            _ranks(text[s : s + step], image[s : s + step])
            for s in range(0, len(self.captions) - step + 1, step)
        ]
        return _recalls(torch.cat(ranks))


def _eval_rows(items, split: str, usable=lambda item: True) -> list[int]:
    """Rows of one split for evaluation: in a fixed pseudo-random order (sha256 of the
    path), the first usable row of each caption, as many as fill whole galleries of 100."""
    chosen, seen = [], set()
    order = sorted(
        (i for i, it in enumerate(items) if it["split"] == split),
        key=lambda i: hashlib.sha256(f"eval:{items[i]['path']}".encode()).hexdigest(),
    )
    for i in order:
        if items[i]["caption"] not in seen and usable(items[i]):
            seen.add(items[i]["caption"])
            chosen.append(i)
    return chosen[: len(chosen) // 100 * 100]


def real_heldout_sets(items, pixels, size: int, split: str = "heldout") -> list[EvalSet]:
    """The drawings of one split (``heldout``: the held-out openclipart and emoji groups;
    ``outside``: Tux Paint's stamps, another collection), one caption per gallery slot, in
    galleries of 100: on white, and as `starkret.preprocess` sees the transparent drawing
    (transparent pixels black)."""
    chosen = _eval_rows(items, split)
    if not chosen:  # (np.stack of no rows would raise)
        return []
    rgba = np.stack([pixels[i] for i in chosen]).astype(np.float32) / 255
    alpha = rgba[..., 3:]
    on_white = (rgba[..., :3] * alpha + (1 - alpha)) * 255
    on_black = rgba[..., :3] * alpha * 255
    captions = [items[i]["caption"] for i in chosen]
    label = "real heldout" if split == "heldout" else f"real {split} ({items[chosen[0]]['source']})"
    return [
        EvalSet(
            f"{label} on white ({len(chosen)})",
            [_png(np.rint(p).astype(np.uint8)) for p in on_white],
            captions,
            size,
            100,
        ),
        EvalSet(
            f"{label} transparent ({len(chosen)})",
            [_png(np.rint(p).astype(np.uint8)) for p in on_black],
            captions,
            size,
            100,
        ),
    ]


def outside_files_set(items, data: Path, size: int) -> list[EvalSet]:
    """Tux Paint's stamps as their files are (their own margins, not cropped to the
    drawing as the training data is), on white, in galleries of 100: the framing of
    pictures found in the wild."""
    base = data / "root" / "usr" / "share" / "tuxpaint" / "stamps"
    rows = _eval_rows(items, "outside", lambda it: (base / it["path"]).is_file())
    chosen = [items[i] for i in rows]
    if not chosen:
        return []
    from PIL import Image

    datas = []
    for it in chosen:
        with Image.open(base / it["path"]) as image:
            image = image.convert("RGBA")
            image.thumbnail((192, 192))
            side = max(image.size)
            canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
            canvas.alpha_composite(image, ((side - image.width) // 2, (side - image.height) // 2))
            datas.append(_png(np.asarray(canvas.convert("RGB"))))
    name = f"real outside (tuxpaint) files, own margins ({len(chosen)})"
    return [EvalSet(name, datas, [it["caption"] for it in chosen], size, 100)]


def fixed_sets(size: int, val_seed: int) -> list[EvalSet]:
    rows = [json.loads(line) for line in (EVAL_DIR / "captions.jsonl").open(encoding="utf-8")]
    drawn = drawings.scenes()
    gallery = synthetic.gallery(val_seed, 1000)
    return [
        EvalSet(
            "examples/clipart_heldout",
            [(EVAL_DIR / r["file"]).read_bytes() for r in rows],
            [r["caption"] for r in rows],
            size,
            100,
        ),
        EvalSet(
            "drawings (independent)", [d.data for d in drawn], [d.caption for d in drawn], size
        ),
        EvalSet(
            f"synthetic seed {val_seed}",
            [s.data for s in gallery],
            [s.caption for s in gallery],
            size,
        ),
    ]


# ==== model ====


def save(model, token_ids: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    table = state.pop("token_embedding.weight")
    state["starkret.token_ids"] = token_ids.clone()
    state["starkret.token_rows"] = table[token_ids].contiguous()
    state["starkret.unknown_row"] = table[UNKNOWN_ID].clone().contiguous()
    # one metadata key: safetensors writes several in hash order, so the file's bytes would
    # differ between identical runs (the tensors do not)
    save_file(state, str(path), metadata={"format": f"{MINI_MODEL} starkret-sparse-2"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--config", type=Path, default=CONFIG, help="open_clip config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic", type=int, default=24000, help="synthetic pairs")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--real-share", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=0.05, help="initial temperature")
    parser.add_argument("--fixed-temperature", action="store_true")
    parser.add_argument("--unknown-rate", type=float, default=0.05)
    parser.add_argument(
        "--strong-augment",
        action="store_true",
        help="rotation, wider zoom, grey scale, erasing (augment_real; measured, not chosen: "
        "docs/models.md)",
    )
    parser.add_argument(
        "--framed",
        type=float,
        default=0.0,
        help="share of the real drawings shrunk into wide margins (augment_real)",
    )
    parser.add_argument("--margin-weight", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--negatives", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=DEFAULT_DATA / "starkret-mini.safetensors")
    parser.add_argument("--skip-eval", action="store_true", help="train and save only")
    parser.add_argument(
        "--distill-weight",
        type=float,
        default=1.0,
        help="weight of the text tower's distillation from the teacher (0: none)",
    )
    parser.add_argument("--distill-batch", type=int, default=128, help="corpus texts a step")
    args = parser.parse_args()

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    open_clip = _open_clip()
    # the architecture to train (registered under the starkret-mini name, replacing the
    # shipped config for this process)
    open_clip.add_model_config(args.config)
    model = open_clip.create_model(MINI_MODEL, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MINI_MODEL)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    table = torch.from_numpy(np.array(normalisation_table()))

    items, real_pixels = real_data(args.data)
    train = [i for i, it in enumerate(items) if it["split"] == "train"]
    real_rgba = torch.from_numpy(np.ascontiguousarray(real_pixels[train]))
    real_caps = [items[i]["captions"] for i in train]
    group_names = sorted({items[i]["group"] for i in train})
    group_of = {g: j for j, g in enumerate(group_names)}
    real_group = torch.tensor([group_of[items[i]["group"]] for i in train])
    group_size = torch.bincount(real_group).float()
    real_weight = 1 / group_size[real_group].sqrt()  # big collections (1,375 stars) count less
    real_tokens = tokens_of(tokenizer, real_caps, 6)
    real_counts = torch.tensor([min(len(c), 6) for c in real_caps])

    syn_pixels, syn_caps, canonical = synthetic_data(args.synthetic, size + size // 6, args.threads)
    syn_pixels = torch.from_numpy(syn_pixels)
    syn_tokens = tokens_of(tokenizer, syn_caps, max(len(c) for c in syn_caps))
    syn_counts = torch.tensor([len(c) for c in syn_caps])
    captions = {k: j for j, k in enumerate(sorted(set(canonical)))}
    syn_group = torch.tensor([captions[k] for k in canonical]) + len(group_names)

    negative_pool = negatives(tokenizer, 4000)
    if args.distill_weight:
        corpus, teacher = text_corpus(args.data)
        corpus_tokens = tokenizer(corpus)
    else:
        corpus_tokens = torch.zeros((0, real_tokens.shape[-1]), dtype=real_tokens.dtype)
    known = {
        int(t)
        for t in torch.unique(
            torch.cat(
                [
                    real_tokens.flatten(),
                    syn_tokens.flatten(),
                    negative_pool.flatten(),
                    corpus_tokens.flatten(),
                ]
            )
        )
    }
    assert UNKNOWN_ID not in known
    known.add(UNKNOWN_ID)
    token_ids = torch.tensor(sorted(known))
    heldout_sets = real_heldout_sets(items, real_pixels, size)
    outside_sets = real_heldout_sets(items, real_pixels, size, "outside")
    outside_sets += outside_files_set(items, args.data, size)
    eval_sets = heldout_sets + fixed_sets(size, VAL_SEED) + outside_sets
    print(
        f"data: {len(train)} real training drawings ({len(group_names)} groups), "
        f"{len(syn_caps)} synthetic pairs, {len(token_ids)} token ids, "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )

    # Train a compact table (one row per known id) in place of the 49,408-row one: the
    # same rows, a tenth of the optimiser's work; `save` writes them back by id.
    compact = torch.full((49408,), -1, dtype=torch.long)
    compact[token_ids] = torch.arange(len(token_ids))
    full_table = model.token_embedding
    model.token_embedding = torch.nn.Embedding(len(token_ids), full_table.weight.shape[1])
    with torch.no_grad():
        model.token_embedding.weight.copy_(full_table.weight[token_ids])
    model.to(memory_format=torch.channels_last)

    def to_compact(tokens: torch.Tensor) -> torch.Tensor:
        return compact[unknown_words(tokens, known)]

    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / args.temperature))
    model.logit_scale.requires_grad_(not args.fixed_temperature)
    no_decay = lambda n, p: p.ndim < 2 or "token_embedding" in n or "positional" in n  # noqa: E731
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = None
    if args.distill_weight:
        head = torch.nn.Linear(model.text_projection.shape[1], teacher.shape[1], bias=False)
        params.append(("distill_head.weight", head.weight))
    opt = torch.optim.AdamW(
        [
            {
                "params": [p for n, p in params if not no_decay(n, p)],
                "weight_decay": args.weight_decay,
            },
            {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_real = round(args.batch_size * args.real_share)
    n_syn = args.batch_size - n_real
    model.train()

    def evaluate(step: int, sets: list[EvalSet]) -> dict:
        model.eval()
        out = {s.name: s.score(model, tokenizer, table, to_compact) for s in sets}
        model.train()
        line = "  ".join(f"{k}: {v['R@1']:.3f}/{v['R@5']:.3f}" for k, v in out.items())
        print(
            f"eval {step:5d} (R@1/R@5)  {line}  {time.perf_counter() - started:.0f} s", flush=True
        )
        return out

    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        ri = torch.multinomial(real_weight, n_real, replacement=False, generator=gen)
        si = torch.randint(len(syn_caps), (n_syn,), generator=gen)
        images = torch.cat(
            [
                augment_real(real_rgba[ri], size, gen, args.strong_augment, args.framed),
                augment_synthetic(syn_pixels[si], size, gen),
            ]
        )
        pick_r = (torch.rand(n_real, generator=gen) * real_counts[ri]).long()
        pick_s = (torch.rand(n_syn, generator=gen) * syn_counts[si]).long()
        text = torch.cat([real_tokens[ri, pick_r], syn_tokens[si, pick_s]])
        text = drop_tokens(text, args.unknown_rate, gen)
        group = torch.cat([real_group[ri], syn_group[si]])
        neg = negative_pool[torch.randint(len(negative_pool), (args.negatives,), generator=gen)]
        neg = drop_tokens(neg, 0.3, gen)

        images = normalise(images).contiguous(memory_format=torch.channels_last)
        img = F.normalize(model.encode_image(images), dim=-1)
        both = F.normalize(model.encode_text(compact[torch.cat([text, neg])]), dim=-1)
        txt, neg_txt = both[: len(text)], both[len(text) :]
        scale = model.logit_scale.exp().clamp(max=100)
        cos = img @ txt.T
        logits = scale * cos
        same = (group[:, None] == group[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        outside = img[n_real:] @ neg_txt.T  # everyday sentences vs synthetic pictures
        loss = 0.5 * (
            torch.sum(-target * logits.log_softmax(1), 1).mean()
            + torch.sum(-target * logits.T.log_softmax(1), 1).mean()
        )
        loss = loss + F.relu(outside + 0.1).mean()
        loss = loss + args.margin_weight * (F.relu(cos - 0.1) * (1 - same)).sum() / (1 - same).sum()
        if head is not None:
            di = torch.randint(len(corpus), (args.distill_batch,), generator=gen)
            student = F.normalize(model.encode_text(compact[corpus_tokens[di]]), dim=-1)
            pred = F.normalize(head(student), dim=-1)
            loss = loss + args.distill_weight * (1 - (pred * teacher[di]).sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step <= 3:
            print(
                f"step {step:5d}  loss {loss.item():.3f}  lr {lr:.2e}  scale {scale.item():.1f}  "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
        if step % args.eval_every == 0 and step != args.steps:
            evaluate(step, eval_sets[2:4])
    model.eval()
    train_seconds = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    trained_rows = model.token_embedding
    with torch.no_grad():
        full_table.weight[token_ids] = trained_rows.weight
    model.token_embedding = full_table
    model.to(memory_format=torch.contiguous_format)
    save(model, token_ids, args.out)
    model.token_embedding = trained_rows
    if args.skip_eval:
        print(
            json.dumps({"train_seconds": round(train_seconds, 1), "bytes": args.out.stat().st_size})
        )
        return
    final = evaluate(args.steps, eval_sets)
    model.eval()  # evaluate() leaves the model training (BatchNorm would use batch statistics)
    final_sets = [
        EvalSet(
            f"synthetic seed {HELDOUT_SEED}",
            [s.data for s in synthetic.gallery(HELDOUT_SEED, 1000)],
            [s.caption for s in synthetic.gallery(HELDOUT_SEED, 1000)],
            size,
        )
    ]
    final.update({s.name: s.score(model, tokenizer, table, to_compact) for s in final_sets})
    summary = {
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "bytes": args.out.stat().st_size,
        "token_ids": len(token_ids),
        "recall": final,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
