"""Fixtures shared by the serve tests: a demo-like DB per test module, a real server on it,
and a guard that ends a hanging test with a traceback."""

from __future__ import annotations

import faulthandler

import pytest

import starkret


@pytest.fixture(autouse=True)
def hang_guard():
    """Ends the run with a traceback if a test here hangs (a client may wait for an hour)."""
    faulthandler.dump_traceback_later(180, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory, tiny_embedder):
    """A demo-like DB embedded with starkret-tiny, one per test module."""
    from serve_support import build_demo_db

    root = tmp_path_factory.mktemp("serve-demo")
    return starkret.ImageDB.open(build_demo_db(root, tiny_embedder), embedder=tiny_embedder)


@pytest.fixture(scope="module")
def server(demo_db):
    """A real `starkret serve` on 127.0.0.1 with the default settings."""
    from serve_support import Server

    with Server(demo_db) as s:
        yield s
