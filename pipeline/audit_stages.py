"""The audit's stages (pipeline.stage's contract): originals, scores and crops.

    FetchOriginals (CPU tasks): each sampled row's original, fetched, checked, decoded
    ScoreRecords (model actors): the row's record restored and scored against it
    CropWorst (model actors): the worst-scored rows again, the worst region of both as PNG

Each emits one schema: :data:`METRICS_SCHEMA` (scores, and every finding as a status) or
:data:`CROP_SCHEMA` (the report's side-by-side crops).
"""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.image_decoder import Decode, isolated_decoder
from pipeline.isolation import WorkerLimits
from pipeline.models import ModelSources
from pipeline.originals import Original, read_originals
from pipeline.ragged import EMPTY_PIXELS, ragged_column
from pipeline.restore import OK, WORKER_DIED, Restorer
from pipeline.selection import UNREADABLE_FILE_KEY
from pipeline.stage import ModelStage, TaskStage
from pipeline.storage import StorageConfig

# Original statuses: what fetching source_uri and hashing it found.
ORIGINAL_OK, ORIGINAL_MISSING, ORIGINAL_CHANGED = "ok", "missing", "changed"
ORIGINAL_UNREADABLE, ORIGINAL_NO_CHECKSUM = "unreadable", "no_checksum"
UNREADABLE_FILE = "unreadable_file"  # record status of a row standing for a whole unreadable data file

METRICS_SCHEMA = pa.schema([
    ("key", pa.string()), ("archive_file", pa.string()), ("archive_row", pa.int64()), ("source_uri", pa.string()),
    ("model_id", pa.string()), ("codec", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("record_bytes", pa.int64()),
    ("bpp", pa.float64()), ("psnr", pa.float64()), ("ms_ssim", pa.float64()), ("lpips", pa.float64()),
    ("dists", pa.float64()), ("archived_psnr", pa.float64()), ("record_status", pa.string()),
    ("original_status", pa.string()), ("error", pa.string()), ("seconds", pa.float64()),
])
CROP_SCHEMA = pa.schema([("key", pa.string()), ("original_png", pa.binary()), ("restored_png", pa.binary()),
                         ("crop_box", pa.list_(pa.int32()))])


class FetchOriginals(TaskStage):
    """Each row's original, fetched where its source_uri says (pipeline/originals.py: the
    shards and Parquet files of a batch each read once), checked against the archived
    SHA-256 and decoded, with its status. Fetching and image decoding run here, in tasks, so
    that object-store latency never idles the model actors (and their GPUs). The originals
    are decoded in a child process bounded by ``limits`` (pipeline.image_decoder): one that
    crashes the decoder gets the error ``original does not decode: decode crashed
    (retryable): ...``, and the others are scored.

    Error rows (``error`` set: no record, nothing to score) and rows standing for unreadable
    data files are not fetched: their original status is null."""

    name = "FetchOriginals"

    def __init__(self, storage: StorageConfig, max_pixels: int, max_image_bytes: int, limits: WorkerLimits) -> None:
        self.storage, self.max_pixels, self.max_image_bytes, self.limits = storage, max_pixels, max_image_bytes, limits

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["key", "archive_file", "archive_row", "source_uri", "source_sha256", "error"]).to_pylist()
        wanted = [row for row in rows if row["error"] is None and not stands_for_file(row)]
        fetched = iter(read_originals(wanted, self.storage, self.max_image_bytes))
        pixels, statuses, errors = [], [], []
        with isolated_decoder(self.max_pixels, self.limits) as decode:
            for row in rows:
                original, status, error = (None, None, None) if row["error"] is not None or stands_for_file(row) else \
                    _original(next(fetched), row["source_uri"], row["source_sha256"], decode)
                pixels.append(original if original is not None else EMPTY_PIXELS)
                statuses.append(status)
                errors.append(error)
        return (batch.append_column("original_status", pa.array(statuses, pa.string()))
                .append_column("original_error", pa.array(errors, pa.string()))
                .append_column("original", ragged_column(pixels)))


def stands_for_file(row: dict[str, Any]) -> bool:
    """Whether a row stands for a whole unreadable data file (pipeline.selection)."""
    return row["key"] == UNREADABLE_FILE_KEY and row["archive_row"] == -1


def _original(fetched: Original, uri: str, sha256: str | None,
              decode: Decode) -> tuple[np.ndarray | None, str, str | None]:
    """The original's pixels if it is there and unchanged, its status, and why not."""
    if isinstance(fetched, FileNotFoundError):
        return None, ORIGINAL_MISSING, f"original missing: {uri}"
    if isinstance(fetched, Exception):
        return None, ORIGINAL_UNREADABLE, f"original unreadable: {type(fetched).__name__}: {fetched}"
    if sha256 is None:
        status = ORIGINAL_NO_CHECKSUM
    elif hashlib.sha256(fetched).hexdigest() != sha256:
        return None, ORIGINAL_CHANGED, "original changed since it was archived (SHA-256 differs)"
    else:
        status = ORIGINAL_OK
    decoded = decode(fetched)
    if isinstance(decoded, str):  # e.g. an original that never decoded
        return None, status, f"original does not decode: {decoded}"
    return decoded, status, None


def _with_originals(batch: pa.Table) -> list[tuple[dict[str, Any], np.ndarray | None]]:
    """The batch's rows (without the pixels) each with its original's pixels, or None."""
    originals = batch.column("original").combine_chunks().to_numpy()
    return [(row, original if original.size else None)
            for row, original in zip(batch.drop_columns(["original"]).to_pylist(), originals)]


