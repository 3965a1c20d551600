"""Type stubs for the Rust extension `starkret._core` (kept in sync with rust/lib.rs)."""

__version__: str

def simd_level() -> str:
    """The widest SIMD level detected on this CPU at run time, e.g. ``"avx2+fma"``."""

def available_threads() -> int:
    """Number of logical CPUs the Rust thread pools use by default."""
