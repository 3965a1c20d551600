"""Train starkret-mini, the small CLIP that ships with starkret, from scratch on CPU.

    python scripts/train_mini.py   # -> python/starkret/model_configs/starkret-mini.safetensors

The pairs come from `starkret.testing.synthetic` (seed 1; seed 2 is the held-out gallery of the
tests, seed 3 the validation gallery printed here). Every image goes through
`starkret.preprocess` at the model's input size, exactly as `starkret.embed` feeds the
image tower at inference. Seeds are fixed; with the same thread count a rerun should give
the same weights (not yet checked bit for bit). Sentences of everyday words outside the
toy world are extra negatives, pushed below cosine 0 against every image, so the
aligner's min_score rejects descriptions the model cannot know.

The bundled weights were made with `--threads 4` (defaults otherwise): 20,000 pairs,
1,000 steps of 128, in 541 s wall on a shared 2-core AMD EPYC. Held-out gallery (seed 2,
1,000 different captions): text->image R@1 0.728, R@5 0.992, R@10 0.999.

The token embedding table (49,408 rows) is stored sparsely: only the rows of tokens that
occur in the training captions are trained and written; `ClipEmbedder` fills the rest
with zeros when it loads the file.
"""

from __future__ import annotations

import argparse
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
from starkret.testing import synthetic  # noqa: E402
from starkret.ingest.towers import MINI_MODEL, _open_clip  # noqa: E402
from starkret.ingest.preprocess import normalisation_table  # noqa: E402

TRAIN_SEED, HELDOUT_SEED, VAL_SEED = 1, 2, 3
#: A token id that no caption uses and whose embedding row stays zero: words the model
#: never saw load as zero rows too, so texts made of them learn to look like this.
UNSEEN_ID = 49405
#: Everyday words for descriptions outside the toy world ("a dog on the beach"), used as
#: negatives: every image is pushed to score below 0 with them (the aligner's
#: ``min_score`` then turns them into ``below_threshold``).
EVERYDAY = (
    "dog cat beach sunset city street car bicycle grandmother recipe family birthday cake "
    "mountain river food pizza friends party house garden tree flower baby wedding coffee "
    "book phone computer train plane snow rain ocean boat bridge tower night park horse "
    "bird kitchen sofa window door road forest lake sky cloud selfie concert guitar dinner "
    "breakfast school office shoes dress hat painting statue museum market bread cheese "
    "handwritten letter old photo happy my our the golden retriever running asleep holiday"
).split()  # noqa: SIM905
FUNCTION = ("a", "the", "on", "in", "of", "with", "at", "my", "and", "red", "blue", "two")
OUT = ROOT / "python" / "starkret" / "model_configs" / "starkret-mini.safetensors"


def _make(span: tuple[int, int]) -> list[tuple[bytes, list[str], str]]:
    start, stop = span
    out = []
    for i in range(start, stop):
        s = synthetic.sample(TRAIN_SEED * 1_000_003 + i, max_side=192)
        out.append((s.data, s.captions, s.caption))
    return out


def make_data(count: int, size: int, workers: int):
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


def negatives(tokenizer, count: int, seen: set[int], seed: int = 7) -> torch.Tensor:
    """Token rows of out-of-world sentences; half have every unseen word as UNSEEN_ID."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        n = int(rng.integers(1, 10))
        words = [
            str(rng.choice(FUNCTION)) if rng.random() < 0.3 else str(rng.choice(EVERYDAY))
            for _ in range(n)
        ]
        texts.append(" ".join(words) if rng.random() > 0.02 else "")
    tokens = tokenizer(texts)
    masked = tokens.clone()
    special = {0, int(tokens[0, 0])}  # padding and start of text
    for row in range(len(masked)):
        eot = int(masked[row].argmax())
        for col in range(1, eot):
            if int(masked[row, col]) not in seen and int(masked[row, col]) not in special:
                masked[row, col] = UNSEEN_ID
    return torch.cat([tokens[: count // 2], masked[count // 2 :]])


def normalise(pixels_u8: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> the float32 values `starkret.preprocess` returns (lookup table)."""
    channel = torch.arange(3).view(1, 3, 1, 1)
    return table[channel, pixels_u8.long()]


