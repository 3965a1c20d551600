"""What starkret knows about the inputs users already have.

* The Stark image sources by name (``--source mathvision``): which table columns hold
  the image, the caption and the key, so their Hugging Face datasets need no flags.
* img2dataset's output folders, in any of its three output formats: it writes
  ``NNNNN.tar`` (webdataset), ``NNNNN.parquet`` with the images inside (parquet), or
  ``NNNNN/KEY.jpg`` with ``KEY.txt``/``KEY.json`` beside it (files), and in every
  format ``NNNNN.parquet`` per-shard metadata (webdataset, files) plus
  ``NNNNN_stats.json``. Read as starkret reads them, the three give the same keys
  (``000010042``), urls and captions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KNOWN_SOURCES", "KnownSource", "img2dataset_format"]


@dataclass(frozen=True)
class KnownSource:
    """Columns of a source's table form (tried first when present; flags still win)."""

    hub: str  # where the data comes from
    image: str | None = None
    caption: str | None = None
    key: str | None = None


#: The sources of the Stark image DB. CC12M and RedCaps12M are downloaded with img2dataset
#: (any output format; ``--url_col url --caption_col caption``); the others are the
#: Hugging Face datasets (``save_to_disk`` folders or their parquet files).
KNOWN_SOURCES: dict[str, KnownSource] = {
    "cc12m": KnownSource(
        "img2dataset of google-research-datasets/conceptual-12m", "jpg", "caption", "key"
    ),
    "redcaps12m": KnownSource("img2dataset of RedCaps (redcaps.xyz)", "jpg", "caption", "key"),
    # image Image, query, label, human_or_machine: the query is the caption
    "chartqa": KnownSource("HuggingFaceM4/ChartQA", "image", "query", None),
    # question, options, answer, image Image
    "ai2d": KnownSource("lmms-lab/ai2d", "image", "question", None),
    # id, question, options, image (a *path string*), decoded_image Image, answer, ...
    "mathvision": KnownSource("MathLLMs/MathVision", "decoded_image", "question", "id"),
}

_SHARD = re.compile(r"^(\d+)$")


def img2dataset_format(folder: Path) -> str | None:
    """``"webdataset"``, ``"parquet"`` or ``"files"`` if ``folder`` is an img2dataset output
    folder (``NNNNN_stats.json`` beside ``NNNNN.tar``/``NNNNN.parquet``/``NNNNN/``), else None."""
    stats = [p.name[: -len("_stats.json")] for p in folder.glob("*_stats.json")]
    shards = [s for s in stats if _SHARD.match(s)]
    if not shards:
        return None
    if any((folder / f"{s}.tar").is_file() for s in shards):
        return "webdataset"
    if any((folder / s).is_dir() for s in shards):
        return "files"
    if any((folder / f"{s}.parquet").is_file() for s in shards):
        return "parquet"
    return None
