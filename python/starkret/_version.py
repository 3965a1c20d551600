"""The installed starkret's version (the package's, else the compiled core's)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

import starkret._core as _core

try:
    __version__: str = _dist_version("starkret")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = _core.__version__
