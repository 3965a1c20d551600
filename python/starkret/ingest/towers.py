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

from starkret.errors import InvalidInputError, InvalidTypeError, ModelLoadError, NotFoundError
from starkret.ingest.weights import check_weights, hub_offline

__all__ = ["DEFAULT_MODEL", "MINI_MODEL", "TINY_MODEL", "ClipEmbedder", "PendingEmbeddings"]

#: The model of the reference setup (Stark): OpenAI CLIP ViT-L/14 at 336 px.
#: OpenAI's weights were trained with QuickGELU, so they need the ``-quickgelu`` config.
DEFAULT_MODEL = "ViT-L-14-336-quickgelu"
#: A very small, randomly initialised CLIP shipped with starkret for tests and demos.
TINY_MODEL = "starkret-tiny"
#: A small CLIP (64 px) trained on `starkret.testing.synthetic` scenes and charts by
#: scripts/train_mini.py; its weights ship with starkret (``pretrained="starkret"``).
MINI_MODEL = "starkret-mini"
#: The ``pretrained`` tag of the weights bundled with starkret.
PACKAGED = "starkret"

_CONFIG_DIR = Path(__file__).parent.parent / "model_configs"
_PACKAGED_WEIGHTS = {MINI_MODEL: _CONFIG_DIR / "starkret-mini.safetensors"}
_registered = False
_register_lock = threading.Lock()


class _Default:
    def __repr__(self) -> str:
        return "<model default>"


#: Sentinel for "the model's own default weights" (``"openai"`` for OpenAI CLIP models).
MODEL_DEFAULT: Any = _Default()

#: How to go on without network access, for every message about missing weights.
_OFFLINE_HINT = (
    f"offline, use the bundled model (--model {MINI_MODEL}, model={MINI_MODEL!r}) or a local "
    "checkpoint file (--pretrained /path/to/checkpoint, pretrained=...)"
)

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
        raise InvalidInputError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(
            f"device={device!r} was requested but CUDA is not usable in this process"
        )
    return resolved


def _resolve_precision(precision: str, device) -> str:
    if precision not in _PRECISIONS:
        raise InvalidInputError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise InvalidInputError("precision='fp16' is not supported on CPU; use 'fp32' or 'bf16'")
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
            raise InvalidInputError(
                f"open_clip has no pretrained weights registered for {model!r}: pass a local "
                "checkpoint path as pretrained=..., or pretrained=None for random weights"
            )
        raise InvalidInputError(
            f"{model!r} has several pretrained tags ({', '.join(tags)}): "
            "choose one with pretrained=..."
        )
    if not isinstance(pretrained, (str, os.PathLike)):
        raise InvalidTypeError(
            f"pretrained must be a tag, a path or None, got {type(pretrained).__name__}"
        )
    pretrained = os.fspath(pretrained)
    if os.path.isdir(pretrained):
        raise InvalidInputError(
            f"pretrained={pretrained!r} is a directory; pass the checkpoint file inside it "
            "(e.g. open_clip_pytorch_model.bin or a .pt/.safetensors file)"
        )
    looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors"))
    if looks_like_path and not os.path.isfile(pretrained):
        raise NotFoundError(f"pretrained checkpoint not found: {pretrained}")
    return pretrained


def _load_packaged(model, path: Path) -> None:
    """Load weights written by scripts/train_mini.py (token embedding rows stored sparsely).

    Ids the training text never used share one trained *unknown* row when the file has
    one (``starkret.unknown_row``), else they are zero rows.
    """
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    ids = state.pop("starkret.token_ids")
    rows = state.pop("starkret.token_rows")
    table = torch.zeros_like(model.token_embedding.weight, device="cpu")
    unknown = state.pop("starkret.unknown_row", None)
    if unknown is not None:
        table[:] = unknown
    table[ids] = rows
    state["token_embedding.weight"] = table
    model.load_state_dict(state, strict=True)


