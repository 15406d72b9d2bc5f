"""The compress pipeline: object storage -> decode (CPU tasks) -> encode (actor pool) -> archive.

    source listing (driver) -> fetch bytes (tasks) -> decode_batch (tasks)
        -> EncodeStage (actors: GPUs where there are any, CPU threads otherwise)
        -> ArchiveDatasink (one Parquet file per write task, atomic)

Every input key reaches the archive exactly once, as a record or as an error row. A rerun
reads the keys already archived and processes only the rest (resume after a crash or a
kill); the summary is computed from the archive itself, so it covers every run.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import ray
from ray.data import ActorPoolStrategy

from corrdiff import weights
from pipeline.archive import ArchiveDatasink, clean_incomplete, done_keys, job_metadata
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.sources import SourceConfig, read_source
from pipeline.stages import EncodeStage, StageResources, decode_batch
from pipeline.storage import StorageConfig
from pipeline.summary import summarize, write_summary


@dataclass(frozen=True)
class CodecSettings:
    model: str | None = None  # a shipped model's name or a weights file; None = the default model
    device: str = "auto"  # auto = cuda where the actor has a GPU, else cpu
    seed: int = 0
    steps: int | None = None  # sampler steps; None = the model's


@dataclass(frozen=True)
class ResourceSettings:
    """Worker sizing; None means derived from the cluster (see ``plan_resources``)."""

    encode_actors: int | None = None
    actor_cpus: float | None = None
    actor_gpus: float | None = None
    torch_threads: int | None = None
    encode_batch_size: int = 4
    decode_batch_size: int = 16
    rows_per_file: int = 1000


@dataclass(frozen=True)
class CompressConfig:
    input: SourceConfig
    output: str
    storage: StorageConfig = field(default_factory=StorageConfig)
    codec: CodecSettings = field(default_factory=CodecSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    max_pixels: int = DEFAULT_MAX_PIXELS
    job_id: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown compress config keys: {', '.join(sorted(unknown))}")
        source = dict(data.get("input") or {})
        if "extensions" in source:
            source["extensions"] = tuple(source["extensions"])
        return cls(
            input=SourceConfig(**source),
            output=data["output"],
            storage=StorageConfig(**(data.get("storage") or {})),
            codec=CodecSettings(**(data.get("codec") or {})),
            resources=ResourceSettings(**(data.get("resources") or {})),
            max_pixels=data.get("max_pixels", DEFAULT_MAX_PIXELS),
            job_id=data.get("job_id"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The config as recorded in the archive: credentials are never written out."""
        data = dataclasses.asdict(self)
        data["storage"] = {k: v for k, v in data["storage"].items() if k not in ("key", "secret")}
        return data


@dataclass(frozen=True)
class ResourcePlan:
    decode: StageResources
    encode: StageResources
    actors: int
    torch_threads: int


def plan_resources(settings: ResourceSettings, cluster: dict[str, float]) -> ResourcePlan:
    """Size the encode actor pool from the cluster, unless the settings fix it.

    GPUs: two actors per GPU (half a GPU each), so one actor's CPU work (entropy coding,
    batching) overlaps the other's GPU work. CPUs only: actors of up to 4 torch threads,
    each reserving at most (CPUs - 1) so that the read and decode tasks always keep a CPU
    (on 2 CPUs, two actors of one CPU each would starve the readers and deadlock).
    """
    cpus, gpus = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    if gpus >= 1:
        actors = settings.encode_actors or int(2 * gpus)
        actor_gpus = settings.actor_gpus if settings.actor_gpus is not None else gpus / actors
        actor_cpus = settings.actor_cpus if settings.actor_cpus is not None else 1.0
        threads = settings.torch_threads or 2
    else:
        threads = settings.torch_threads or int(min(cpus, 4))
        actors = settings.encode_actors or max(1, int((cpus - 1) // threads))
        actor_gpus = 0.0
        actor_cpus = settings.actor_cpus if settings.actor_cpus is not None else max(0.5, min(threads, cpus - 1))
    # Decode tasks ask for half a CPU: decoding is light, and a resource shape unlike the
    # actors' keeps Ray from fusing decode into the encode actors (which would then decode
    # serially between encodes instead of overlapping with them).
    return ResourcePlan(
        decode=StageResources(num_cpus=0.5, num_gpus=0.0, batch_size=settings.decode_batch_size),
        encode=StageResources(num_cpus=actor_cpus, num_gpus=actor_gpus, batch_size=settings.encode_batch_size),
        actors=actors,
        torch_threads=threads,
    )


def new_job_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run_compress(config: CompressConfig) -> dict[str, Any]:
    """Compress everything under ``config.input`` not yet in the archive; return the summary.

    Ray must be initialised by the caller (a local cluster, or a connection to one).
    """
    job_id = config.job_id or new_job_id()
    started = time.time()
    model_path = weights.resolve(config.codec.model)
    model_id = weights.model_id(weights.load_model(model_path)).hex()
    removed = clean_incomplete(config.output, config.storage)
    skip = done_keys(config.output, config.storage)
    plan = plan_resources(config.resources, ray.cluster_resources())
    print(f"job {job_id}: model {model_path.stem} ({model_id}), {len(skip)} keys already archived, "
          f"{plan.actors} encode actor(s) x {plan.torch_threads} thread(s)"
          + (f", removed {len(removed)} incomplete file(s)" if removed else ""))

    dataset = read_source(config.input, config.storage, done_keys=skip)
    dataset = dataset.map_batches(
        decode_batch, fn_kwargs={"max_pixels": config.max_pixels}, batch_size=plan.decode.batch_size,
        batch_format="pyarrow", num_cpus=plan.decode.num_cpus,
    )
    dataset = dataset.map_batches(
        EncodeStage,
        fn_constructor_kwargs={
            "model": config.codec.model, "model_id": model_id, "device": config.codec.device, "seed": config.codec.seed,
            "steps": config.codec.steps, "torch_threads": plan.torch_threads, "job_id": job_id,
        },
        batch_size=plan.encode.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.encode.num_cpus, num_gpus=plan.encode.num_gpus or None,
    )
    metadata = job_metadata(model_path.stem, model_id, config.to_dict(), job_id)
    dataset.write_datasink(ArchiveDatasink(config.output, config.storage, metadata, job_id,
                                           config.resources.rows_per_file))
    summary = summarize(config.output, config.storage, job_id=job_id, seconds=time.time() - started)
    write_summary(config.output, config.storage, summary)
    return summary
