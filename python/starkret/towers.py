"""CLIP image and text towers (open_clip) that return L2-normalised numpy vectors."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_MODEL", "MINI_MODEL", "TINY_MODEL", "ClipEmbedder"]

#: The model of the reference setup (Stark): OpenAI CLIP ViT-L/14 at 336 px.
#: OpenAI's weights were trained with QuickGELU, so they need the ``-quickgelu`` config.
DEFAULT_MODEL = "ViT-L-14-336-quickgelu"
#: A very small, randomly initialised CLIP shipped with starkret for tests and demos.
TINY_MODEL = "starkret-tiny"
#: A small CLIP (64 px) trained on `starkret.synthetic` scenes and charts by
#: scripts/train_mini.py; its weights ship with starkret (``pretrained="starkret"``).
MINI_MODEL = "starkret-mini"
#: The ``pretrained`` tag of the weights bundled with starkret.
PACKAGED = "starkret"

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_PACKAGED_WEIGHTS = {MINI_MODEL: _CONFIG_DIR / "starkret-mini.safetensors"}
_registered = False
_register_lock = threading.Lock()


class _Default:
    def __repr__(self) -> str:
        return "<model default>"


#: Sentinel for "the model's own default weights" (``"openai"`` for OpenAI CLIP models).
MODEL_DEFAULT: Any = _Default()

_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_OUTPUT_DTYPES = {"float16": np.float16, "float32": np.float32}


def _open_clip():
    """Import open_clip with starkret's own model configs registered (once per process)."""
    global _registered
    import open_clip

    with _register_lock:
        if not _registered:
            open_clip.add_model_config(_CONFIG_DIR)
            _registered = True
    return open_clip


class _DropRandomInitNotice(logging.Filter):
    # open_clip logs a root-level warning when it builds a model without weights; with
    # pretrained=None that is what the caller asked for, so it is noise there.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    if not active:
        yield
        return
    notice = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not usable in this process")
    return resolved


def _resolve_precision(precision: str, device) -> str:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision='fp16' is not supported on CPU; use 'fp32' or 'bf16'")
    return precision


def _resolve_pretrained(open_clip, model: str, pretrained: Any) -> str | None:
    """Turn the ``pretrained`` argument into an open_clip tag, a file path, or None (random)."""
    if pretrained is None:
        return None
    if model in _PACKAGED_WEIGHTS and pretrained in (MODEL_DEFAULT, PACKAGED):
        return PACKAGED
    if pretrained is MODEL_DEFAULT:
        if model == TINY_MODEL:
            return None
        tags = open_clip.list_pretrained_tags_by_model(model)
        if "openai" in tags:
            return "openai"
        if len(tags) == 1:
            return tags[0]
        if not tags:
            raise ValueError(
                f"open_clip has no pretrained weights registered for {model!r}: pass a local "
                "checkpoint path as pretrained=..., or pretrained=None for random weights"
            )
        raise ValueError(
            f"{model!r} has several pretrained tags ({', '.join(tags)}): "
            "choose one with pretrained=..."
        )
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            f"pretrained must be a tag, a path or None, got {type(pretrained).__name__}"
        )
    pretrained = os.fspath(pretrained)
    if os.path.isdir(pretrained):
        raise ValueError(
            f"pretrained={pretrained!r} is a directory; pass the checkpoint file inside it "
            "(e.g. open_clip_pytorch_model.bin or a .pt/.safetensors file)"
        )
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))
    if looks_like_path and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained}")
    return pretrained