@torch.no_grad()
def recall(model, tokenizer, table, samples, size: int) -> dict:
    pixels = starkret.preprocess([s.data for s in samples], size=size, dtype="uint8").pixels
    image = F.normalize(model.encode_image(normalise(torch.from_numpy(pixels), table)), dim=-1)
    text = F.normalize(model.encode_text(tokenizer([s.caption for s in samples])), dim=-1)
    scores = text @ image.T
    truth = scores.diag().unsqueeze(1)
    ranks = (scores > truth + 1e-6).sum(1) + 1
    return {f"R@{k}": float((ranks <= k).float().mean()) for k in (1, 5, 10)}


def save(model, token_ids: torch.Tensor, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    table = state.pop("token_embedding.weight")
    state["starkret.token_ids"] = token_ids.clone()
    state["starkret.token_rows"] = table[token_ids].contiguous()
    save_file(state, str(path), metadata={"model": MINI_MODEL, "format": "starkret-sparse-1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--negatives", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    open_clip = _open_clip()
    model = open_clip.create_model(MINI_MODEL, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MINI_MODEL)
    size = model.visual.image_size[0]
    table = torch.from_numpy(np.array(normalisation_table()))

    pixels, captions, canonical = make_data(args.images, size, args.threads)
    pixels = torch.from_numpy(pixels)
    variants = max(len(c) for c in captions)
    tokens = torch.stack(
        [tokenizer([c[v % len(c)] for c in captions]) for v in range(variants)], dim=1
    )  # (N, variants, context)
    counts = torch.tensor([len(c) for c in captions])
    groups = {k: i for i, k in enumerate(sorted(set(canonical)))}
    group = torch.tensor([groups[k] for k in canonical])
    seen = {int(t) for t in torch.unique(tokens)}
    assert UNSEEN_ID not in seen
    negative_pool = negatives(tokenizer, 4000, seen)
    token_ids = torch.tensor(
        sorted((seen | {int(t) for t in negative_pool.unique()}) - {UNSEEN_ID})
    )
    with torch.no_grad():
        model.token_embedding.weight[UNSEEN_ID] = 0
    val = synthetic.gallery(VAL_SEED, 1000)
    print(
        f"data: {len(captions)} pairs ({len(groups)} different captions), "
        f"{len(token_ids)} token ids, {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token_embedding" not in n]
    other = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "token_embedding" not in n)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(len(captions), generator=gen)
    cursor = 0
    model.train()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(captions), generator=gen), 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        pick = (torch.rand(len(idx), generator=gen) * counts[idx]).long()
        text = tokens[idx, pick]
        image = normalise(pixels[idx], table)
        img = F.normalize(model.encode_image(image), dim=-1)
        neg = negative_pool[torch.randint(len(negative_pool), (args.negatives,), generator=gen)]
        both = F.normalize(model.encode_text(torch.cat([text, neg])), dim=-1)
        txt, neg_txt = both[: len(idx)], both[len(idx) :]
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ txt.T
        same = (group[idx][:, None] == group[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        outside = img @ neg_txt.T
        image_to_text = torch.cat([logits, scale * outside], 1).log_softmax(1)[:, : len(idx)]
        loss = (
            0.5
            * (
                torch.sum(-target * image_to_text, 1).mean()
                + torch.sum(-target * logits.T.log_softmax(1), 1).mean()
            )
            + F.relu(outside + 0.1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.token_embedding.weight[UNSEEN_ID] = 0
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            r = recall(model, tokenizer, table, val, size)
            model.train()
            print(
                f"step {step:5d}  loss {loss.item():.3f}  lr {lr:.2e}  "
                f"outside max {outside.max().item():+.2f}  "
                f"val R@1 {r['R@1']:.3f} R@5 {r['R@5']:.3f}  "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    model.eval()
    save(model, token_ids, args.out)
    held = recall(model, tokenizer, table, synthetic.gallery(HELDOUT_SEED, 1000), size)
    summary = {
        "seconds": round(time.perf_counter() - started, 1),
        "bytes": args.out.stat().st_size,
        "heldout": held,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
