"""Parts of ``starkret.embed`` run on Ray actors: one per GPU, on one machine or a cluster.

Each actor builds its own embedder from the driver's model spec and writes its parts
straight into the shared output folder, with the same atomic writes, part claims and
duplicate-key check as a single process, so resume works the same whatever ran the
parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from .sources import Part, PreprocessOptions
from .towers import ClipEmbedder


class PartWorker:
    """A Ray actor body: one embedder, many parts."""

    def __init__(
        self, spec: dict, out: str, options: PreprocessOptions, source: str, runner_class
    ) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.embedder = ClipEmbedder(
            spec["model"],
            spec["pretrained"],
            device=device,
            seed=spec["seed"],
            image_size=spec["image_size"],
        )
        # The pipeline hands its runner class in, so this module never imports it back.
        self.runner = runner_class(Path(out), self.embedder, options, source)

    def run(self, index: int, part: Part) -> tuple[int, list] | None:
        """(embedded, failures), or None if another worker has the part."""
        return self.runner.run(index, part)


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
        raise ImportError(
            "Ray is needed for workers > 1 or --ray-address: pip install 'starkret[scale]'"
        ) from exc
    if not ray.is_initialized():
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = workers if workers > 1 else max(1, gpus)
    actor = ray.remote(num_gpus=1 if gpus >= count else 0, num_cpus=1)(PartWorker)
    spec = {
        "model": embedder.model_name,
        "pretrained": embedder.pretrained,
        "seed": embedder.seed,
        "image_size": embedder.image_size,
    }
    actors = [actor.remote(spec, str(out), options, source, runner_class) for _ in range(count)]
    pool = ActorPool(actors)
    results = pool.map_unordered(lambda a, item: a.run.remote(*item), pending)
    for result in results:
        if result is not None:
            on_part(result[0], len(result[1]))
        yield result
    for a in actors:
        ray.kill(a)