def _load_packaged(model, path: Path) -> None:
    """Load weights written by scripts/train_mini.py (token embedding rows stored sparsely)."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    ids = state.pop("starkret.token_ids")
    rows = state.pop("starkret.token_rows")
    table = torch.zeros_like(model.token_embedding.weight, device="cpu")
    table[ids] = rows
    state["token_embedding.weight"] = table
    model.load_state_dict(state, strict=True)


class ClipEmbedder:
    """CLIP image and text towers from open_clip, returning L2-normalised vectors.

    ``model`` is an open_clip model name (``"ViT-L-14-336-quickgelu"`` for the Stark
    reference, ``"starkret-mini"``, a small CLIP trained on synthetic scenes and charts
    whose weights ship with starkret, or ``"starkret-tiny"``, a tiny randomly initialised
    CLIP that needs no download). ``pretrained`` is an open_clip tag (``"openai"``), a
    local checkpoint file, or ``None`` for random weights; by default it is the model's
    own default (``"openai"`` for OpenAI CLIP configs, the bundled weights (tag
    ``"starkret"``) for ``starkret-mini``, random seeded weights for ``starkret-tiny``).
    OpenAI's weights need the ``-quickgelu`` config of a model.

    On CUDA the towers run under fp16 autocast (``precision="auto"``; ``"bf16"`` and
    ``"fp32"`` on request); on CPU in float32. Outputs are numpy arrays whose rows have
    unit L2 norm, float16 by default (float32 with ``dtype="float32"``).

    >>> emb = ClipEmbedder("starkret-tiny")
    >>> emb.encode_texts(["a golden retriever on a beach"]).shape
    (1, 64)
    >>> pixels = np.zeros((2, 3, emb.image_size, emb.image_size), dtype=np.float32)
    >>> emb.encode_images(pixels).dtype
    dtype('float16')
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pretrained: str | os.PathLike[str] | None = MODEL_DEFAULT,
        *,
        device: str = "auto",
        precision: str = "auto",
        image_size: int | None = None,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        import torch

        from .modelspec import normalise_model

        # clip-retrieval's spellings too: open_clip:NAME/TAG, ViT-L/14@336px
        model, pretrained = normalise_model(model, pretrained, MODEL_DEFAULT)
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be an open_clip model name, got {model!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        open_clip = _open_clip()
        if model not in open_clip.list_models():
            raise ValueError(
                f"unknown model {model!r}; see open_clip.list_models() (e.g. {DEFAULT_MODEL!r}, "
                f"{TINY_MODEL!r})"
            )
        self.model_name = model
        self.pretrained = _resolve_pretrained(open_clip, model, pretrained)
        self.device = _resolve_device(device)
        self.precision = _resolve_precision(precision, self.device)
        self.seed = seed
        self.batch_size = batch_size

        # Random initialisation draws from torch's global generator: seed a private
        # copy of it so the same seed always gives the same weights, and the
        # caller's random state is left untouched.
        packaged = self.pretrained == PACKAGED and model in _PACKAGED_WEIGHTS
        with (
            torch.random.fork_rng(devices=[]),
            _quiet_random_init(self.pretrained is None or packaged),
        ):
            torch.manual_seed(seed)
            try:
                self.model = open_clip.create_model(
                    model,
                    pretrained=None if packaged else self.pretrained,
                    device=self.device,
                    precision="fp32",
                    force_image_size=image_size,
                )
            except RuntimeError as exc:
                if self.pretrained is not None and not os.path.isfile(self.pretrained):
                    raise RuntimeError(
                        f"could not load weights {self.pretrained!r} for {model!r} ({exc}). "
                        "Without network access, pass a local checkpoint file as pretrained=..."
                    ) from exc
                raise
        if packaged:
            _load_packaged(self.model, _PACKAGED_WEIGHTS[model])
            self.model.to(self.device)
        self.model.eval()
        self._tokenizer = open_clip.get_tokenizer(model)

    # ==== Properties ====

    @property
    def dim(self) -> int:
        """Embedding dimension (rows returned by the encoders have this many columns)."""
        return int(self.model.text_projection.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the square input image the image tower expects, in pixels."""
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        """Number of text tokens; longer texts are truncated."""
        return int(self.model.context_length)

    @property
    def preprocess_config(self) -> dict[str, Any]:
        """The preprocessing the model expects: size, mean, std, interpolation, resize mode."""
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        cfg["size"] = self.image_size
        return cfg

    def __repr__(self) -> str:
        return (
            f"ClipEmbedder(model={self.model_name!r}, pretrained={self.pretrained!r}, "
            f"device='{self.device}', precision={self.precision!r}, dim={self.dim})"
        )

    # ==== Encoding ====

    def encode_images(self, pixels: Any, *, dtype: str = "float16") -> np.ndarray:
        """Embed preprocessed images: (N, 3, S, S) float array in, (N, dim) unit vectors out.

        ``pixels`` must already be resized, cropped and normalised (``starkret.preprocess``
        or open_clip's transform), as a numpy array or torch tensor, with S = ``image_size``.
        """
        import torch

        out_dtype = _output_dtype(dtype)
        tensor = torch.as_tensor(pixels) if not isinstance(pixels, torch.Tensor) else pixels
        size = self.image_size
        if tensor.ndim != 4 or tensor.shape[1] != 3 or tuple(tensor.shape[2:]) != (size, size):
            raise ValueError(
                f"pixels must have shape (N, 3, {size}, {size}), got {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise ValueError(f"pixels must be a float array (normalised), got {tensor.dtype}")
        return self._run(tensor, self.model.encode_image, out_dtype, cast_input=True)

    def encode_texts(self, texts: Sequence[str], *, dtype: str = "float16") -> np.ndarray:
        """Embed texts: a sequence of N strings in, (N, dim) unit vectors out.

        Texts longer than ``context_length`` tokens are truncated, as in CLIP's reference use.
        """
        out_dtype = _output_dtype(dtype)
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a sequence of strings, not a single string")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        tokens = self._tokenizer(texts, context_length=self.context_length)
        return self._run(tokens, self.model.encode_text, out_dtype, cast_input=False)

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        half = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=half)

    def _run(self, inputs, tower, out_dtype, *, cast_input: bool) -> np.ndarray:
        import torch

        n = int(inputs.shape[0])
        out = np.empty((n, self.dim), dtype=out_dtype)
        with torch.inference_mode(), self._autocast():
            for start in range(0, n, self.batch_size):
                chunk = self._to_device(inputs[start : start + self.batch_size])
                if cast_input:
                    # fp32 input; autocast runs the convolutions and matmuls in half
                    chunk = chunk.float()
                features = tower(chunk).float()
                features = torch.nn.functional.normalize(features, dim=-1)
                out[start : start + len(chunk)] = features.cpu().numpy()
        return out

    def _to_device(self, chunk):
        """Host to device: through a reused page-locked buffer on CUDA, so the copy is a
        fast asynchronous DMA instead of a pageable, blocking one."""
        if self.device.type != "cuda" or chunk.device.type != "cpu":
            return chunk.to(self.device)
        staging = getattr(self, "_staging", None)
        if staging is None or staging.dtype != chunk.dtype or staging.numel() < chunk.numel():
            staging = chunk.new_empty(chunk.numel()).pin_memory()
            self._staging = staging
        view = staging[: chunk.numel()].view(chunk.shape)
        view.copy_(chunk)
        # The buffer is reused only after this batch's features came back to the
        # host (`.cpu()` below waits for the device), so it is never overwritten early.
        return view.to(self.device, non_blocking=True)


def _output_dtype(dtype: str):
    try:
        return _OUTPUT_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}") from None