class PendingEmbeddings:
    """Embeddings of one :meth:`ClipEmbedder.submit_images` call, maybe still being computed.

    ``result()`` waits for them and returns the (N, dim) array (the same array on
    every call); ``done()`` says whether waiting would block.
    """

    def __init__(self, parts: list, count: int, dim: int, dtype) -> None:
        # parts: (host tensor, CUDA event or None) per batch, in submission order
        self._parts = parts
        self._count = count
        self._dim = dim
        self._dtype = dtype
        self._value: np.ndarray | None = None

    def __len__(self) -> int:
        return self._count

    def done(self) -> bool:
        """True when ``result()`` would return without waiting for the device."""
        return self._value is not None or all(e is None or e.query() for _, e in self._parts)

    def result(self) -> np.ndarray:
        """The (N, dim) unit vectors, in the order the images were submitted."""
        if self._value is None:
            rows = []
            for host, event in self._parts:
                if event is not None:
                    event.synchronize()
                rows.append(host.numpy())
            if rows:
                value = np.concatenate(rows) if len(rows) > 1 else rows[0].copy()
            else:
                value = np.empty((0, self._dim), dtype=self._dtype)
            self._value = value
            self._parts = []  # the pinned host buffers go back to torch's cache
        return self._value


class _Uploader:
    """Host-to-device copies on a side CUDA stream through two pinned staging buffers.

    While the device computes on one batch, the next one is copied into the other
    buffer and across the bus. A buffer is refilled only after the copy out of it has
    finished (its event), and the compute stream waits for a batch's copy event
    before it reads the batch.
    """

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.buffers: list = [None, None]
        self.events: list = [None, None]
        self.turn = 0

    def upload(self, chunk):
        import torch

        slot = self.turn
        self.turn ^= 1
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        buffer = self.buffers[slot]
        if buffer is None or buffer.dtype != chunk.dtype or buffer.numel() < chunk.numel():
            buffer = torch.empty(chunk.numel(), dtype=chunk.dtype, pin_memory=True)
            self.buffers[slot] = buffer
        staged = buffer[: chunk.numel()].view(chunk.shape)
        staged.copy_(chunk)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            on_device = torch.empty(chunk.shape, dtype=chunk.dtype, device=self.device)
            on_device.copy_(staged, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self.events[slot] = copied
        compute.wait_event(copied)
        # allocated on the copy stream, read on the compute stream: tell the allocator
        on_device.record_stream(compute)
        return on_device


class ClipEmbedder:
    """CLIP image and text towers from open_clip, returning L2-normalised vectors.

    ``model`` is an open_clip model name (``"ViT-L-14-336-quickgelu"`` for the Stark
    reference, ``"starkret-mini"``, a small CLIP trained on clip-art drawings, emoji and
    synthetic scenes and charts, whose weights ship with starkret, or ``"starkret-tiny"``,
    a tiny randomly initialised CLIP that needs no download). ``pretrained`` is an
    open_clip tag (``"openai"``), a local checkpoint file, or ``None`` for random weights;
    by default it is the model's own default (``"openai"`` for OpenAI CLIP configs, the
    bundled weights (tag ``"starkret"``) for ``starkret-mini``, random seeded weights for
    ``starkret-tiny``).
    OpenAI's weights need the ``-quickgelu`` config of a model.

    Precision: ``"auto"`` is fp16 on CUDA and fp32 on CPU; ``"fp16"``, ``"bf16"`` and
    ``"fp32"`` on request. In half precision the image tower's weights are cast once
    (LayerNorms stay fp32, as in open_clip's own fp16 models); the text tower runs under
    autocast. The image tower's attention runs through ``scaled_dot_product_attention``
    (flash / memory-efficient kernels on CUDA).

    ``compile``: ``None`` compiles the image tower with ``torch.compile`` on CUDA and
    runs it eagerly elsewhere; ``True`` / ``False`` force it; a string is a
    ``torch.compile`` mode (e.g. ``"max-autotune-no-cudagraphs"``; the environment
    variable ``STARKRET_COMPILE_MODE`` sets it otherwise). The compiled tower always runs
    full batches of ``batch_size`` (the last one padded) so it compiles once.

    ``batch_size=None`` picks 256 images per forward pass on CUDA and 64 on CPU.

    Outputs are numpy arrays whose rows have unit L2 norm, float16 by default (float32
    with ``dtype="float32"``).

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
        batch_size: int | None = None,
        compile: bool | str | None = None,
    ) -> None:
        import torch

        from starkret.ingest.modelspec import normalise_model

        # clip-retrieval's spellings too: open_clip:NAME/TAG, ViT-L/14@336px
        model, pretrained = normalise_model(model, pretrained, MODEL_DEFAULT)
        if not isinstance(model, str) or not model:
            raise InvalidInputError(f"model must be an open_clip model name, got {model!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
            raise InvalidInputError(f"image_size must be a positive int, got {image_size!r}")
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0
        ):
            raise InvalidInputError(
                f"batch_size must be a positive int or None, got {batch_size!r}"
            )
        open_clip = _open_clip()
        if model not in open_clip.list_models():
            raise InvalidInputError(
                f"unknown model {model!r}; see open_clip.list_models() (e.g. {DEFAULT_MODEL!r}, "
                f"{TINY_MODEL!r})"
            )
        self.model_name = model
        self.pretrained = _resolve_pretrained(open_clip, model, pretrained)
        self.device = _resolve_device(device)
        self.precision = _resolve_precision(precision, self.device)
        self.compiled, self.compile_mode = _resolve_compile(compile, self.device)
        self.seed = seed
        self.batch_size = batch_size or _DEFAULT_BATCH_SIZE.get(self.device.type, 64)

        # Random initialisation draws from torch's global generator: seed a private
        # copy of it so the same seed always gives the same weights, and the
        # caller's random state is left untouched.
        packaged = self.pretrained == PACKAGED and model in _PACKAGED_WEIGHTS
        weights = None
        if self.pretrained is not None and not packaged and not os.path.isfile(self.pretrained):
            weights = check_weights(open_clip, model, self.pretrained, hint=_OFFLINE_HINT)
        with (
            torch.random.fork_rng(devices=[]),
            _quiet_random_init(self.pretrained is None or packaged),
            hub_offline(weights is not None and weights.cached and weights.hub),
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
                    raise ModelLoadError(
                        f"could not load weights {self.pretrained!r} for {model!r} ({exc}); "
                        + _OFFLINE_HINT
                    ) from exc
                raise
        if packaged:
            _load_packaged(self.model, _PACKAGED_WEIGHTS[model])
            self.model.to(self.device)
        self.model.eval()
        self._tokenizer = open_clip.get_tokenizer(model)
        self._setup_image_tower()

    def _setup_image_tower(self) -> None:
        import torch

        from starkret.ingest.preprocess import OPENAI_MEAN, OPENAI_STD, normalisation_table

        visual = self.model.visual
        self.sdpa_blocks = _use_sdpa(visual)
        self._compute_dtype = _torch_dtype(self.precision)
        if self._compute_dtype != torch.float32:
            _cast_to_half(visual, self._compute_dtype)
        cfg = self.preprocess_config
        table = normalisation_table(
            tuple(cfg.get("mean") or OPENAI_MEAN), tuple(cfg.get("std") or OPENAI_STD), "float32"
        )
        # The (3, 256) float32 lookup table of starkret.preprocess, flattened, then cast
        # to the compute dtype (a cast per entry is the same as a cast per pixel).
        self._table = torch.from_numpy(table.copy()).reshape(-1).to(self.device)
        self._table = self._table.to(self._compute_dtype)
        self._channel_base = torch.tensor([0, 256, 512], dtype=torch.int32, device=self.device)
        self._channel_base = self._channel_base.view(1, 3, 1, 1)
        self._forward = self._image_features
        if self.compiled:
            self._forward = torch.compile(
                self._image_features, mode=self.compile_mode, dynamic=False
            )
        self._uploader = _Uploader(self.device) if self.device.type == "cuda" else None
        self._submit_lock = threading.Lock()

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

    @property
    def accepts_uint8(self) -> bool:
        """True: ``encode_images`` / ``submit_images`` take uint8 crops (CHW or HWC)."""
        return True

    def __repr__(self) -> str:
        return (
            f"ClipEmbedder(model={self.model_name!r}, pretrained={self.pretrained!r}, "
            f"device='{self.device}', precision={self.precision!r}, dim={self.dim}, "
            f"batch_size={self.batch_size}, compiled={self.compiled})"
        )

    # ==== Encoding ====

    def encode_images(self, pixels: Any, *, dtype: str = "float16") -> np.ndarray:
        """Embed image crops: (N, dim) unit vectors out.

        ``pixels`` (a numpy array or torch tensor, S = ``image_size``) is either
        normalised float pixels (N, 3, S, S) (``starkret.preprocess`` or open_clip's
        transform), or uint8 crops before normalisation, (N, 3, S, S) or (N, S, S, 3).
        uint8 crops are normalised on the device with ``starkret.preprocess``'s float32
        table, so they give exactly the embeddings of the float32 pixels they stand for.
        """
        return self.submit_images(pixels, dtype=dtype).result()

    def submit_images(self, pixels: Any, *, dtype: str = "float16") -> PendingEmbeddings:
        """Start embedding ``pixels`` (as for ``encode_images``); ``.result()`` waits.

        On CUDA this returns once the batches are queued: the copy of the next
        submission overlaps the computation of this one. Results come back in
        submission order. On CPU the work is done before it returns. Host arrays
        are copied before this returns, so the caller may reuse their memory at once.
        """
        import torch

        out_dtype = _output_dtype(dtype)
        tensor, hwc = self._check_pixels(pixels)
        n = int(tensor.shape[0])
        torch_out = torch.float16 if out_dtype == np.float16 else torch.float32
        parts = []
        with self._submit_lock, torch.inference_mode(), self._on_device():
            for start in range(0, n, self.batch_size):
                chunk = tensor[start : start + self.batch_size]
                if self._uploader is not None and chunk.device.type == "cpu":
                    chunk = self._uploader.upload(chunk)
                else:
                    chunk = chunk.to(self.device)
                features = self._embed_batch(chunk, hwc).to(torch_out)
                if self.device.type == "cuda":
                    host = torch.empty(features.shape, dtype=torch_out, pin_memory=True)
                    host.copy_(features, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(self.device))
                    parts.append((host, ready))
                else:
                    parts.append((features.cpu(), None))
        return PendingEmbeddings(parts, n, self.dim, out_dtype)

    def warmup(self) -> None:
        """Run one batch now, so that compiling (if any) happens here and not later."""
        size = self.image_size
        self.encode_images(np.zeros((1, size, size, 3), dtype=np.uint8))

    def _check_pixels(self, pixels):
        import torch

        tensor = pixels if isinstance(pixels, torch.Tensor) else torch.as_tensor(pixels)
        size = self.image_size
        shape = tuple(tensor.shape)
        chw = tensor.ndim == 4 and shape[1] == 3 and shape[2:] == (size, size)
        hwc = tensor.ndim == 4 and shape[1:3] == (size, size) and shape[3] == 3
        if tensor.dtype == torch.uint8:
            if not (chw or hwc):
                raise InvalidInputError(
                    f"uint8 pixels must have shape (N, 3, {size}, {size}) or "
                    f"(N, {size}, {size}, 3), got {shape}"
                )
            return tensor, not chw
        if not tensor.is_floating_point():
            raise InvalidInputError(
                f"pixels must be a float array (normalised) or uint8 crops, got {tensor.dtype}"
            )
        if not chw:
            raise InvalidInputError(f"pixels must have shape (N, 3, {size}, {size}), got {shape}")
        return tensor, False

    def _on_device(self):
        import torch

        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _normalise(self, chunk, hwc: bool):
        """Device tensor in, normalised (B, 3, S, S) pixels of the compute dtype out."""
        import torch

        if chunk.dtype != torch.uint8:
            return chunk.to(self._compute_dtype).contiguous()
        if hwc:
            chunk = chunk.permute(0, 3, 1, 2)
        # a lookup, not arithmetic: the same values as the CPU float32 path, whatever
        # the compiler or the device does with floating point
        index = chunk.to(torch.int32) + self._channel_base
        flat = self._table.index_select(0, index.reshape(-1))
        return flat.view(index.shape)

    def _embed_batch(self, chunk, hwc: bool):
        import torch

        pixels = self._normalise(chunk, hwc)
        n = int(pixels.shape[0])
        if self.compiled and n < self.batch_size:
            # one compiled graph for one shape: pad the last batch, keep its rows
            pad = pixels.new_zeros((self.batch_size - n, *pixels.shape[1:]))
            pixels = torch.cat([pixels, pad])
        if self.compile_mode in _CUDAGRAPH_MODES:
            # each call is a new step for CUDA graph trees (outputs are copied out at once)
            torch.compiler.cudagraph_mark_step_begin()
        return self._forward(pixels)[:n]

    def _image_features(self, pixels):
        import torch

        features = self.model.visual(pixels).float()
        return torch.nn.functional.normalize(features, dim=-1)

    def encode_texts(self, texts: Sequence[str], *, dtype: str = "float16") -> np.ndarray:
        """Embed texts: a sequence of N strings in, (N, dim) unit vectors out.

        Texts longer than ``context_length`` tokens are truncated, as in CLIP's reference use.
        """
        import torch

        out_dtype = _output_dtype(dtype)
        if isinstance(texts, (str, bytes)):
            raise InvalidTypeError("texts must be a sequence of strings, not a single string")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidTypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        tokens = self._tokenizer(texts, context_length=self.context_length)
        out = np.empty((len(texts), self.dim), dtype=out_dtype)
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), self.batch_size):
                chunk = tokens[start : start + self.batch_size].to(self.device)
                features = self.model.encode_text(chunk).float()
                features = torch.nn.functional.normalize(features, dim=-1)
                out[start : start + len(chunk)] = features.cpu().numpy()
        return out

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._compute_dtype)


#: Images per forward pass when ``batch_size=None``. 256 keeps a GPU busy with
#: ViT-L/14@336 (its activations in half precision take a few GiB) without probing.
_DEFAULT_BATCH_SIZE = {"cuda": 256, "cpu": 64}
#: Environment variable naming the torch.compile mode when ``compile`` is not a string.
COMPILE_MODE_ENV = "STARKRET_COMPILE_MODE"
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def _torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _resolve_compile(compile: Any, device) -> tuple[bool, str | None]:
    if compile is None:
        enabled, mode = device.type == "cuda", None
    elif isinstance(compile, bool):
        enabled, mode = compile, None
    elif isinstance(compile, str):
        enabled, mode = True, compile
    else:
        raise InvalidTypeError(
            f"compile must be None, a bool or a torch.compile mode, got {compile!r}"
        )
    if enabled and mode is None:
        mode = os.environ.get(COMPILE_MODE_ENV) or None
    if mode is not None and mode not in _COMPILE_MODES:
        raise InvalidInputError(f"compile mode must be one of {_COMPILE_MODES}, got {mode!r}")
    return enabled, (mode if enabled else None)


def _plain_self_attention(attn) -> bool:
    import torch

    return (
        isinstance(attn, torch.nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
    )


def _use_sdpa(visual) -> int:
    """Run the self-attention of open_clip's standard blocks through
    ``scaled_dot_product_attention``; returns how many blocks now do.

    open_clip's blocks call ``nn.MultiheadAttention``, which takes its fused fast path
    only for fp32 eager calls outside autocast and otherwise goes through transposes
    to sequence-first layout. The blocks keep their parameters and state-dict keys: only
    their class changes, to a subclass whose ``attention`` calls SDPA directly.
    """
    from open_clip.transformer import ResidualAttentionBlock

    sdpa_block = _sdpa_block_class()
    count = 0
    for module in visual.modules():
        if type(module) is ResidualAttentionBlock and _plain_self_attention(module.attn):
            module.__class__ = sdpa_block
            count += 1
    return count


_SDPA_BLOCK = None


def _sdpa_block_class():
    global _SDPA_BLOCK
    if _SDPA_BLOCK is None:
        import torch.nn.functional as F
        from open_clip.transformer import ResidualAttentionBlock

        class SdpaResidualAttentionBlock(ResidualAttentionBlock):
            """open_clip's block with self-attention through F.scaled_dot_product_attention."""

            def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
                if k_x is not None or v_x is not None:
                    return super().attention(q_x, k_x, v_x, attn_mask)
                attn = self.attn
                batch, length, width = q_x.shape
                heads = attn.num_heads
                qkv = F.linear(q_x, attn.in_proj_weight, attn.in_proj_bias)
                qkv = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)
                mask = attn_mask.to(q.dtype) if attn_mask is not None else None
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                out = out.transpose(1, 2).reshape(batch, length, width)
                return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)

        SdpaResidualAttentionBlock.__module__ = __name__
        SdpaResidualAttentionBlock.__qualname__ = "_SdpaResidualAttentionBlock"
        _SDPA_BLOCK = SdpaResidualAttentionBlock
    return _SDPA_BLOCK


