"""The compress pipeline: object storage -> decode (CPU tasks) -> encode (actor pool) -> archive.

    model: resolved and verified (driver) -> ARCHIVE/_models/<model id>.safetensors
    source listing (driver) -> fetch bytes (tasks) -> DecodeImages (tasks, each decoding
        in a child process: pipeline.image_decoder)
        -> EncodeImages (actors, loading the model from the archive's _models/: GPUs where
           there are any, CPU threads otherwise)
        -> ArchiveDatasink (one Parquet file per write task, atomic)

Every input key reaches the archive exactly once, as a record or as an error row. A rerun
reads the keys already archived and processes only the rest (resume after a crash or a
kill); the summary is computed from the archive itself, so it covers every run. The model
is in the archive before any record it wrote: an archive never holds a record it cannot
restore by itself (pipeline/models.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from corrdiff import weights
from corrdiff.floor import Floor
from corrdiff.memory import coding_bytes
from corrdiff.metrics import PERCEPTUAL_METRICS
from corrdiff.tiling import Tiling, check_tiling
from pipeline.archive import THREADS_KEY, ArchiveDatasink, clean_incomplete, file_metadata, job_metadata, list_data_files
from pipeline.compress_stages import DecodeImages, EncodeImages
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.lease import archive_lease
from pipeline.models import MODELS_DIR, ModelSources, store_model
from pipeline.pending import pending_images
from pipeline.shards import resume_shards
from pipeline.skipped import Skipped
from pipeline.sources import SHARD_KINDS, SourceConfig, list_images, list_shards, read_images, read_shards
from pipeline.resources import ResourceSettings, model_worker_bytes, plan_resources
from pipeline.run_ids import new_run_id
from pipeline.storage import StorageConfig
from pipeline.supersede import finish_rewrites, supersede_retried
from pipeline.summary import summarize, write_summary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodecSettings:
    model: str | None = None  # a bundled model's name or a weights file; None = the default model
    device: str = "auto"  # auto = cuda where the actor has a GPU, else cpu
    seed: int = 0
    steps: int | None = None  # sampler steps; None = the model's
    # 0: each step's gamma is the closed-form MSE optimum. N > 0: then N Adam steps on
    # MSE + gamma_metric (perceptual mode: lower perceptual distance, slightly lower PSNR,
    # same bits; many times the encode time on a CPU; docs/method.md).
    gamma_refine_steps: int = 0
    gamma_learning_rate: float = 0.1
    gamma_metric: str = "lpips-alex"  # one of corrdiff.metrics.PERCEPTUAL_METRICS
    # The networks' tile (corrdiff.tiling; each record says its own): memory is set by it, not
    # by the image. Larger tiles overlap less (faster, more memory per actor, e.g. on a GPU).
    tile: int = Tiling.tile
    tile_overlap: int = Tiling.overlap
    # Score tiles per network call, kept in each record: every restore runs the same batches
    # (1: fastest on a CPU, measured; more keeps a GPU busier, and costs a CPU restore time
    # and memory; docs/method.md "Batches of tiles").
    tile_batch: int = Tiling.batch

    def __post_init__(self) -> None:
        check_tiling(self.tile, self.tile_overlap, self.tile_batch, ValueError)
        if self.gamma_refine_steps < 0 or self.gamma_learning_rate <= 0:
            raise ValueError("codec.gamma_refine_steps must be >= 0 and codec.gamma_learning_rate > 0")
        if self.gamma_metric not in PERCEPTUAL_METRICS:
            raise ValueError(f"codec.gamma_metric {self.gamma_metric!r} is not one of {', '.join(PERCEPTUAL_METRICS)}")

    @property
    def tiling(self) -> Tiling:
        return Tiling(self.tile, self.tile_overlap, self.tile_batch)


@dataclass(frozen=True)
class FloorSettings:
    """The least quality any archived image may have (corrdiff.floor), and what stores an
    image that CorrDiff would store below it. Each bound is optional, not both."""

    psnr: float | None = None  # dB, at least
    lpips: float | None = None  # LPIPS-alex, at most (loads LPIPS in every encode actor)
    fallback: str = "avif"  # avif, jxl or png (lossless): its smallest record meeting the floor
    # corrdiff: CorrDiff's record when it meets the floor, else the fallback's. smaller: both
    # are made, and the smaller record that meets the floor is stored (about eight fallback
    # encodes more per image), so no image takes more than its fallback alone would.
    choose: str = "corrdiff"

    def __post_init__(self) -> None:
        from corrdiff.floor import STANDARD_CODECS

        Floor(self.psnr, self.lpips)  # raises ValueError for bounds that mean nothing
        if self.fallback not in STANDARD_CODECS:
            raise ValueError(f"floor.fallback {self.fallback!r} is not one of {', '.join(STANDARD_CODECS)}")
        if self.choose not in FLOOR_CHOICES:
            raise ValueError(f"floor.choose {self.choose!r} is not one of {', '.join(FLOOR_CHOICES)}")

    @property
    def floor(self) -> Floor:
        return Floor(psnr=self.psnr, lpips=self.lpips)


FLOOR_CHOICES = ("corrdiff", "smaller")


@dataclass(frozen=True)
class CompressConfig:
    input: SourceConfig
    output: str
    storage: StorageConfig = field(default_factory=StorageConfig)
    codec: CodecSettings = field(default_factory=CodecSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    max_pixels: int = DEFAULT_MAX_PIXELS
    floor: FloorSettings | None = None  # None: every image is stored by CorrDiff, whatever its quality
    # Resume an archive whose rows were made with another fingerprint (content_fingerprint):
    # without it such a run is refused before any work.
    allow_config_change: bool = False
    job_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The config as recorded in the archive: credentials are never written out."""
        data = dataclasses.asdict(self)
        data["storage"] = self.storage.public()
        return data


