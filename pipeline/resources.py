"""How many model actors a pipeline runs, and what each worker asks Ray for.

Shared by the compress, decode and audit pipelines: all three are "CPU tasks feeding a
pool of actors that each hold a model", and size that pool from the cluster the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.data import ActorPoolStrategy


@dataclass(frozen=True)
class StageResources:
    """What one worker of a stage asks Ray for, and how many rows it takes at a time."""

    num_cpus: float
    num_gpus: float
    batch_size: int


@dataclass(frozen=True)
class ResourceSettings:
    """Worker sizing; None means derived from the cluster (see ``plan_resources``)."""

    actors: int | None = None
    actor_cpus: float | None = None
    actor_gpus: float | None = None
    torch_threads: int | None = None
    actor_batch_size: int = 4
    task_batch_size: int = 16
    rows_per_file: int = 1000


@dataclass(frozen=True)
class ResourcePlan:
    tasks: StageResources  # CPU tasks (reading, image decoding, PNG writing)
    actor: StageResources  # the model actors
    actors: int
    torch_threads: int

    def actor_pool(self) -> dict[str, Any]:
        """``map_batches`` arguments that run a stage class in the model actor pool."""
        return {"compute": ActorPoolStrategy(size=self.actors), "batch_size": self.actor.batch_size,
                "num_cpus": self.actor.num_cpus, "num_gpus": self.actor.num_gpus or None}


def plan_resources(settings: ResourceSettings, cluster: dict[str, float]) -> ResourcePlan:
    """Size the model actor pool (encode, decode or audit) from the cluster, unless the settings fix it.

    GPUs: two actors per GPU (half a GPU each), so one actor's CPU work (entropy coding,
    batching) overlaps the other's GPU work. CPUs only: actors of up to 4 torch threads,
    each reserving at most (CPUs - 1) so that the read and decode tasks always keep a CPU
    (on 2 CPUs, two actors of one CPU each would starve the readers and deadlock).
    """
    cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    if gpus >= 1:
        actors = settings.actors or int(2 * gpus)
        actor_gpus = settings.actor_gpus if settings.actor_gpus is not None else gpus / actors
        actor_cpus = settings.actor_cpus if settings.actor_cpus is not None else 1.0
        threads = settings.torch_threads or 2
    else:
        threads = settings.torch_threads or int(min(cpus, 4))
        actors = settings.actors or max(1, int((cpus - 1) // threads))
        actor_gpus = 0.0
        actor_cpus = settings.actor_cpus if settings.actor_cpus is not None else max(0.5, min(threads, cpus - 1))
    # Decode tasks ask for half a CPU: decoding is light, and a resource shape unlike the
    # actors' keeps Ray from fusing decode into the encode actors (which would then decode
    # serially between encodes instead of overlapping with them).
    return ResourcePlan(
        tasks=StageResources(num_cpus=0.5, num_gpus=0.0, batch_size=settings.task_batch_size),
        actor=StageResources(num_cpus=actor_cpus, num_gpus=actor_gpus, batch_size=settings.actor_batch_size),
        actors=actors,
        torch_threads=threads,
    )
