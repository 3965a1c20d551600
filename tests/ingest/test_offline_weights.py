"""A first run without network: weights that are neither cached nor downloadable fail in
seconds, in one line that says what was looked for, where, and how to go on offline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import huggingface_hub.constants
import PIL.Image
import pytest

from starkret.errors import ModelLoadError
from starkret.ingest import towers, weights
from starkret.ingest.towers import DEFAULT_MODEL, ClipEmbedder
from starkret.testing import synthetic_photo

#: What the Stark model's default weights are looked for as (open_clip's registry).
HUB_REPO = "timm/vit_large_patch14_clip_336.openai"


@pytest.fixture
def closed_port():
    """A local port nobody listens on (bound, not listening): connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_first_cli_run_without_network_fails_fast_naming_the_offline_model(tmp_path, closed_port):
    images = tmp_path / "imgs"
    images.mkdir()
    PIL.Image.fromarray(synthetic_photo(40, 30, seed=1)).save(images / "0.png")
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}",  # a Hub that refuses connections
        "NO_PROXY": "*",
        "no_proxy": "*",
    }
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    command = ["embed", str(images), "-o", str(tmp_path / "out"), "--source", "x"]
    run = subprocess.run(
        [sys.executable, "-m", "starkret", *command],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    seconds = time.monotonic() - started
    assert run.returncode == 2, run.stderr[-2000:]
    # was: huggingface_hub's retries, ~50 s, then a line that never named starkret-mini
    assert seconds < 30, f"{seconds:.1f} s"
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("starkret embed: error: ")
    assert HUB_REPO in line and str(tmp_path / "hf" / "hub") in line
    assert "--model starkret-mini" in line and "--pretrained /path/to/checkpoint" in line


def test_hub_offline_mode_fails_without_trying_the_network(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as caught:
        ClipEmbedder(DEFAULT_MODEL, device="cpu")
    assert "starkret-mini" in str(caught.value) and str(tmp_path) in str(caught.value)


def test_cached_weights_need_no_network(tmp_path, monkeypatch):
    """A copy in the Hub cache (its own layout: refs/main -> snapshots/<commit>/file) is
    found without a connection (open_clip then loads it with the Hub in offline mode)."""
    folder = tmp_path / f"models--{HUB_REPO.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (folder / "snapshots" / ("0" * 40) / "open_clip_pytorch_model.bin").write_bytes(b"x")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    found = weights.check_weights(towers._open_clip(), DEFAULT_MODEL, "openai", hint="")
    assert found is not None and found.cached and found.hub
    assert HUB_REPO in found.what and found.cache == str(tmp_path)


def test_a_host_that_never_answers_costs_one_bounded_wait(monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_HOST_TIMEOUT_SECONDS", 0.3)

    def silent_host(*args, **kwargs):
        time.sleep(3)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent_host)
    remote = weights.Weights("w", "/cache", "https://example.invalid", cached=False, hub=False)
    started = time.monotonic()
    reason = weights._unreachable(remote)
    assert time.monotonic() - started < 2
    assert reason is not None and "no answer from example.invalid:443" in reason
