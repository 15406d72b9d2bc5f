"""How many model actors a pipeline runs, and what each worker asks Ray for.

Shared by the compress, restore and audit pipelines: all three are "CPU tasks feeding a
pool of actors that each hold a model", and size that pool from the cluster the same way.
:meth:`ResourcePlan.apply` runs any stage (pipeline.stage) with what it declares.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import ray
from ray.data import ActorPoolStrategy

from pipeline.isolation import WorkerLimits, isolated, sealed
from pipeline.stage import ModelStage, Stage


TASK_RETRIES = 3  # of a CPU task whose worker died (ResourcePlan.apply): its node, or a kill from outside


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
    # Each model actor runs its model in a child process (pipeline.isolation): the child is
    # killed at this much resident memory (None: 80% of its node's memory), and an image that
    # kills it worker_attempts times alone becomes an error row.
    worker_memory_gb: float | None = None
    worker_attempts: int = 2
    # Each CPU task that decodes images decodes them in a child process (pipeline.image_decoder),
    # killed at this much resident memory (None: 512 MiB + 48 bytes per pixel of max_pixels,
    # at most 80% of its node's memory); an image that kills it worker_attempts times alone
    # becomes an error row.
    image_worker_memory_gb: float | None = None
    # Times a compress run resumes itself after losing a model actor (its node, or a kill
    # from outside), before it fails with Ray's error (pipeline.compress).
    lost_actor_resumes: int = 2

    def __post_init__(self) -> None:
        self.worker_limits(), self.image_worker_limits()  # their own checks, before any work
        if self.lost_actor_resumes < 0:
            raise ValueError("resources.lost_actor_resumes must be >= 0")

    def worker_limits(self) -> WorkerLimits:
        return WorkerLimits(memory_bytes=_bytes(self.worker_memory_gb), attempts=self.worker_attempts)

    def image_worker_limits(self) -> WorkerLimits:
        return WorkerLimits(memory_bytes=_bytes(self.image_worker_memory_gb), attempts=self.worker_attempts)


def _bytes(gib: float | None) -> int | None:
    return int(gib * 2**30) if gib is not None else None


# What a model actor's child holds before its first image: the interpreter, torch and the
# stage's imports (852 MB measured with the tiny model loaded, docs/benchmarks.md "Memory").
RUNTIME_BYTES = 2**30
DECODED_BYTES_PER_PIXEL = 3  # an RGB image of the batch, decoded, waiting for its turn


def model_worker_bytes(weight_bytes: int, coding_bytes: int, batch_size: int, max_pixels: int) -> int:
    """The most one model actor's child holds: the runtime, the model's weights, coding the
    largest image the job admits (``coding_bytes``: corrdiff.memory.coding_bytes, set by the
    tile and that image's whole-image state), and its batch's decoded images."""
    return RUNTIME_BYTES + weight_bytes + coding_bytes + batch_size * max_pixels * DECODED_BYTES_PER_PIXEL


@dataclass(frozen=True)
class ResourcePlan:
    """One job's workers, sized from its cluster and its ``resources`` settings."""

    tasks: StageResources  # CPU tasks (reading, image decoding, PNG writing)
    actor: StageResources  # the model actors
    actors: int
    torch_threads: int
    limits: WorkerLimits = WorkerLimits()  # of a model actor's child process
    image_limits: WorkerLimits = WorkerLimits()  # of a task's image-decoding child (its stage's ``limits`` setting)

    def apply(self, dataset: ray.data.Dataset, stage: type[Stage], settings: dict[str, Any]) -> ray.data.Dataset:
        """``dataset`` mapped by ``stage`` (pipeline.stage), built from ``settings``, with the
        resources and batch size it declares: the one way a pipeline runs a stage.

        A :class:`~pipeline.stage.ModelStage` runs in an actor pool of :attr:`actors`, each
        actor running the stage in a child process under :attr:`limits`
        (pipeline.isolation). ``max_restarts=0``: inputs cannot kill an actor (they kill its
        child, which the actor replaces), so an actor dies only with its node; Ray Data's
        default of restarting actors and retrying their batches without end would turn a
        node that keeps failing into a hung job (and makes Ray log an error-level line on
        every run, #57733). ``settings`` travel pickled (``isolation.sealed``): the actor
        hands them to its child unopened, and so never imports the stage's model code.

        A :class:`~pipeline.stage.TaskStage` runs in CPU tasks, the stage built for each
        batch. ``max_retries``: Ray Data retries a task whose worker died without end;
        inputs no longer kill it (image decoding runs in a child process of its task,
        pipeline.image_decoder), but a kill from outside could, again and again. A bounded
        number of retries ends in an error that the compress run resumes from a bounded
        number of times (pipeline.compress), and then fails with it.
        """
        resources = stage.resources(self)
        with warnings.catch_warnings():
            # Ray 2.60 has no named parameters for max_restarts and max_retries and warns that
            # the generic ones go away in 2.64; the pinned Ray honours them (tests/test_isolation.py).
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            if issubclass(stage, ModelStage):
                return dataset.map_batches(
                    isolated(stage), fn_constructor_kwargs={"settings": sealed(settings), "limits": self.limits},
                    batch_format=stage.batch_format, compute=ActorPoolStrategy(size=self.actors),
                    batch_size=resources.batch_size, num_cpus=resources.num_cpus,
                    num_gpus=resources.num_gpus or None, max_restarts=0)
            return dataset.map_batches(_in_tasks(stage, settings), batch_size=resources.batch_size,
                                       batch_format=stage.batch_format, num_cpus=resources.num_cpus,
                                       max_retries=TASK_RETRIES)


def _in_tasks(stage: type[Stage], settings: dict[str, Any]) -> Callable[[Any], Any]:
    """A task stage as the function Ray Data maps in tasks, named after the stage (the
    operator's name in Ray's progress: ``MapBatches(<stage name>)``)."""
    def run(batch: Any) -> Any:
        return stage(**settings)(batch)

    run.__name__ = run.__qualname__ = stage.name
    return run


def plan_resources(settings: ResourceSettings, cluster: dict[str, float],
                   worker_bytes: int | None = None) -> ResourcePlan:
    """Size the model actor pool (encode, decode or audit) from the cluster, unless the settings fix it.

    GPUs: two actors per GPU (half a GPU each), so one actor's CPU work (entropy coding,
    batching) overlaps the other's GPU work. CPUs only: actors of up to 4 torch threads,
    each reserving at most (CPUs - 1) so that the read and decode tasks always keep a CPU
    (on 2 CPUs, two actors of one CPU each would starve the readers and deadlock).
    ``worker_bytes`` (what one actor may hold: :func:`model_worker_bytes`): no more actors
    than the cluster's memory (Ray's ``memory`` resource) holds, and at least one.
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
    if worker_bytes is not None and not settings.actors and cluster.get("memory"):
        actors = max(1, min(actors, int(cluster["memory"] // worker_bytes)))
    # Decode tasks ask for half a CPU: decoding is light, and a resource shape unlike the
    # actors' keeps Ray from fusing decode into the encode actors (which would then decode
    # serially between encodes instead of overlapping with them).
    return ResourcePlan(
        tasks=StageResources(num_cpus=0.5, num_gpus=0.0, batch_size=settings.task_batch_size),
        actor=StageResources(num_cpus=actor_cpus, num_gpus=actor_gpus, batch_size=settings.actor_batch_size),
        actors=actors,
        torch_threads=threads,
        limits=settings.worker_limits(),
        image_limits=settings.image_worker_limits(),
    )
