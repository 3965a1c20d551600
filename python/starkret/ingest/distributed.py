"""Parts of ``starkret.embed`` run on Ray actors: one per GPU, on one machine or a cluster.

Each actor builds its own embedder from the driver's (same model, weights, image
size, and the driver's precision, model batch size and compilation when the driver's
embedder runs on the actors' kind of device: :func:`embedder_spec`)
and writes its parts straight into the shared output folder, with the same atomic
writes, part claims and duplicate-key check as a single process, so resume works the
same whatever ran the parts. An actor reserves as many Ray CPUs as it decodes with.
For several GPUs of one machine, ``--devices`` needs no Ray (:mod:`starkret.ingest.localworkers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from starkret.errors import InvalidInputError, MissingDependencyError
from starkret.ingest.sources import Part, PreprocessOptions
from starkret.ingest.towers import ClipEmbedder

# ==== The embedder a worker builds (Ray actors and starkret.ingest.localworkers) ====

#: The driver's embedder settings a worker may take over (see :func:`embedder_spec`).
_SETTINGS = ("precision", "batch_size", "compile")


def embedder_spec(
    embedder: ClipEmbedder,
    worker_device: str,
    *,
    precision: str | None = None,
    compile: bool | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """What a worker needs to build the same embedder as ``embedder`` on ``worker_device``.

    The model, weights, seed and image size always come along. Precision, model batch
    size and compilation are the driver's when its embedder runs on the same kind of
    device as the worker ("cuda" or "cpu"), else the worker's own device defaults (a
    CPU driver's fp32 is no choice for a GPU); explicit arguments win in both cases.
    """
    spec: dict[str, Any] = {
        "model": embedder.model_name,
        "pretrained": embedder.pretrained,
        "seed": embedder.seed,
        "image_size": embedder.image_size,
    }
    same_kind = embedder.device.type == worker_device.split(":", 1)[0]
    driver = (embedder.precision, embedder.batch_size, embedder.compiled)
    given_all = (precision, batch_size, compile)
    for key, mine, given in zip(_SETTINGS, driver, given_all, strict=True):
        spec[key] = given if given is not None else (mine if same_kind else None)
    return spec


def build_embedder(spec: dict[str, Any], device: str) -> ClipEmbedder:
    """The embedder of ``spec`` (:func:`embedder_spec`) on ``device``."""
    settings = {k: spec[k] for k in _SETTINGS if spec.get(k) is not None}
    return ClipEmbedder(
        spec["model"],
        spec["pretrained"],
        device=device,
        seed=spec["seed"],
        image_size=spec["image_size"],
        **settings,
    )


# ==== Ray ====


class PartWorker:
    """A Ray actor body: one embedder, many parts."""

    def __init__(
        self, spec: dict, out: str, options: PreprocessOptions, source: str, runner_class
    ) -> None:
        import os

        import torch

        if options.threads is not None:
            os.environ["RAYON_NUM_THREADS"] = str(options.threads)
            torch.set_num_threads(options.threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.embedder = build_embedder(spec, device)
        options = options.for_model(self.embedder)
        # The pipeline hands its runner class in, so this module never imports it back.
        self.runner = runner_class(Path(out), self.embedder, options, source)

    def run(self, index: int, part: Part) -> tuple[int, list] | None:
        """(embedded, failures), or None if another worker has the part."""
        return self.runner.run(index, part)


def actor_plan(
    embedder: ClipEmbedder,
    options: PreprocessOptions,
    workers: int,
    resources: dict[str, float],
) -> tuple[int, dict[str, Any], dict[str, Any], PreprocessOptions]:
    """(actor count, ``ray.remote`` resources, embedder spec, actor options) for a cluster
    with ``resources`` (``ray.cluster_resources()``).

    One actor per GPU unless ``workers > 1`` asks for a number. Each reserves one GPU
    (when there are enough) and as many CPUs as it decodes with: ``options.threads``,
    or else an equal share of the cluster's CPUs.
    """
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    count = workers if workers > 1 else max(1, gpus)
    threads = options.threads if options.threads is not None else max(1, cpus // count)
    if threads * count > cpus:
        raise InvalidInputError(
            f"{count} Ray workers x {threads} decode threads need {threads * count} CPUs, "
            f"the cluster has {cpus}: lower --threads or --workers"
        )
    on_gpu = gpus >= count and gpus > 0
    remote = {"num_gpus": 1 if on_gpu else 0, "num_cpus": threads}
    spec = embedder_spec(embedder, "cuda" if on_gpu else "cpu")
    return count, remote, spec, dataclasses.replace(options, threads=threads)


def run_on_ray(
    pending: list[tuple[int, Part]],
    out: Path,
    embedder: ClipEmbedder,
    options: PreprocessOptions,
    source: str,
    workers: int,
    address: str | None,
    on_part: Callable[[int, int], None],
    runner_class,
) -> Iterator[tuple[int, list] | None]:
    """Run ``pending`` parts on ``workers`` actors (all GPUs of the cluster if 1 is asked).

    Yields each part's (embedded, failures), or None for a part another worker had.
    """
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise MissingDependencyError(
            "Ray is needed for workers > 1 or --ray-address: pip install 'starkret[scale]'"
        ) from exc
    if not ray.is_initialized():
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    count, remote, spec, actor_options = actor_plan(
        embedder, options, workers, ray.cluster_resources()
    )
    actor = ray.remote(**remote)(PartWorker)
    actors = [
        actor.remote(spec, str(out), actor_options, source, runner_class) for _ in range(count)
    ]
    pool = ActorPool(actors)
    results = pool.map_unordered(lambda a, item: a.run.remote(*item), pending)
    for result in results:
        if result is not None:
            on_part(result[0], len(result[1]))
        yield result
    for a in actors:
        ray.kill(a)
