"""starkret: image retrieval core for multimodal-dialogue pipelines.

Given an image description, return the best fitting image from a very large image
collection, fast, without reusing or near-duplicating images in one conversation.
The hot CPU paths are in the Rust extension ``starkret._core``; the CLIP towers run
on open_clip (GPU when available).

>>> import starkret
>>> emb = starkret.ClipEmbedder("starkret-tiny")
>>> emb.encode_texts(["a chart of rainfall by month"]).shape
(1, 64)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from . import _core
from .aligner import Aligner, Alignment, Candidate, Moment
from .db import Hit, ImageDB
from .index import build_index

# `starkret.embed` is the pipeline function; the CLIP towers live in `starkret.towers`.
from .pipeline import EmbedReport, embed
from .preprocess import (
    DEFAULT_MAX_PIXELS,
    PreprocessedBatch,
    ShardBatch,
    preprocess,
    preprocess_shards,
)
from .shards import Sample, read_shards
from .topk import merge_topk, topk, topk_parts
from .towers import DEFAULT_MODEL, MINI_MODEL, MODEL_DEFAULT, TINY_MODEL, ClipEmbedder

try:
    __version__: str = _dist_version("starkret")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = _core.__version__

#: Version of the compiled Rust core (equal to ``__version__`` in a consistent install).
core_version: str = _core.__version__

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MODEL",
    "MINI_MODEL",
    "MODEL_DEFAULT",
    "TINY_MODEL",
    "Aligner",
    "Alignment",
    "Candidate",
    "ClipEmbedder",
    "EmbedReport",
    "Hit",
    "ImageDB",
    "Moment",
    "PreprocessedBatch",
    "Sample",
    "ShardBatch",
    "__version__",
    "build_index",
    "core_version",
    "embed",
    "merge_topk",
    "preprocess",
    "preprocess_shards",
    "read_shards",
    "topk",
    "topk_parts",
]
