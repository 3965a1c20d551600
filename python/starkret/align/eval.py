"""Dialogue-to-image retrieval evaluation: Recall@1/5/10 and MRR, as Stark/DribeR report them.

Each pair is a description (or an Ultron output, from which the ``<RET>`` description
is parsed) and the key of the ground-truth image. The description is embedded with the
DB's text tower and the whole gallery (every image of the DB, or of ``sources``) is
ranked by CLIP score; the ground truth's rank gives the metrics, reported x100.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from starkret.align.formats import FormatError, iter_jsonl, parse_ultron_output
from starkret.errors import InvalidInputError
from starkret.index.db import ImageDB
from starkret.index.topk import count_above

__all__ = ["EvalResult", "evaluate", "read_pairs", "retrieval_metrics"]

#: Gallery images must beat the ground truth's score by more than this to rank above it
#: (scores of one image computed two ways may differ in the last bits).
RANK_TOLERANCE = 1e-6


@dataclass
class EvalResult:
    """Metrics (x100) and the rank of every pair's ground truth (1 = best)."""

    recall_at_1: float
    recall_at_5: float
    recall_at_10: float
    mrr: float
    count: int
    ranks: list[int]

    def as_dict(self) -> dict:
        return {
            "R@1": self.recall_at_1,
            "R@5": self.recall_at_5,
            "R@10": self.recall_at_10,
            "MRR": self.mrr,
            "count": self.count,
        }


def retrieval_metrics(ranks: Sequence[int]) -> EvalResult:
    """Recall@1/5/10 and MRR (x100) from 1-based ranks of the ground truth."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise InvalidInputError("no pairs to evaluate")
    if (r < 1).any():
        raise InvalidInputError("ranks are 1-based")
    return EvalResult(
        recall_at_1=float((r <= 1).mean() * 100),
        recall_at_5=float((r <= 5).mean() * 100),
        recall_at_10=float((r <= 10).mean() * 100),
        mrr=float((1.0 / r).mean() * 100),
        count=int(r.size),
        ranks=[int(x) for x in r],
    )


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """Pairs from JSONL: ``{"description" | "ultron_output": str, "image_key": str}``."""
    return [record for _, record in iter_jsonl(path)]


def _queries(pairs: Iterable[Mapping]) -> tuple[list[str], list[str]]:
    texts, keys = [], []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Mapping) or "image_key" not in pair:
            raise FormatError(f"pair {i}: needs 'image_key' and a description")
        if "description" in pair:
            text = pair["description"]
        elif "ultron_output" in pair:
            text = parse_ultron_output(pair["ultron_output"])
            if text is None:
                raise FormatError(f"pair {i}: the Ultron output has no <RET> description")
        else:
            raise FormatError(f"pair {i}: needs 'description' or 'ultron_output'")
        texts.append(str(text))
        keys.append(str(pair["image_key"]))
    return texts, keys


def evaluate(
    db: ImageDB,
    pairs: Iterable[Mapping],
    *,
    sources: Sequence[str] | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> EvalResult:
    """Rank the gallery for every pair and report Recall@1/5/10 and MRR (x100).

    The rank counts gallery images scoring strictly higher than the ground truth, plus
    one (ties go to the ground truth). Ground-truth keys are DB keys (``cc12m/0001``)
    or Stark's ``url:`` keys. Recorded near duplicates (``starkret dedup``) are not in
    the gallery (unless the DB was opened with ``duplicates="keep"``): a ground truth
    that is one is stood in for by the image kept in its place.
    """
    texts, keys = _queries(pairs)
    names = db.sources if sources is None else list(sources)
    locations = [db.locate(key, names) for key in keys]
    dups = db.duplicates
    if dups:
        locations = [None if loc is None else dups.kept_of(*loc) for loc in locations]
    missing = [k for k, loc in zip(keys, locations, strict=True) if loc is None]
    if missing:
        raise InvalidInputError(
            f"{len(missing)} ground-truth keys are not in the gallery, e.g. {missing[:3]}"
        )
    ranks = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), unit="pair", desc="evaluating", dynamic_ncols=True)
    for start in range(0, len(texts), batch_size):
        vectors = db.encode(texts[start : start + batch_size])
        located = locations[start : start + batch_size]
        truth = np.stack([db.vectors(s, [r])[0] for s, r in located])
        target = np.sum(vectors * truth, axis=1)
        better = np.zeros(len(vectors), np.int64)
        for name in names:
            # the search's own scan, counting the rows that beat the ground truth
            better += count_above(
                vectors,
                db.embeddings(name),
                target + RANK_TOLERANCE,
                exclude=dups.exclusions(name),
            )
        ranks.extend((better + 1).tolist())
        if bar is not None:
            bar.update(len(vectors))
    if bar is not None:
        bar.close()
    return retrieval_metrics(ranks)