# The codec settings that decide what is stored of an image (with the model and the floor):
# the record's bytes (seed, steps, the gamma fit, the tiles) and so which codec the floor chooses.
DECIDING_CODEC_SETTINGS = ("seed", "steps", "gamma_refine_steps", "gamma_learning_rate", "gamma_metric", "tile",
                           "tile_overlap", "tile_batch")


def content_fingerprint(config: dict[str, Any], model_id: str) -> dict[str, Any]:
    """What decides an archive's rows, from a config as recorded (``CompressConfig.to_dict``,
    or any data file's ``corrdiff.config``) and the model: the model id, the deciding codec
    settings (absent ones at their defaults, as the run that wrote them used them) and the
    floor. Device, resources and storage decide nothing stored."""
    codec = config.get("codec") if isinstance(config.get("codec"), dict) else {}
    defaults = CodecSettings()
    return {"model_id": model_id, **{name: codec.get(name, getattr(defaults, name)) for name in DECIDING_CODEC_SETTINGS},
            "floor": config.get("floor")}


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    """A short name for a fingerprint (``corrdiff.fingerprint`` in every data file)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ConfigChangeError(ValueError):
    """A run whose rows would be made otherwise than the archive's (its fingerprint differs)."""


def check_config_change(url: str, storage: StorageConfig, fingerprint: dict[str, Any], allowed: bool) -> None:
    """Refuse (:class:`ConfigChangeError`) to add rows to an archive none of whose data files
    were made with ``fingerprint``, unless ``allowed``. Once an archive holds rows of several
    fingerprints (a run allowed it), a rerun with any of them is a resume, not a change:
    each row's file keeps the config that made it, so every row still says how it was made."""
    found: dict[str, tuple[dict[str, Any], str]] = {}
    for path in list_data_files(url, storage):
        metadata = file_metadata(path, storage)
        try:
            config = json.loads(metadata.get("corrdiff.config", "{}"))
        except ValueError:
            config = {}
        theirs = content_fingerprint(config if isinstance(config, dict) else {}, metadata.get("corrdiff.model_id", ""))
        found.setdefault(fingerprint_hash(theirs), (theirs, path))
    if not found or fingerprint_hash(fingerprint) in found or allowed:
        return
    theirs, path = next(iter(found.values()))
    changes = "; ".join(f"{name}: {json.dumps(theirs.get(name), default=str)} -> "
                        f"{json.dumps(fingerprint.get(name), default=str)}"
                        for name in fingerprint if theirs.get(name) != fingerprint.get(name))
    raise ConfigChangeError(
        f"{url} holds rows made otherwise than this run would make them ({changes}; e.g. {path}): resuming would "
        "mix them silently. Rerun with --allow-config-change (allow_config_change: true) to add rows made with "
        "this config (each data file records the config and model that made its rows), or write a new archive")


def run_compress(config: CompressConfig) -> dict[str, Any]:
    """Compress everything under ``config.input`` not yet in the archive; return the summary.

    Ray must be initialised by the caller (a local cluster, or a connection to one). A run
    that loses an encode actor (its node, or its process killed from outside: inputs
    cannot kill it, pipeline.isolation) resumes itself from what the archive holds, at most
    ``resources.lost_actor_resumes`` times, then fails with Ray's error; nothing written is lost.
    """
    job_id = config.job_id or new_run_id()
    started = time.time()
    model_path = weights.resolve(config.codec.model)
    model_bytes = weights.read_weights(model_path)
    model = weights.model_from_bytes(model_bytes, str(model_path))
    model_id = weights.model_id(model).hex()
    tiling = config.codec.tiling
    worker_bytes = model_worker_bytes(len(model_bytes), coding_bytes(model.config, tiling, config.max_pixels),
                                      config.resources.actor_batch_size, config.max_pixels)
    fingerprint = content_fingerprint(config.to_dict(), model_id)
    with archive_lease(config.output, config.storage, job_id):
        check_config_change(config.output, config.storage, fingerprint, config.allow_config_change)
        stored = store_model(config.output, config.storage, model_id, model_bytes)
        logger.info("job %s: model %s (%s, %s in %s/)", job_id, model_path.stem, model_id, stored, MODELS_DIR)
        metadata = job_metadata(model_path.stem, model_id, config.to_dict(), job_id) | {
            "corrdiff.fingerprint": fingerprint_hash(fingerprint)}
        finish_rewrites(config.output, config.storage)
        (skipped, shards), resumes = _compress_resuming(config, model_id, job_id, metadata, worker_bytes)
        superseded = supersede_retried(config.output, config.storage)
        summary = summarize(config.output, config.storage, job_id=job_id, seconds=time.time() - started,
                            skipped=skipped)
        summary["resumed_after_lost_workers"] = resumes
        if shards is not None:
            summary["shards"] = shards
        summary["superseded_retryable_rows"] = superseded.rows
        write_summary(config.output, config.storage, summary)
    return summary


