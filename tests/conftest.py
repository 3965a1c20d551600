"""Shared test setup.

torch is pinned to one thread: on 2-core machines two torch threads made the tiny
model 10-17x slower under contention with the rest of the test run.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_embedder():
    """One seeded starkret-tiny embedder on CPU, shared by the tests that only read it."""
    from starkret import ClipEmbedder

    return ClipEmbedder("starkret-tiny", device="cpu")


def pytest_collection_modifyitems(config, items):
    """Tests named *autofaiss* need the `starkret[autofaiss]` extra: marked `autofaiss`
    (CI's second environment runs `-m autofaiss`), skipped where it is not installed."""
    import importlib.util

    missing = importlib.util.find_spec("autofaiss") is None
    skip = pytest.mark.skip(reason="autofaiss is not installed (pip install 'starkret[autofaiss]')")
    for item in items:
        if "autofaiss" in item.name:
            item.add_marker(pytest.mark.autofaiss)
            if missing:
                item.add_marker(skip)
