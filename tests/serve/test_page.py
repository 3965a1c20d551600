"""The page of `starkret serve` in headless Chromium (Debian's `chromium` package):
load it, run a search through its form, and check that the gallery shows images."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_support import Server

from starkret.serve.schema import ServeConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(demo_db):
    # starkret-tiny's random weights score everything near 0: no threshold for the page.
    with Server(demo_db, ServeConfig(min_score=-1.0)) as s:
        yield s


def _chromium(*args: str, profile) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        reason = "chromium is not installed (`make test` installs it: scripts/browser.sh)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the browser test")
        pytest.skip(reason)
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            # Only loopback traffic: every other host name fails to resolve.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_page_search_fills_the_gallery_with_images(server, tmp_path):
    done = _chromium("--dump-dom", f"{server.url}/?q={quote('a dog on a beach')}", profile=tmp_path)
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    gallery = re.search(r'<div class="gallery" id="gallery"[^>]*>(.*?)</div>', dom, re.S)
    assert gallery is not None, dom[-2000:]
    figures = re.findall(r"<figure.*?</figure>", gallery.group(1), re.S)
    # k=5 per source: 5 cc12m + 4 chartqa + 5 remote images.
    assert len(figures) == 14
    loaded = [f for f in figures if 'data-loaded="1"' in f]
    # Local images (shards, folder) decode in the browser; remote ones redirect offline.
    assert len(loaded) == 9
    assert all(re.search(r'class="score">-?\d\.\d{3}<', f) for f in figures)
    sources = set(re.findall(r'class="src"> (\w+)<', gallery.group(1)))
    assert sources == {"cc12m", "chartqa", "remote"}
    assert "images in cc12m, chartqa, remote" in dom  # /health answered the page
    assert 'id="search-error"></div>' in dom


def test_page_aligns_a_pasted_dialogue_and_shows_the_conversations_images(server, tmp_path):
    dialogue = (
        "A: how was the trip?\nB: [Sharing Image] a dog on a beach\nB: [Sharing Image] a chart"
    )
    url = f"{server.url}/?conversation=page-test&text={quote(dialogue)}"
    done = _chromium("--dump-dom", url, profile=tmp_path)
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    statuses = re.findall(r'<span class="status (\w+)">', dom)
    assert statuses == ["ok", "ok"]
    shown = re.search(r'<div class="gallery" id="shown">(.*?)</div>\s*<script', dom, re.S)
    assert shown is not None, dom[-2000:]
    assert len(re.findall(r'<figure class="chosen">', shown.group(1))) == 2


@pytest.fixture(scope="module")
def keyed_server(demo_db):
    """The same DB behind an API key."""
    with Server(demo_db, ServeConfig(min_score=-1.0, api_key="page-key")) as s:
        yield s


def test_page_sends_the_api_key_and_shows_the_images(keyed_server, tmp_path):
    url = f"{keyed_server.url}/?q={quote('a dog on a beach')}#key=page-key"
    done = _chromium("--dump-dom", url, profile=tmp_path / "with")
    dom = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    gallery = re.search(r'<div class="gallery" id="gallery"[^>]*>(.*?)</div>', dom, re.S)
    assert gallery is not None, dom[-2000:]
    figures = re.findall(r"<figure.*?</figure>", gallery.group(1), re.S)
    assert len(figures) == 14
    # Local images are fetched with the key; remote ones go to their (offline) URL.
    assert len([f for f in figures if 'data-loaded="1"' in f]) == 9
    without = _chromium(
        "--dump-dom", f"{keyed_server.url}/?q={quote('a dog')}", profile=tmp_path / "without"
    ).stdout
    assert "this server needs its API key" in without
