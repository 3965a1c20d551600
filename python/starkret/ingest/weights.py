"""Where open_clip gets a pretrained tag's weights, and failing fast when it cannot.

open_clip resolves a tag (``"openai"``) to a Hugging Face Hub file (or a plain URL) and
lets huggingface_hub download it; without network, huggingface_hub retries each
candidate file for ~25 s (~50 s in all) and the error chain never says how to go on.
:func:`check_weights` looks at the local cache once and, when nothing is there, tries one
connection (at most :data:`WEIGHTS_HOST_TIMEOUT_SECONDS`) before any download starts;
:func:`hub_offline` lets cached weights load without a request.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from starkret.errors import ModelLoadError

__all__ = ["WEIGHTS_HOST_TIMEOUT_SECONDS", "Weights", "check_weights", "hub_offline"]

#: Seconds starkret waits for one connection to the host of weights that are not in the
#: local cache before it says they cannot be downloaded.
WEIGHTS_HOST_TIMEOUT_SECONDS = 3.0
_hub_offline_lock = threading.Lock()


@dataclass(frozen=True)
class Weights:
    """Where open_clip would fetch a pretrained tag's weights, and whether they are cached."""

    #: What is looked for, e.g. ``timm/vit_large_patch14_clip_336.openai
    #: (open_clip_model.safetensors or open_clip_pytorch_model.bin)``.
    what: str
    #: The local cache folder searched.
    cache: str
    #: The URL whose host must be reachable to download them.
    url: str
    #: A cached copy exists (no network needed).
    cached: bool
    #: They come from the Hugging Face Hub (else from a plain URL).
    hub: bool


def _hub_module():
    """huggingface_hub with its ``constants`` (read at call time: tests and users may
    change them), or None when it is not installed (open_clip then downloads by URL)."""
    try:
        import huggingface_hub
        import huggingface_hub.constants
    except ImportError:
        return None
    return huggingface_hub


def _locate_weights(open_clip, model: str, tag: str) -> Weights | None:
    """Where open_clip's ``download_pretrained`` would get ``tag``'s weights (the same
    choice: the Hub when its ``hf_hub`` entry exists and huggingface_hub is installed,
    else the ``url``), and whether a copy is already cached; None for tags open_clip does
    not know (it names them itself)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg or "file" in cfg:
        return None
    hub = _hub_module()
    if cfg.get("hf_hub") and hub is not None:
        # "org/name/file" or "org/name/" (open_clip's default file name)
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        names = [filename]
        # open_clip tries a safetensors file first (pretrained._get_safe_alternatives)
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        cache = hub.constants.HF_HUB_CACHE
        cached = any(
            isinstance(hub.try_to_load_from_cache(repo, name, cache_dir=cache), str)
            for name in names
        )
        return Weights(
            what=f"{repo} ({' or '.join(names)})",
            cache=str(cache),
            url=hub.constants.ENDPOINT,
            cached=cached,
            hub=True,
        )
    url = cfg.get("url", "")
    if not url:
        return None
    cache = os.path.expanduser("~/.cache/clip")  # open_clip's download_pretrained_from_url
    name = os.path.basename(url)
    return Weights(
        what=name, cache=cache, url=url, cached=os.path.isfile(os.path.join(cache, name)), hub=False
    )


def _unreachable(weights: Weights) -> str | None:
    """Why ``weights.url`` cannot be reached (one connection attempt, bounded by
    WEIGHTS_HOST_TIMEOUT_SECONDS, through the configured proxy), or None if it can."""
    hub = _hub_module()
    if weights.hub and hub is not None and getattr(hub.constants, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE is set"
    parts = urlsplit(weights.url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or host, proxied.port or 80
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=WEIGHTS_HOST_TIMEOUT_SECONDS).close()
        except OSError as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    # Name resolution has no timeout of its own: bound the whole attempt with a thread.
    attempt = threading.Thread(target=connect, name="starkret-weights-host", daemon=True)
    attempt.start()
    attempt.join(WEIGHTS_HOST_TIMEOUT_SECONDS)
    if not outcome:
        return f"no answer from {host}:{port} within {WEIGHTS_HOST_TIMEOUT_SECONDS:g} s"
    error = outcome[0]
    return None if error is None else f"{host}:{port}: {error}"


def check_weights(open_clip, model: str, tag: str, *, hint: str) -> Weights | None:
    """Fail fast, in one line, when ``tag``'s weights are neither cached nor downloadable.

    One look at the local cache and at most one connection attempt, instead of
    huggingface_hub's retries per candidate file (~50 s without network) ending in a
    chain of errors that never says how to go on.
    """
    weights = _locate_weights(open_clip, model, tag)
    if weights is None or weights.cached:
        return weights
    reason = _unreachable(weights)
    if reason is not None:
        raise ModelLoadError(
            f"cannot get the weights {tag!r} of {model!r}: {weights.what} is not in the "
            f"local cache {weights.cache} and {weights.url} cannot be reached ({reason}); " + hint
        )
    return weights


@contextlib.contextmanager
def hub_offline(active: bool):
    """huggingface_hub in offline mode: cached weights load without a network request
    (with the network down it would retry for ~25 s before using the cache). The switch
    is process-wide while it lasts (huggingface_hub reads it from its constants), so
    embedders are built one at a time inside it."""
    hub = _hub_module() if active else None
    if hub is None:
        yield
        return
    with _hub_offline_lock:
        saved = hub.constants.HF_HUB_OFFLINE
        hub.constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            hub.constants.HF_HUB_OFFLINE = saved
