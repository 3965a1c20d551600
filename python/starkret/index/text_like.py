"""Text-like queries: probes of an image index that sit as far from it as CLIP text does.

A CLIP text embedding's best cosine to any image is ~0.2-0.35 (the modality gap), while
an image's nearest neighbour in the same collection has cosine ~0.8-1. Recall measured
with perturbed image rows (queries at cosine ~0.9 from a row) therefore overstates what
an approximate index gives text queries: far from every row, the coarse quantizer's
nearest cells and the compressed codes' errors decide more of the ranking.

:func:`text_like_queries` builds such probes from the collection itself::

    q = normalise(w * concept + g * gap + r * noise)

* ``concept``: the normalised mean of a random row and its 0-2 random companions (a
  "topic" in the data's own geometry; on clustered data it lands near a cluster mean),
* ``gap``: one random unit direction shared by every query of the set (the modality
  offset; it biases all queries the same way, as text embeddings are biased),
* ``noise``: a fresh random unit direction per query,
* ``w = 0.3``, ``g = 0.25`` and ``r`` completing unit norm, so the best cosine of a
  query to the collection is ~0.25-0.35, as for CLIP text queries.

:func:`recall_at` compares an approximate search's rows with exact ones.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TEXT_LIKE_CONCEPT_WEIGHT", "TEXT_LIKE_GAP_WEIGHT", "recall_at", "text_like_queries"]

#: Weight of the data direction ("concept") in a text-like query.
TEXT_LIKE_CONCEPT_WEIGHT = 0.3
#: Weight of the direction shared by every query of a set (the modality gap).
TEXT_LIKE_GAP_WEIGHT = 0.25


def text_like_queries(rows_of, count: int, n: int, dim: int, *, seed: int = 0) -> np.ndarray:
    """``n`` unit float32 text-like queries for a collection of ``count`` rows.

    ``rows_of(ids)`` returns the float32 vectors of global rows ``ids`` (e.g.
    ``SourceIndex.parts.rows``).
    """
    rng = np.random.default_rng(seed)
    if count == 0 or n == 0:
        return np.zeros((n, dim), np.float32)
    picks = rng.integers(0, count, size=(n, 3))
    companions = rng.integers(0, 3, size=n)  # how many of the other two rows join
    vectors = rows_of(picks.reshape(-1)).reshape(n, 3, dim).astype(np.float32)
    mask = (np.arange(3)[None, :] <= companions[:, None]).astype(np.float32)
    concept = (vectors * mask[:, :, None]).sum(1)
    concept /= np.maximum(np.linalg.norm(concept, axis=1, keepdims=True), 1e-12)
    gap = rng.standard_normal(dim).astype(np.float32)
    gap /= np.linalg.norm(gap)
    noise = rng.standard_normal((n, dim)).astype(np.float32)
    noise -= (noise * concept).sum(1, keepdims=True) * concept
    noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    w, g = TEXT_LIKE_CONCEPT_WEIGHT, TEXT_LIKE_GAP_WEIGHT
    r = np.sqrt(max(0.0, 1.0 - w * w - g * g))
    q = w * concept + g * gap[None, :] + r * noise
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def recall_at(
    truth: np.ndarray,
    approx: np.ndarray,
    k: int,
    *,
    truth_scores: np.ndarray | None = None,
    approx_scores: np.ndarray | None = None,
) -> float:
    """Share of the exact top-``k`` rows (``truth``, -1 = padding) found in ``approx[:, :k]``.

    With both score arrays (exact scores of the returned rows), ties count: a returned row
    whose score reaches the exact ``k``-th best (within float32 rounding) is a hit, so an
    index returning one of several identical duplicates is not marked wrong.
    """
    hits = total = 0
    tied = truth_scores is not None and approx_scores is not None
    for i, (t, a) in enumerate(zip(truth[:, :k], approx[:, :k], strict=True)):
        t = t[t >= 0]
        total += len(t)
        if tied and len(t):
            kth = float(truth_scores[i, len(t) - 1])
            got = approx_scores[i, :k][a >= 0]
            hits += min(len(t), int((got >= kth - 1e-6 * max(1.0, abs(kth))).sum()))
        else:
            hits += len(np.intersect1d(t, a[a >= 0]))
    return hits / max(1, total)
