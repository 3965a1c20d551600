"""Type stubs for the Rust extension `starkret._core` (kept in sync with rust/lib.rs)."""

import numpy as np
import numpy.typing as npt

__version__: str

def simd_level() -> str:
    """The widest SIMD level detected on this CPU at run time, e.g. ``"avx2+fma"``."""

def available_threads() -> int:
    """Number of logical CPUs the Rust thread pools use by default."""

# (ok input positions, [(position, reason)] failures, [(position, format)] fallbacks)
_Statuses = tuple[list[int], list[tuple[int, str]], list[tuple[int, str]]]

def preprocess_f32(
    images: list[bytes],
    size: int,
    mode: str,
    lut: npt.NDArray[np.float32],
    max_pixels: int,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.float32], _Statuses]:
    """Decode, resize, crop and normalise into (n_ok, 3, size, size) float32 (GIL released)."""

def preprocess_f16_bits(
    images: list[bytes],
    size: int,
    mode: str,
    lut: npt.NDArray[np.uint16],
    max_pixels: int,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.uint16], _Statuses]:
    """As preprocess_f32 with float16 values passed and returned as uint16 bits."""

def preprocess_u8(
    images: list[bytes],
    size: int,
    mode: str,
    max_pixels: int,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.uint8], _Statuses]:
    """The uint8 RGB crops before normalisation, (n_ok, size, size, 3)."""

def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG or PNG from its header; None for other formats."""