class ScoreRecords(ModelStage):
    """Each row's record restored and scored against its original: PSNR, MS-SSIM, LPIPS
    (and DISTS with ``dists``), bpp; every finding (a corrupt record, a missing or changed
    original, a size that differs) as the row's status and error (:data:`METRICS_SCHEMA`)."""

    name = "ScoreRecords"

    def __init__(self, models: ModelSources, model: str | None, device: str, torch_threads: int | None, mode: str,
                 lpips_net: str, dists: bool = False) -> None:
        self.models, self.model, self.device, self.torch_threads, self.mode = models, model, device, torch_threads, mode
        self.lpips_net, self.score_dists = lpips_net, dists
        self.setup()

    def setup(self) -> None:
        from corrdiff.codec import pick_device
        from corrdiff.metrics import DISTS, LPIPS

        self.restorer = Restorer(self.models, self.model, self.device, self.torch_threads)
        device = pick_device(self.restorer.device)
        self.lpips = LPIPS(self.lpips_net, device=device)
        self.dists = DISTS(device=device) if self.score_dists else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self._score(row, original) for row, original in _with_originals(batch)],
                                    schema=METRICS_SCHEMA)

    @classmethod
    def lost(cls, batch: pa.Table, reason: str, settings: dict[str, Any]) -> pa.Table:
        """Rows for records whose restore or scoring killed the worker (pipeline.isolation)."""
        rows = [_identity(row) | {"record_status": WORKER_DIED, "error": reason, "seconds": 0.0}
                for row in batch.drop_columns(["original"]).to_pylist()]
        return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)

    def _score(self, row: dict[str, Any], original: np.ndarray | None) -> dict[str, Any]:
        from corrdiff.metrics import bits_per_pixel, ms_ssim, psnr

        started = time.perf_counter()
        out = _identity(row)
        if stands_for_file(row):
            return out | {"record_status": UNREADABLE_FILE, "error": row["error"], "seconds": 0.0}
        restored = self.restorer.restore(row["record"], row["error"], self.mode, row["codec"], row["torch_threads"])
        out |= {"record_status": restored.status, "model_id": restored.model_id or row.get("model_id"),
                "error": restored.error or row["original_error"]}
        if row["record"] is not None and row["width"] and row["height"]:
            out["bpp"] = bits_per_pixel(len(row["record"]), row["height"], row["width"])
        if restored.status == OK and original is not None:
            if original.shape != restored.pixels.shape:
                out["error"] = f"original is {original.shape[1]}x{original.shape[0]}, restored image " \
                               f"{restored.pixels.shape[1]}x{restored.pixels.shape[0]}"
            else:
                out["psnr"] = psnr(original, restored.pixels)
                out["ms_ssim"] = ms_ssim(original, restored.pixels)
                if min(original.shape[:2]) >= self.lpips.min_side:
                    out["lpips"] = self.lpips(original, restored.pixels)
                if self.dists is not None:
                    out["dists"] = self.dists(original, restored.pixels)
        out["seconds"] = time.perf_counter() - started
        return out


class CropWorst(ModelStage):
    """For each row (the audit's worst-scored), the ``side`` x ``side`` window where its
    restored image differs most from its original, cut from both (:data:`CROP_SCHEMA`); a
    row that does not restore to its original's size has no crop."""

    name = "CropWorst"

    def __init__(self, models: ModelSources, model: str | None, device: str, torch_threads: int | None, mode: str,
                 side: int) -> None:
        self.models, self.model, self.device, self.torch_threads, self.mode = models, model, device, torch_threads, mode
        self.side = side
        self.setup()

    def setup(self) -> None:
        self.restorer = Restorer(self.models, self.model, self.device, self.torch_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        crops = []
        for row, original in _with_originals(batch):
            if original is None or stands_for_file(row):
                continue
            restored = self.restorer.restore(row["record"], row["error"], self.mode, row["codec"], row["torch_threads"])
            if restored.status == OK and original.shape == restored.pixels.shape:
                crops.append({"key": row["key"], **_crops(original, restored.pixels, self.side)})
        return pa.Table.from_pylist(crops, schema=CROP_SCHEMA)

    @classmethod
    def lost(cls, batch: pa.Table, reason: str, settings: dict[str, Any]) -> pa.Table:
        """No crops of records whose restore killed the worker: the metrics say what happened."""
        return CROP_SCHEMA.empty_table()


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    """What a metrics row says of the archive row it scores, before any scoring."""
    out = {name: row.get(name) for name in ("key", "archive_file", "archive_row", "source_uri", "width",
                                            "height", "record_bytes", "model_id", "codec", "original_status")}
    return out | {"archived_psnr": row.get("psnr")}


def _crops(original: np.ndarray, restored: np.ndarray, side: int) -> dict[str, Any]:
    """The ``side`` x ``side`` window with the largest squared error, from both images, as PNG."""
    height, width = original.shape[:2]
    h, w = min(side, height), min(side, width)
    error = ((original.astype(np.float64) - restored.astype(np.float64)) ** 2).sum(axis=2)
    integral = np.pad(error.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w]
    step_y, step_x = max(1, h // 4), max(1, w // 4)
    grid = sums[::step_y, ::step_x]
    iy, ix = np.unravel_index(int(np.argmax(grid)), grid.shape)
    top, left = iy * step_y, ix * step_x
    pngs = []
    for image in (original, restored):
        buffer = io.BytesIO()
        Image.fromarray(image[top:top + h, left:left + w]).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return {"original_png": pngs[0], "restored_png": pngs[1], "crop_box": [left, top, w, h]}
