"""The GPU embedding benchmark of issue 12: model-only and embed-shards rates on one GPU.

Model only (``starkret.ClipEmbedder``, ViT-L-14-336-quickgelu with random weights: the
same compute as OpenAI's): images/s at batch 256/512/1024 for eager and compiled, fp16
and bf16, with uint8 inputs already on the device (warm-up excluded, CUDA events), the
MFU (images/s x FLOPs per image / the GPU's dense fp16/bf16 peak), the first call's
seconds (compilation), the peak GPU memory, and the cosine of each setting's embeddings
against eager fp32 on the same images. Then ``embed-shards`` on synthetic CC12M-like
shards generated here (256 px shorter side, varied aspect, JPEG, captions and json):
decode alone, ``starkret.embed`` in this process, and one ``embed-shards`` CLI run, each
against the model-only rate of the same embedder (goal: >= 0.9) and 1300 images/s, with
the CPU cores the process kept busy.

    python benches/bench_gpu.py --out bench-results/gpu          # on a GPU, ~6 min
    python benches/bench_gpu.py --smoke --out /tmp/gpu-smoke     # CPU, starkret-tiny, seconds

Writes ``gpu.md`` (the tables docs/development.md describes) and ``gpu.json`` into ``--out`` after
every step, so a run stopped early still leaves what it measured. ``--budget`` seconds:
a step that would not fit what is left is skipped with a line saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

VIT_L = "ViT-L-14-336-quickgelu"
#: Issue 12's goals.
GOAL_MODEL_IMG_S = 1300.0
GOAL_RATIO = 0.9
GPU_SETTINGS = ("eager-fp16", "compiled-bf16", "eager-bf16", "compiled-fp16")
# compiling even starkret-tiny takes ~20 s per batch shape on a small CPU: not in the smoke
# run (tests/test_towers_fast.py tests the compiled tower); `--settings compiled-fp32` adds it
SMOKE_SETTINGS = ("eager-bf16",)

MODEL_COLUMNS = (
    ("setting", "setting"),
    ("batch", "batch"),
    ("img_s", "img/s"),
    ("ms_batch", "ms/batch"),
    ("mfu", "MFU"),
    ("first_call_s", "first call s"),
    ("peak_mem_gib", "peak mem GiB"),
    ("cos_min", "cos vs fp32 min"),
    ("cos_mean", "cos vs fp32 mean"),
    ("input", "input"),
    ("status", "status"),
)
PIPELINE_COLUMNS = (
    ("run", "run"),
    ("images", "images"),
    ("img_s", "img/s"),
    ("model_img_s", "model-only img/s"),
    ("ratio", "ratio"),
    ("goal_ratio", "ratio >= 0.9"),
    ("vs_goal", "vs 1300 img/s"),
    ("input_wait_s", "model waited for input s"),
    ("cpu_cores", "CPU cores busy"),
    ("threads", "decode threads"),
    ("wall_s", "wall s"),
    ("status", "status"),
)


# ==== FLOPs and peaks ====


def vit_flops_per_image(vision_cfg: dict, image_size: int | None = None) -> float:
    """FLOPs (2 per multiply-add) of one image through an open_clip ViT image tower.

    Counts the patch embedding, every block's QKV, attention scores, attention-weighted
    values, output projection and MLP, and the final projection; layer norms, softmax,
    activations and the normalisation of the output (a fraction of a percent) are left
    out. ViT-L/14 at 336 px: 381.9 GFLOP.
    """
    if vision_cfg.get("timm_model_name") or vision_cfg.get("attentional_pool"):
        raise ValueError("FLOPs are counted for open_clip's plain ViT image towers only")
    layers = vision_cfg["layers"]
    if not isinstance(layers, int):
        raise ValueError(f"FLOPs are counted for ViT towers only (layers={layers!r})")
    size = image_size or vision_cfg.get("image_size", 224)
    patch = vision_cfg.get("patch_size", 16)
    size = size[0] if isinstance(size, (tuple, list)) else size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    width = vision_cfg["width"]
    hidden = int(width * vision_cfg.get("mlp_ratio", 4.0))
    grid = size // patch
    tokens = grid * grid + 1  # the class token
    macs = grid * grid * (3 * patch * patch) * width  # patch embedding (a strided conv)
    per_layer = (
        3 * tokens * width * width  # q, k, v
        + 2 * tokens * tokens * width  # scores and the weighted sum of values
        + tokens * width * width  # output projection
        + 2 * tokens * width * hidden  # MLP up and down
    )
    macs += layers * per_layer
    macs += width * vision_cfg.get("output_dim", 0)
    return 2.0 * macs


def model_flops_per_image(model: str, image_size: int | None = None) -> float:
    """:func:`vit_flops_per_image` of an open_clip model name (starkret's configs too);
    for other image towers (starkret-mini's ResNet) :func:`counted_flops_per_image`."""
    from starkret.ingest.towers import _open_clip

    cfg = _open_clip().get_model_config(model)
    if cfg is None:
        raise ValueError(f"no open_clip config for {model!r}")
    vision = dict(cfg["vision_cfg"])
    vision.setdefault("output_dim", cfg["embed_dim"])
    try:
        return vit_flops_per_image(vision, image_size)
    except ValueError:
        return counted_flops_per_image(model, image_size)


def counted_flops_per_image(model: str, image_size: int | None = None) -> float:
    """torch's own FLOP count of one image through a model's image tower, built on the
    meta device (no weights, no memory, no compute): convolutions and matrix products."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from starkret.ingest.towers import _open_clip

    built = _open_clip().create_model(model, pretrained=None, device="meta")
    size = image_size or built.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    with FlopCounterMode(display=False) as counter:
        built.encode_image(torch.zeros((1, 3, size, size), device="meta"))
    return float(counter.get_total_flops())


def datasheet_peak(device_name: str) -> tuple[float | None, str]:
    """Dense fp16/bf16 tensor-core peak in TFLOP/s of a GPU, from NVIDIA's datasheets."""
    name = device_name.upper()
    if "H100" in name or "H200" in name:
        if "PCIE" in name:
            return 756.0, "H100 PCIe dense fp16/bf16 (datasheet)"
        if "NVL" in name:
            return 835.0, "H100/H200 NVL dense fp16/bf16 (datasheet)"
        return 989.4, "H100/H200 SXM dense fp16/bf16 (datasheet)"
    if "A100" in name:
        return 312.0, "A100 dense fp16/bf16 (datasheet)"
    return None, f"unknown for {device_name!r}: pass --peak-tflops"


# ==== Budget and results ====


class Budget:
    """Seconds left of ``--budget``; a step starts only if its estimate fits."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.used()

    def fits(self, need: float) -> bool:
        return self.left() >= need


class Results:
    """Everything measured so far; written to gpu.json and gpu.md after every step."""

    def __init__(self, out: Path, budget: Budget, header: dict) -> None:
        self.out = out
        self.budget = budget
        self.data: dict = {**header, "model_only": [], "pipeline": [], "steps": []}
        out.mkdir(parents=True, exist_ok=True)

    def step(self, name: str, status: str, seconds: float) -> None:
        self.data["steps"].append({"step": name, "status": status, "seconds": round(seconds, 1)})
        print(f"[bench_gpu] {name}: {status} ({seconds:.1f} s)", flush=True)
        self.write()

    def skip(self, name: str, need: float) -> None:
        left = max(self.budget.left(), 0.0)
        total = self.budget.seconds
        status = f"skipped: needs ~{need:.0f} s, {left:.0f} s left of the {total:.0f} s budget"
        self.step(name, status, 0.0)

    def write(self) -> None:
        self.data["budget_s"] = self.budget.seconds
        self.data["used_s"] = round(self.budget.used(), 1)
        from starkret._io import atomic_write_text

        atomic_write_text(
            self.out / "gpu.json", json.dumps(self.data, indent=1, default=str) + "\n"
        )
        atomic_write_text(self.out / "gpu.md", render_markdown(self.data))


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "/").replace("\n", " ")


def _table(rows: list[dict], columns, digits: dict) -> list[str]:
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        cells = [_fmt(row.get(key), digits.get(key, 1)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(data: dict) -> str:
    env = data.get("env", {})
    lines = [f"# starkret GPU benchmark ({data.get('mode', 'gpu')})", ""]
    lines.append(
        f"{env.get('device_name', '?')}; torch {env.get('torch', '?')} (CUDA "
        f"{env.get('cuda') or '-'}), triton {env.get('triton') or '-'}, open_clip "
        f"{env.get('open_clip', '?')}, starkret {env.get('starkret', '?')}"
        f"{' (' + env['source'] + ')' if env.get('source') else ''}, Python "
        f"{env.get('python', '?')}, {env.get('cpus', '?')} CPU cores; {data.get('date', '?')}, "
        f"{data.get('used_s', 0):.0f} s of a {data.get('budget_s', 0):.0f} s budget."
    )
    lines.append("")
    flops = data.get("flops_per_image")
    peak = data.get("peak_tflops")
    matmul = data.get("matmul_tflops")
    lines.append(
        f"Model: {data.get('model', '?')}, random weights (pretrained=None: the same compute "
        f"as trained weights). Image tower: "
        f"{_fmt(flops / 1e9 if flops else None)} GFLOP per image (2 per multiply-add, from "
        f"the model config). Peak for MFU: {_fmt(peak)} TFLOP/s ({data.get('peak_source', '-')})"
        + (
            f"; a bf16 8192^3 matmul ran at {matmul:,.0f} TFLOP/s here"
            + (f" ({matmul / peak:.0%} of that peak)." if peak else ".")
            if matmul
            else "."
        )
    )
    lines += ["", "## Model only (inputs already on the device)", ""]
    lines += _table(
        data.get("model_only", []),
        MODEL_COLUMNS,
        {
            "ms_batch": 1,
            "mfu": 3,
            "first_call_s": 1,
            "peak_mem_gib": 2,
            "cos_min": 6,
            "cos_mean": 6,
        },
    )
    pipe = data.get("pipeline_info", {})
    lines += ["", "## embed-shards (synthetic CC12M-like shards generated on the machine)", ""]
    if pipe:
        lines.append(
            f"{_fmt(pipe.get('images'))} images in {_fmt(pipe.get('shards'))} shards "
            f"({pipe.get('describe', '')}); embedder: {pipe.get('embedder', '-')}, "
            f"batch {_fmt(pipe.get('batch'))}."
        )
        lines.append("")
    lines += _table(
        data.get("pipeline", []),
        PIPELINE_COLUMNS,
        {"ratio": 3, "cpu_cores": 1, "wall_s": 1, "input_wait_s": 2},
    )
    goals = data.get("goals")
    if goals:
        lines += ["", "## Goals (issue 12)", ""]
        lines += [f"- {line}" for line in goals]
    lines += ["", "## Steps", ""]
    lines += [f"- {s['step']}: {s['status']} ({s['seconds']:.1f} s)" for s in data.get("steps", [])]
    return "\n".join(lines) + "\n"


# ==== The device ====


class Device:
    """The torch device, its synchronisation and its memory counters (no-ops on CPU)."""

    def __init__(self, name: str) -> None:
        import torch

        self.torch = torch
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        return self.torch.cuda.max_memory_allocated(self.dev) / 2**30

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
        with contextlib.suppress(Exception):
            # compiled settings must not share dynamo's caches (one model's recompiles would
            # count against the next one's limit and could silently fall back to eager)
            self.torch._dynamo.reset()

    def timer(self):
        """(start, stop) callables; stop() returns milliseconds (CUDA events on a GPU)."""
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)

            def stop() -> float:
                end.record()
                end.synchronize()
                return start.elapsed_time(end)

            return start.record, stop
        began = [0.0]

        def begin() -> None:
            began[0] = time.perf_counter()

        return begin, lambda: (time.perf_counter() - began[0]) * 1e3


def matmul_tflops(device: Device, n: int = 8192, repeats: int = 20) -> float | None:
    """bf16 n^3 matrix products per second on the GPU (what its tensor cores reach here)."""
    if not device.cuda:
        return None
    torch = device.torch
    gen = torch.Generator(device=device.dev).manual_seed(0)
    a = torch.randn((n, n), device=device.dev, dtype=torch.bfloat16, generator=gen)
    b = torch.randn((n, n), device=device.dev, dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        a @ b
    begin, stop = device.timer()
    begin()
    for _ in range(repeats):
        a @ b
    ms = stop()
    del a, b
    return 2.0 * n**3 * repeats / (ms / 1e3) / 1e12


# ==== Embedders ====


def make_embedder(model: str, device: str, *, precision=None, compile=None, batch=None):
    """``ClipEmbedder(model, None, ...)``, random weights; ``None`` = the tower's default."""
    from starkret import ClipEmbedder

    return ClipEmbedder(
        model,
        None,
        device=device,
        precision=precision or "auto",
        batch_size=batch,
        compile=compile,
    )


def setting_name(embedder) -> str:
    """eager-fp16, compiled-bf16, ... (a torch.compile mode other than the default is named)."""
    compiled, mode = embedder.compiled, embedder.compile_mode
    kind = (
        f"compiled[{mode}]"
        if compiled and mode not in (None, "default")
        else ("compiled" if compiled else "eager")
    )
    return f"{kind}-{embedder.precision}"


def _mean_std(embedder) -> tuple[np.ndarray, np.ndarray]:
    from starkret.ingest.preprocess import OPENAI_MEAN, OPENAI_STD

    cfg = embedder.preprocess_config
    mean = np.asarray(cfg.get("mean", OPENAI_MEAN), np.float32)
    std = np.asarray(cfg.get("std", OPENAI_STD), np.float32)
    return mean, std


def normalised(embedder, photos_hwc: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> float32 (N, 3, S, S) normalised on the CPU (the reference)."""
    mean, std = _mean_std(embedder)
    x = photos_hwc.astype(np.float32) / 255.0
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def device_inputs(device: Device, photos_hwc: np.ndarray):
    """The photos on the device as the pipeline hands them over on a GPU: uint8 HWC crops
    (the Rust core's layout), normalised by the tower on the device."""
    return device.torch.from_numpy(photos_hwc).to(device.dev)


def random_inputs(embedder, device: Device, batch: int, seed: int):
    torch = device.torch
    size = embedder.image_size
    gen = torch.Generator(device=device.dev).manual_seed(seed)
    shape = (batch, size, size, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device.dev, generator=gen)


def photos(count: int, size: int) -> np.ndarray:
    from starkret.testing import synthetic_photo

    return np.stack([synthetic_photo(size, size, seed=10_000 + i) for i in range(count)])


@contextlib.contextmanager
def exact_fp32(device: Device):
    """True float32 matmuls and convolutions (no TF32) for the reference embeddings."""
    torch = device.torch
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def time_model(embedder, x, device: Device, *, min_seconds: float, min_iters=3, warmups=2):
    """(first call s, ms per batch, peak GiB, iterations): warm-up excluded."""
    device.sync()
    t = time.perf_counter()
    embedder.encode_images(x)  # compiles, if it compiles
    device.sync()
    first = time.perf_counter() - t
    for _ in range(warmups):  # autotuning, CUDA graphs, allocator warm-up
        embedder.encode_images(x)
    device.sync()
    device.reset_peak()
    begin, stop = device.timer()
    iters, wall = 0, time.perf_counter()
    begin()
    while iters < min_iters or (time.perf_counter() - wall < min_seconds and iters < 500):
        embedder.encode_images(x)
        iters += 1
    ms = stop() / iters
    return first, ms, device.peak_gib(), iters


def cosines(embedder, x, reference: np.ndarray) -> tuple[float, float]:
    got = embedder.encode_images(x, dtype="float32").astype(np.float64)
    ref = reference.astype(np.float64)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    return float(cos.min()), float(cos.mean())


# ==== Synthetic CC12M-like shards ====

_ASPECTS = ((1.0, 30), (4 / 3, 25), (3 / 2, 20), (16 / 9, 10), (3 / 4, 10), (2 / 3, 5))
_WORDS = (
    "a photo of", "a close-up of", "an old picture of", "a drawing of", "a view of",
    "a red", "a small", "the big", "a wooden", "a bright",
    "dog", "house", "street", "chart", "mountain", "car", "table", "bird", "boat", "cake",
)  # fmt: skip


def _photo_jpeg(i: int) -> tuple[bytes, int, int]:
    """One CC12M-like JPEG: 256 px shorter side, an aspect ratio drawn like web photos'."""
    from starkret.testing import encode, synthetic_photo

    rng = np.random.default_rng(i)
    ratios = [a for a, _ in _ASPECTS]
    weights = np.array([w for _, w in _ASPECTS], float)
    ratio = ratios[rng.choice(len(ratios), p=weights / weights.sum())]
    w, h = (round(256 * ratio), 256) if ratio >= 1 else (256, round(256 / ratio))
    return encode(synthetic_photo(w, h, seed=i), "JPEG", quality=95), w, h


def make_shards(folder: Path, images: int, per_shard: int, distinct: int, workers: int):
    """img2dataset-like shards: NNNNN.tar with key.jpg, key.txt, key.json per sample."""
    distinct = max(1, min(distinct, images))
    if workers > 1:
        import multiprocessing

        # before any CUDA call: forked children only encode JPEGs
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool_photos = pool.map(_photo_jpeg, range(distinct), chunksize=16)
    else:
        pool_photos = [_photo_jpeg(i) for i in range(distinct)]
    folder.mkdir(parents=True, exist_ok=True)
    paths, nbytes = [], 0
    for shard, start in enumerate(range(0, images, per_shard)):
        path = folder / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, images)):
                data, w, h = pool_photos[i % distinct]
                key = f"{shard:05d}{i - start:04d}"
                words = [_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(3)]
                caption = f"{words[0]} {words[1]} {words[2]} #{i}"
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": w,
                    "height": h,
                    "original_width": 2 * w,
                    "original_height": 2 * h,
                }
                for ext, body in (
                    ("jpg", data),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(body)
                    info.mtime = 1_700_000_000
                    tar.addfile(info, io.BytesIO(body))
                nbytes += len(data)
        paths.append(str(path))
    return paths, nbytes / max(images, 1)


# ==== The benchmark ====


def _env(device: Device) -> dict:
    import importlib.metadata as md

    import starkret

    torch = device.torch

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "open_clip": version("open_clip_torch"),
        "numpy": np.__version__,
        "starkret": starkret.__version__,
        "starkret_core": starkret.core_version,
        "starkret_path": str(Path(starkret.__file__).parent),
        "source": os.environ.get("STARKRET_SOURCE", ""),
        "cpus": os.cpu_count(),
    }
    if device.cuda:
        props = torch.cuda.get_device_properties(device.dev)
        env["device_name"] = props.name
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
        env["device_name"] += (
            f" ({props.multi_processor_count} SMs, {env['device_memory_gib']} GiB)"
        )
    else:
        env["device_name"] = f"CPU only ({platform.processor() or platform.machine()})"
    return env


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _child_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.budget = Budget(args.budget)
        self.device = None
        self.reference = None  # fp32 embeddings of the cos photos
        self.cos_photos = None
        self.flops = None
        self.peak = None

    # ---- model only ----

    def model_rows(self, embedder, label: str, batches, results: Results) -> dict:
        """Time ``embedder`` at each batch; one table row per batch; {batch: img/s}."""
        args, device = self.args, self.device
        rates = {}
        for i, batch in enumerate(batches):
            name = f"model {label} batch {batch}"
            need = self.estimate_setting(compiled="compiled" in label) / len(batches)
            if not self.budget.fits(need):
                results.skip(name, need)
                continue
            row = {"setting": label, "batch": batch, "precision": embedder.precision}
            row["compiled"], row["compile_mode"] = embedder.compiled, embedder.compile_mode
            row["input"] = "uint8 HWC"
            started = time.perf_counter()
            try:
                embedder.batch_size = batch
                if i == 0 and self.reference is not None and len(self.cos_photos) == batch:
                    x = device_inputs(device, self.cos_photos)
                else:
                    x = random_inputs(embedder, device, batch, seed=batch)
                first, ms, peak, iters = time_model(
                    embedder,
                    x,
                    device,
                    min_seconds=args.min_seconds,
                    min_iters=1 if args.smoke else 3,
                    warmups=0 if args.smoke else 2,
                )
                img_s = batch / (ms / 1e3)
                row.update(
                    img_s=img_s,
                    ms_batch=ms,
                    first_call_s=first,
                    peak_mem_gib=peak,
                    iterations=iters,
                    mfu=img_s * self.flops / (self.peak * 1e12) if self.peak else None,
                    status="ok",
                )
                if i == 0 and self.reference is not None and len(self.cos_photos) == batch:
                    row["cos_min"], row["cos_mean"] = cosines(embedder, x, self.reference)
                rates[batch] = img_s
                del x
            except Exception as exc:
                row["status"] = _error(exc, device)
            results.data["model_only"].append(row)
            results.step(name, row["status"], time.perf_counter() - started)
        # every row of a setting shows its cosine (one measurement per setting)
        rows = [r for r in results.data["model_only"] if r["setting"] == label]
        cos = next((r for r in rows if r.get("cos_min") is not None), None)
        for r in rows:
            if cos is not None:
                r.setdefault("cos_min", cos["cos_min"])
                r.setdefault("cos_mean", cos["cos_mean"])
        results.write()
        return rates

    def estimate_setting(self, compiled: bool) -> float:
        if self.args.smoke:
            return 1.0
        return 150.0 if compiled else 30.0

    def reference_embeddings(self, results: Results) -> None:
        args, device = self.args, self.device
        started = time.perf_counter()
        if not self.budget.fits(20 if not args.smoke else 1):
            results.skip("fp32 reference", 20)
            return
        try:
            embedder = make_embedder(
                args.model, args.device, precision="fp32", compile=False, batch=args.batches[0]
            )
            self.cos_photos = photos(args.batches[0], embedder.image_size)
            pixels = device.torch.from_numpy(normalised(embedder, self.cos_photos)).to(device.dev)
            with exact_fp32(device):
                self.reference = embedder.encode_images(pixels, dtype="float32")
            status = (
                f"ok: {len(self.reference)} synthetic photos, eager fp32, normalised on the CPU"
            )
            del embedder
        except Exception as exc:
            status = _error(exc, device)
        device.release()
        results.step("fp32 reference", status, time.perf_counter() - started)

    def other_setting(self, label: str, results: Results) -> None:
        args, device = self.args, self.device
        kind, precision = label.split("-", 1)
        compiled = kind == "compiled"
        need = self.estimate_setting(compiled)
        if not self.budget.fits(need):
            results.skip(f"model {label}", need)
            return
        started = time.perf_counter()
        try:
            embedder = make_embedder(
                args.model,
                args.device,
                precision=precision,
                compile=compiled,
                batch=args.batches[0],
            )
        except Exception as exc:
            status = _error(exc, device)
            results.data["model_only"].append({"setting": label, "status": status})
            results.step(f"model {label}", status, time.perf_counter() - started)
            return
        label = setting_name(embedder)  # what was built (a compile mode from the environment)
        results.step(f"model {label}: built", "ok", time.perf_counter() - started)
        self.model_rows(embedder, label, args.batches, results)
        del embedder
        device.release()

    # ---- embed-shards ----

    def shards(self, results: Results):
        args = self.args
        need = 2.0 if args.smoke else 60.0
        if not self.budget.fits(need):
            results.skip("generate shards", need)
            return None
        started = time.perf_counter()
        folder = Path(self.work) / "shards"
        workers = args.workers if args.workers else max(1, (os.cpu_count() or 1) - 2)
        paths, mean_bytes = make_shards(folder, args.images, args.per_shard, args.distinct, workers)
        results.data["pipeline_info"] = {
            "images": args.images,
            "shards": len(paths),
            "describe": f"JPEG q95, 256 px shorter side, aspect 2:3 to 16:9, "
            f"{mean_bytes / 1024:.1f} KiB per image on average, {args.distinct:,} distinct "
            "photos cycled, caption .txt and img2dataset-style .json per sample",
        }
        results.step(
            "generate shards",
            f"ok: {len(paths)} shards, {args.images:,} images, {workers} processes",
            time.perf_counter() - started,
        )
        return paths

    def decode_only(self, paths, embedder, batch: int, results: Results) -> None:
        from starkret.ingest.preprocess import preprocess_shards

        args = self.args
        need = 2.0 if args.smoke else 30.0
        if not self.budget.fits(need):
            results.skip("decode only", need)
            return
        started = time.perf_counter()
        row = {"run": "decode only (uint8 HWC, no model)"}
        try:
            cpu, wall = _cpu_seconds(), time.perf_counter()
            count = 0
            for b in preprocess_shards(
                paths,
                batch_size=batch,
                size=embedder.image_size,
                dtype="uint8",
                layout="hwc",
                threads=args.threads,
            ):
                count += len(b)
            wall = time.perf_counter() - wall
            cpu = _cpu_seconds() - cpu
            row.update(
                images=count,
                img_s=count / wall,
                cpu_cores=cpu / wall,
                threads=self.threads_label(),
                wall_s=wall,
                status="ok",
            )
        except Exception as exc:
            row["status"] = _error(exc, self.device)
        results.data["pipeline"].append(row)
        results.step("decode only", row["status"], time.perf_counter() - started)

    def threads_label(self) -> str:
        if self.args.threads:
            return str(self.args.threads)
        return f"default ({os.cpu_count()})"

    def embed_in_process(self, paths, embedder, batch: int, model_img_s, results) -> None:
        import starkret

        args = self.args
        rate = model_img_s or 500.0
        need = 2.0 if args.smoke else 20.0 + 1.2 * args.images / rate
        if not self.budget.fits(need):
            results.skip("embed in-process", need)
            return
        started = time.perf_counter()
        row = {"run": "starkret.embed (in-process)"}
        try:
            # no warm-up run: the model-only rows above ran (and compiled) this embedder
            cpu, wall = _cpu_seconds(), time.perf_counter()
            report = starkret.embed(
                paths,
                Path(self.work) / "embed",
                source_name="cc12m",
                embedder=embedder,
                batch_size=batch,
                threads=args.threads,
                progress=False,
            )
            wall = time.perf_counter() - wall
            cpu = _cpu_seconds() - cpu
            row.update(
                self.pipeline_figures(report.embedded, report.images_per_second, model_img_s)
            )
            row.update(
                input_wait_s=report.input_wait_seconds,
                cpu_cores=cpu / wall,
                threads=self.threads_label(),
                wall_s=wall,
                failed=report.failed,
                status="ok" if not report.failed else f"ok, {report.failed} failed",
            )
        except Exception as exc:
            row["status"] = _error(exc, self.device)
        results.data["pipeline"].append(row)
        results.step("embed in-process", row["status"], time.perf_counter() - started)

    def embed_cli(self, paths, batch: int, model_img_s, results) -> None:
        args = self.args
        rate = model_img_s or 500.0
        images = min(args.images, self.cli_shards() * args.per_shard)
        need = 3.0 if args.smoke else 60.0 + 1.2 * images / rate
        if not self.budget.fits(need):
            results.skip("embed-shards CLI", need)
            return
        started = time.perf_counter()
        row = {"run": "embed-shards CLI (own process, model load and compile included in wall)"}
        cmd = [
            sys.executable,
            "-c",
            "import sys; from starkret.cli.commands import embed_shards_main as m; sys.exit(m())",
            *paths,
            "-o",
            str(Path(self.work) / "cli"),
            "--source",
            "cc12m",
            "--model",
            args.model,
            "--pretrained",
            "none",
            "--device",
            args.device,
            "--batch-size",
            str(batch),
            "--json",
            "--quiet",
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        try:
            cpu = _child_cpu_seconds()
            wall = time.perf_counter()
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=max(self.budget.left(), 5.0),
            )
            wall = time.perf_counter() - wall
            cpu = _child_cpu_seconds() - cpu
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"exit {proc.returncode}: {' / '.join(tail)}")
            body = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(
                self.pipeline_figures(body["embedded"], body["images_per_second"], model_img_s)
            )
            row.update(
                input_wait_s=body.get("input_wait_seconds"),
                cpu_cores=cpu / wall,
                threads=self.threads_label(),
                wall_s=wall,
                status="ok" if not body.get("failed") else f"ok, {body['failed']} failed",
            )
        except subprocess.TimeoutExpired:
            row["status"] = "error: over the budget (killed)"
        except Exception as exc:
            row["status"] = _error(exc, self.device)
        results.data["pipeline"].append(row)
        results.step("embed-shards CLI", row["status"], time.perf_counter() - started)

    def cli_shards(self) -> int:
        """Shards the CLI run embeds (its rate, not the images, is the point)."""
        return max(1, -(-self.args.cli_images // self.args.per_shard))

    def pipeline_figures(self, images: int, img_s: float, model_img_s) -> dict:
        ratio = img_s / model_img_s if model_img_s else None
        return {
            "images": images,
            "img_s": img_s,
            "model_img_s": model_img_s,
            "ratio": ratio,
            "goal_ratio": None if ratio is None else ratio >= GOAL_RATIO,
            "vs_goal": f"{img_s / GOAL_MODEL_IMG_S:.2f}x",
        }

    # ---- the whole run ----

    def run(self, results: Results) -> None:
        args = self.args
        paths = self.shards(results) if not args.no_pipeline else None
        self.device = device = Device(args.device)
        results.data["env"] = _env(device)
        self.flops = model_flops_per_image(args.model)
        results.data["flops_per_image"] = self.flops
        peak, source = datasheet_peak(results.data["env"]["device_name"])
        if args.peak_tflops:
            peak, source = args.peak_tflops, "given with --peak-tflops"
        if not device.cuda and not args.peak_tflops:
            peak, source = None, "no GPU: MFU not computed"
        self.peak = peak
        results.data.update(peak_tflops=peak, peak_source=source)
        started = time.perf_counter()
        try:
            results.data["matmul_tflops"] = matmul_tflops(device)
            results.step(
                "bf16 matmul peak", "ok" if device.cuda else "no GPU", time.perf_counter() - started
            )
        except Exception as exc:
            results.step("bf16 matmul peak", _error(exc, device), time.perf_counter() - started)
        device.release()
        self.reference_embeddings(results)

        # 1. the embedder as embed-shards builds it by default: model only, then the pipeline
        started = time.perf_counter()
        default = None
        if not self.budget.fits(self.estimate_setting(compiled=device.cuda)):
            results.skip("model default", self.estimate_setting(compiled=device.cuda))
        else:
            try:
                default = make_embedder(args.model, args.device, batch=args.pipeline_batch)
                label = f"{setting_name(default)} (default)"
                results.step(f"model {label}: built", "ok", time.perf_counter() - started)
            except Exception as exc:
                results.step(
                    "model default: built", _error(exc, device), time.perf_counter() - started
                )
        model_img_s = None
        if default is not None:
            batch = default.batch_size
            batches = list(args.batches) + ([batch] if batch not in args.batches else [])
            rates = self.model_rows(default, label, batches, results)
            model_img_s = rates.get(batch)
            default.batch_size = batch
            results.data.setdefault("pipeline_info", {}).update(embedder=label, batch=batch)
            if paths:
                self.decode_only(paths, default, batch, results)
                self.embed_in_process(paths, default, batch, model_img_s, results)
            del default
            device.release()

        # 2. the other settings in order of interest; the CLI run after the first one
        done = {
            re.sub(r"\[.*\]", "", r["setting"].split(" ")[0]) for r in results.data["model_only"]
        }
        todo = [label for label in args.settings if label not in done]
        cli = paths and model_img_s is not None and not args.no_cli
        todo.insert(min(args.cli_after, len(todo)), "cli")
        for label in todo:
            if label != "cli":
                self.other_setting(label, results)
            elif cli:
                self.embed_cli(paths[: self.cli_shards()], batch, model_img_s, results)
        results.data["goals"] = goal_lines(results.data)
        results.write()


def goal_lines(data: dict) -> list[str]:
    rows = [r for r in data.get("model_only", []) if r.get("img_s")]
    lines = []
    if rows:
        best = max(rows, key=lambda r: r["img_s"])
        met = "met" if best["img_s"] >= GOAL_MODEL_IMG_S else "NOT met"
        lines.append(
            f"model only >= {GOAL_MODEL_IMG_S:,.0f} img/s: {met} (best: "
            f"{best['img_s']:,.0f} img/s, {best['setting']}, batch {best['batch']})"
        )
        good = [r for r in rows if r.get("cos_min") is not None and r["cos_min"] >= 0.999]
        if good:
            fast = max(good, key=lambda r: r["img_s"])
            lines.append(
                f"fastest setting with cos >= 0.999 vs fp32 on every image: {fast['setting']} "
                f"({fast['img_s']:,.0f} img/s at batch {fast['batch']}, "
                f"min cos {fast['cos_min']:.5f})"
            )
    for r in data.get("pipeline", []):
        if r.get("ratio") is not None:
            met = "met" if r["ratio"] >= GOAL_RATIO else "NOT met"
            lines.append(
                f"{r['run']}: {r['img_s']:,.0f} img/s = {r['ratio']:.2f} x model only "
                f"(goal >= {GOAL_RATIO}: {met}; {r['vs_goal']} the "
                f"{GOAL_MODEL_IMG_S:,.0f} img/s goal)"
            )
    if not lines:
        lines.append("nothing measured")
    return lines


def _error(exc: BaseException, device: Device | None) -> str:
    traceback.print_exception(exc)
    oom = device is not None and device.cuda and isinstance(exc, device.torch.cuda.OutOfMemoryError)
    if oom:
        return "error: out of GPU memory"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, starkret-tiny, a few seconds")
    parser.add_argument("--out", default="bench-results/gpu", help="folder for gpu.md, gpu.json")
    parser.add_argument("--budget", type=float, default=None, help="seconds (default 420)")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--batches", default=None, help="model-only batch sizes, e.g. 256,512,1024")
    parser.add_argument(
        "--settings",
        default=None,
        help=f"settings besides the default one, in order (default {','.join(GPU_SETTINGS)})",
    )
    parser.add_argument("--pipeline-batch", type=int, default=None, help="default: the embedder's")
    parser.add_argument("--images", type=int, default=None, help="images in the shards (40000)")
    parser.add_argument("--per-shard", type=int, default=None, help="images per shard (4000)")
    parser.add_argument("--distinct", type=int, default=None, help="distinct photos (2000)")
    parser.add_argument("--workers", type=int, default=None, help="processes making the shards")
    parser.add_argument("--threads", type=int, default=None, help="decode threads (default all)")
    parser.add_argument("--min-seconds", type=float, default=None, help="timed seconds per row")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak")
    parser.add_argument("--no-pipeline", action="store_true", help="model only")
    parser.add_argument("--no-cli", action="store_true", help="no embed-shards CLI run")
    parser.add_argument("--cli-images", type=int, default=None, help="CLI run's images (12000)")
    parser.add_argument(
        "--cli-after", type=int, default=1, help="the CLI runs after this many other settings"
    )
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "budget": 60.0 if smoke else 420.0,
        "model": "starkret-tiny" if smoke else VIT_L,
        "device": "cpu" if smoke else "cuda",
        "batches": "8,16" if smoke else "256,512,1024",
        "settings": ",".join(SMOKE_SETTINGS if smoke else GPU_SETTINGS),
        "pipeline_batch": 16 if smoke else None,
        "images": 48 if smoke else 40_000,
        "per_shard": 16 if smoke else 4_000,
        "cli_images": 48 if smoke else 12_000,
        "distinct": 8 if smoke else 2_000,
        "workers": 1 if smoke else None,
        "min_seconds": 0.05 if smoke else 2.0,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    args.settings = [s for s in str(args.settings).split(",") if s]
    for label in args.settings:
        kind, _, precision = label.partition("-")
        if kind not in ("eager", "compiled") or precision not in ("fp32", "fp16", "bf16"):
            parser.error(f"--settings: {label!r} is not eager|compiled-fp32|fp16|bf16")
    if not args.batches or min(args.batches) <= 0:
        parser.error("--batches needs positive batch sizes")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    budget = Budget(args.budget)
    header = {
        "mode": "smoke: CPU, starkret-tiny" if args.smoke else "GPU",
        "model": args.model,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "args": {k: v for k, v in vars(args).items()},
    }
    results = Results(out, budget, header)
    bench = Bench(args)
    bench.budget = budget
    own_work = args.work is None
    bench.work = tempfile.mkdtemp(prefix="starkret-gpu-bench-") if own_work else args.work
    code = 0
    try:
        bench.run(results)
    except KeyboardInterrupt:
        results.step("run", "interrupted (over the time limit?)", 0.0)
        code = 130
    finally:
        results.write()
        if own_work:
            shutil.rmtree(bench.work, ignore_errors=True)
    print((out / "gpu.md").read_text(), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
