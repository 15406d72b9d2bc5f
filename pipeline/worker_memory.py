"""How much one restore or audit actor may hold, from what the driver already has: the
archive files' footers and the models' headers.

The compress job knows its one model and its pixel limit (pipeline.compress). An actor
that restores records (RestoreRecords: the restore job, the verify pass) gets whatever
records reach it: of any of the archive's models (its Restorer keeps every model it
loads), of any image up to the archive's largest, each coded with its job's tile. So its
bound is the runtime, every model's weights, coding the largest image with the model and
tile that need the most (corrdiff.memory.coding_bytes), and its batch of restored images
(pipeline.resources.model_worker_bytes). Nothing is opened but footers (already read to
select the rows) and the first bytes of each model file.

An audit actor (ScoreRecords) also holds its batch's originals and scores the largest
image on the whole image: LPIPS, MS-SSIM and DISTS have no tile, so their memory grows with
the image (:data:`SCORING_BYTES_PER_PIXEL`, :data:`DISTS_BYTES_PER_PIXEL`, measured).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import BinaryIO

import ray

from corrdiff import weights
from corrdiff.config import ModelConfig
from corrdiff.memory import coding_bytes
from corrdiff.tiling import Tiling
from corrdiff.weights import WeightsError, is_model_id

from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.models import ModelSources, archive_store
from pipeline.resources import ResourcePlan, ResourceSettings, model_worker_bytes, plan_resources
from pipeline.selection import ArchiveFile
from pipeline.storage import filesystem

logger = logging.getLogger(__name__)

# Peak resident memory of scoring one image beyond the loaded networks, per pixel, measured
# on the CPU (VmHWM after a reset; 1 and 4 threads; 0.26 to 4.2 Mpx): MS-SSIM 190-283 B,
# LPIPS-alex 155-200 B (run one after the other, so the larger counts); DISTS 1,594-1,604 B
# alone, 1,725 B after the others in one process (ScoreRecords' order; tests/test_worker_memory.py).
SCORING_BYTES_PER_PIXEL = 300
DISTS_BYTES_PER_PIXEL = 2_000
ORIGINAL_BYTES_PER_PIXEL = 3  # an original of the batch, decoded, waiting beside its record


def restore_worker_bytes(files: Sequence[ArchiveFile], sources: ModelSources, fixed_model: str | None,
                         batch_size: int) -> int:
    """The most one restore actor may hold restoring ``files``' records (see the module).

    A file whose footer has no width and height statistics counts as holding an image of
    the default pixel limit; one whose job named no tile holds format 1 records (every
    network on the whole image). A model whose header is found nowhere (the archive's
    ``_models/``, the package) is sized as the default model: its records may restore from
    a model store, or be ``model_missing``.
    """
    pixels = _largest_image(files)
    tiles: dict[str | None, set[Tiling | None]] = {}
    for f in files:
        if f.error is not None:
            continue
        tiles.setdefault(None if fixed_model else _checked_id(f.model_id), set()).add(_tiling(f.tile, f.tile_batch))
    shapes = {model_id: _shape(sources, model_id, fixed_model) for model_id in tiles}
    weight_bytes = sum(size for size, _ in shapes.values())
    coding = max((coding_bytes(shapes[model_id][1], tiling, pixels)
                  for model_id, tilings in tiles.items() for tiling in tilings), default=0)
    return model_worker_bytes(weight_bytes, coding, batch_size, pixels)


def audit_worker_bytes(files: Sequence[ArchiveFile], sources: ModelSources, fixed_model: str | None,
                       batch_size: int, dists: bool) -> int:
    """The most one audit actor may hold scoring ``files``' records: a restore actor's bound,
    its batch's originals, and scoring the largest image (the restored image is freed before
    scoring starts only as far as the allocator gives memory back: counted apart, to be safe)."""
    pixels = _largest_image(files)
    per_pixel = ORIGINAL_BYTES_PER_PIXEL * batch_size + max(SCORING_BYTES_PER_PIXEL,
                                                           DISTS_BYTES_PER_PIXEL if dists else 0)
    return restore_worker_bytes(files, sources, fixed_model, batch_size) + per_pixel * pixels


def sized_plan(settings: ResourceSettings, worker_bytes: int, what: str) -> ResourcePlan:
    """The job's workers, with no more model actors than the cluster's memory holds at
    ``worker_bytes`` each; logs the plan (``what``: which job's actors)."""
    plan = plan_resources(settings, ray.cluster_resources(), worker_bytes)
    logger.info("%s: %d actor(s) x %d thread(s), each up to %.1f GiB", what, plan.actors, plan.torch_threads,
                worker_bytes / 2**30)
    return plan


def _largest_image(files: Sequence[ArchiveFile]) -> int:
    """The largest image the readable ``files`` hold: the pixel limit where a footer cannot say."""
    return max((DEFAULT_MAX_PIXELS if f.largest_image is None else f.largest_image for f in files if f.error is None),
               default=0)


def _checked_id(model_id: str | None) -> str | None:
    return model_id if model_id is not None and is_model_id(model_id) else None


def _tiling(tile: int | None, tile_batch: int | None) -> Tiling | None:
    """A footer's tile side and batch as the records were cut (overlap does not change the
    memory); None where it names none, or values no writer writes: then the records are
    sized as format 1's whole-image networks, the most an image can take."""
    if tile is None or tile_batch is None:
        return None
    try:
        return Tiling(tile, 0, tile_batch)
    except ValueError:
        return None


def _shape(sources: ModelSources, model_id: str | None, fixed_model: str | None) -> tuple[int, ModelConfig]:
    """A model's weights size and config, from its header alone: the fixed model's file, else
    the archive's copy of ``model_id``, else the package's; the default model where none is found."""
    try:
        if fixed_model is not None:
            path = weights.resolve(fixed_model)
            with open(path, "rb") as handle:
                return path.stat().st_size, _config(handle, str(path))
        if model_id is not None:
            store = archive_store(sources.archive, sources.storage)
            fs, path = filesystem(store.path(model_id), sources.storage)
            if fs.exists(path):
                with fs.open(path, "rb") as handle:
                    return fs.size(path), _config(handle, store.path(model_id))
            bundled = weights.bundled_model(model_id)
            if bundled is not None:
                with open(bundled, "rb") as handle:
                    return bundled.stat().st_size, _config(handle, str(bundled))
    except (OSError, WeightsError, ValueError) as error:
        logger.warning("model %s: no readable header (%s); restore workers sized for the default model",
                       model_id or fixed_model, error)
    default = weights.resolve(None)
    with open(default, "rb") as handle:
        return default.stat().st_size, _config(handle, str(default))


def _config(handle: BinaryIO, source: str) -> ModelConfig:
    return ModelConfig.from_json(weights.header_metadata(handle, source)["config"])