# What a run resumes after: a worker process or node lost, not an input's fault.
LOST_WORKER_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                      ray.exceptions.WorkerCrashedError)


def _compress_resuming(config: CompressConfig, model_id: str, job_id: str, metadata: dict[str, str],
                       worker_bytes: int) -> tuple[tuple[Skipped, dict[str, int] | None], int]:
    """Passes of :func:`_compress_missing` until one completes (at most
    ``lost_actor_resumes`` more after a lost worker); what was skipped, and how many resumes."""
    resumes = 0
    while True:
        try:
            return _compress_missing(config, model_id, job_id, metadata, worker_bytes), resumes
        except LOST_WORKER_ERRORS as error:
            if resumes == config.resources.lost_actor_resumes:
                raise
            resumes += 1
            logger.warning("job %s: lost a worker (%s: %s); resuming from the archive (%d of at most %d)", job_id,
                           type(error).__name__, _first_line(error), resumes, config.resources.lost_actor_resumes)


def _compress_missing(config: CompressConfig, model_id: str, job_id: str, metadata: dict[str, str],
                      worker_bytes: int) -> tuple[Skipped, dict[str, int] | None]:
    """One pass: every input key not yet in the archive -> decode -> encode -> archive files;
    returns what the input filter skipped (pipeline.sources) and, for tar and Parquet
    inputs, the shards: finished before (skipped unread), read, and finished by this pass
    (pipeline.shards). ``worker_bytes``: what one encode actor may hold (the model, its
    tile, the largest admitted image and its batch), which bounds how many actors run."""
    removed = clean_incomplete(config.output, config.storage)
    plan = plan_resources(config.resources, ray.cluster_resources(), worker_bytes)
    workers = (f"{plan.actors} encode actor(s) x {plan.torch_threads} thread(s), "
               f"each up to {worker_bytes / 2**30:.1f} GiB") + (
        f", removed {len(removed)} incomplete file(s)" if removed else "")
    resume = None
    if config.input.kind in SHARD_KINDS:
        resume = resume_shards(config.output, config.storage, config.input.kind,
                               list_shards(config.input, config.storage), job_id)
        listing = resume.listing
        logger.info("job %s: %d shard(s) finished before, skipped unread; %d to read, with the %d keys of theirs "
                    "already archived; %s", job_id, resume.finished_before, listing.items.num_rows, resume.done_keys,
                    workers)
        if listing.items.num_rows == 0:  # every shard finished: nothing to start
            return Skipped(), {"finished_before": resume.finished_before, "read": 0, "finished_this_run": 0}
        source = read_shards(config.input, config.storage, listing, ledger=resume.ledger)
    else:
        pending = pending_images(list_images(config.input, config.storage), config.output, config.storage)
        logger.info("job %s: %d image(s) archived before, %d to read; %s", job_id, pending.archived, pending.rows,
                    workers)
        source = read_images(pending, config.input, config.storage)
    dataset = plan.apply(source.dataset, DecodeImages, {"max_pixels": config.max_pixels, "limits": plan.image_limits})
    dataset = plan.apply(dataset, EncodeImages, {
        "models": ModelSources(config.output, config.storage), "model_id": model_id,
        "device": config.codec.device, "seed": config.codec.seed,
        "steps": config.codec.steps, "gamma_refine_steps": config.codec.gamma_refine_steps,
        "gamma_learning_rate": config.codec.gamma_learning_rate, "gamma_metric": config.codec.gamma_metric,
        "tiling": config.codec.tiling,
        "torch_threads": plan.torch_threads, "job_id": job_id, "floor": config.floor,
    })
    metadata = metadata | {THREADS_KEY: str(plan.torch_threads)}  # what restores use for the same pixels
    dataset.write_datasink(ArchiveDatasink(config.output, config.storage, metadata, job_id,
                                           config.resources.rows_per_file,
                                           on_written=resume.progress() if resume else None))
    shards = None if resume is None else {
        "finished_before": resume.finished_before, "read": resume.listing.items.num_rows,
        "finished_this_run": ray.get(resume.ledger.finished.remote())}
    return source.skipped(), shards


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""