_BATCH_NORM_FP32 = None


def _batch_norm_fp32_class():
    """BatchNorm2d that computes in fp32 on half inputs and returns the input's dtype."""
    global _BATCH_NORM_FP32
    if _BATCH_NORM_FP32 is None:
        import torch

        class BatchNorm2dFp32(torch.nn.BatchNorm2d):
            def forward(self, x):
                return super().forward(x.float()).to(x.dtype)

        BatchNorm2dFp32.__module__ = __name__
        BatchNorm2dFp32.__qualname__ = "_BatchNorm2dFp32"
        _BATCH_NORM_FP32 = BatchNorm2dFp32
    return _BATCH_NORM_FP32


def __getattr__(name: str):
    # lets pickle find the classes built when torch / open_clip is imported
    if name == "_SdpaResidualAttentionBlock":
        return _sdpa_block_class()
    if name == "_BatchNorm2dFp32":
        return _batch_norm_fp32_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _cast_to_half(tower, dtype) -> None:
    """Cast a tower's weights to ``dtype`` once; LayerNorms keep fp32 weights and compute
    in fp32 (open_clip's LayerNormFp32), as in open_clip's own fp16/bf16 models, and so do
    the BatchNorms of a ResNet tower (starkret-mini's: their statistics are fp32 buffers)."""
    import torch
    from open_clip.transformer import LayerNormFp32

    for module in tower.modules():
        if isinstance(module, torch.nn.LayerNorm):
            if not isinstance(module, LayerNormFp32):
                module.__class__ = LayerNormFp32
            continue
        if type(module) is torch.nn.BatchNorm2d:
            module.__class__ = _batch_norm_fp32_class()
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)


def _output_dtype(dtype: str):
    try:
        return _OUTPUT_DTYPES[dtype]
    except KeyError:
        raise InvalidInputError(f"dtype must be 'float16' or 'float32', got {dtype!r}") from None
