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

from starkret import _core
from starkret._version import __version__
from starkret.align import formats
from starkret.align.aligner import Aligner, Alignment, Candidate, Moment
from starkret.errors import (
    FolderLockError,
    FormatError,
    IncompatibleSourcesError,
    IndexBuildError,
    InvalidInputError,
    InvalidTypeError,
    MissingDependencyError,
    MissingIndexError,
    ModelLoadError,
    NotFoundError,
    OutputBusyError,
    OutputExistsError,
    RequestError,
    StarkretError,
    WorkersFailed,
)
from starkret.index.build import build_index
from starkret.index.db import Hit, ImageDB
from starkret.index.dedup import dedup
from starkret.index.topk import merge_topk, topk, topk_parts
from starkret.ingest.embed import embed
from starkret.ingest.pipeline import EmbedReport
from starkret.ingest.preprocess import (
    DEFAULT_MAX_PIXELS,
    PreprocessedBatch,
    ShardBatch,
    preprocess,
    preprocess_shards,
)
from starkret.ingest.shards import Sample, read_shards
from starkret.ingest.towers import (
    DEFAULT_MODEL,
    MINI_MODEL,
    MODEL_DEFAULT,
    TINY_MODEL,
    ClipEmbedder,
)

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
    "FolderLockError",
    "FormatError",
    "Hit",
    "ImageDB",
    "IncompatibleSourcesError",
    "IndexBuildError",
    "InvalidInputError",
    "InvalidTypeError",
    "MissingDependencyError",
    "MissingIndexError",
    "ModelLoadError",
    "Moment",
    "NotFoundError",
    "OutputBusyError",
    "OutputExistsError",
    "PreprocessedBatch",
    "RequestError",
    "Sample",
    "ShardBatch",
    "StarkretError",
    "WorkersFailed",
    "__version__",
    "build_index",
    "core_version",
    "dedup",
    "embed",
    "formats",
    "merge_topk",
    "preprocess",
    "preprocess_shards",
    "read_shards",
    "topk",
    "topk_parts",
]
