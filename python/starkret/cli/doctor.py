"""`starkret doctor`: what this install can do, one readable line per component."""

from __future__ import annotations

import importlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Check:
    """One line of the doctor report; ``required`` checks decide the exit code."""

    name: str
    ok: bool
    detail: str
    required: bool = True

    def line(self) -> str:
        mark = "ok " if self.ok else ("FAIL" if self.required else "-- ")
        return f"[{mark:4}] {self.name:<12} {self.detail}"


def _guard(name: str, required: bool, probe: Callable[[], str]) -> Check:
    try:
        return Check(name, True, probe(), required)
    except Exception as exc:  # a broken component must be reported, not crash the report
        return Check(name, False, f"{type(exc).__name__}: {exc}", required)


def _starkret() -> str:
    import starkret

    return f"{starkret.__version__} (python {platform.python_version()}, {platform.machine()})"


def _core() -> str:
    import starkret._core as _core

    return f"{_core.__version__}, SIMD {_core.simd_level()}, {_core.available_threads()} threads"


def _torch() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        cuda = f"CUDA {torch.version.cuda} usable: {', '.join(names)}"
    else:
        cuda = "CUDA not usable (CPU only)"
    return f"{torch.__version__}, {cuda}"


def _faiss() -> str:
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    build = f"GPU build, {gpus} GPU(s)" if hasattr(faiss, "StandardGpuResources") else "CPU build"
    return f"{faiss.__version__}, {build}"


def _version_of(module: str) -> Callable[[], str]:
    def probe() -> str:
        mod = importlib.import_module(module)
        return f"{getattr(mod, '__version__', 'unknown version')}, imports"

    return probe


def _tiny_model() -> str:
    import numpy as np

    from starkret.ingest.towers import TINY_MODEL, ClipEmbedder

    start = time.perf_counter()
    emb = ClipEmbedder(TINY_MODEL, device="cpu")
    text = emb.encode_texts(["a dog on a beach"], dtype="float32")
    image = emb.encode_images(
        np.zeros((1, 3, emb.image_size, emb.image_size), np.float32), dtype="float32"
    )
    norms = np.linalg.norm(np.concatenate([text, image]), axis=1)
    if not np.allclose(norms, 1.0, atol=1e-4):
        raise RuntimeError(f"embeddings are not unit length: {norms}")
    took = time.perf_counter() - start
    return f"{TINY_MODEL} encodes text and images ({emb.dim}-d) on CPU in {took:.2f} s"


def run_checks() -> list[Check]:
    """Probe every component; never raises."""
    return [
        _guard("starkret", True, _starkret),
        _guard("rust core", True, _core),
        _guard("torch", True, _torch),
        _guard("open_clip", True, _version_of("open_clip")),
        _guard("numpy", True, _version_of("numpy")),
        _guard("pyarrow", True, _version_of("pyarrow")),
        _guard("faiss", True, _faiss),
        # optional: the `starkret[autofaiss]` extra (its pins conflict with numpy 2)
        _guard("autofaiss", False, _version_of("autofaiss")),
        _guard("tiny model", True, _tiny_model),
    ]


def main() -> int:
    """Print the report; exit code 0 when every required component works."""
    checks = run_checks()
    for check in checks:
        print(check.line(), flush=True)
    failed = [c.name for c in checks if c.required and not c.ok]
    if failed:
        print(f"starkret is not usable: {', '.join(failed)} failed")
        return 1
    print("starkret is ready")
    return 0
