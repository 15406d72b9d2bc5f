"""The compress pipeline's two processing stages (pipeline.stage's contract).

:class:`DecodeImages` (CPU tasks) turns source bytes into pixels; :class:`EncodeImages`
(model actors) turns pixels into archive rows. Failures are per row: a bad image becomes a
row with an ``error`` reason and flows on to the archive. Image decoding runs in a child
process of its task (``pipeline.image_decoder``) and encoding in a child process of its
actor (``pipeline.isolation``), so an image that crashes either is an error row too.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.archive import SCHEMA
from pipeline.errors import is_out_of_memory, retryable
from pipeline.image_decoder import isolated_decoder
from pipeline.isolation import WorkerLimits
from pipeline.ragged import EMPTY_PIXELS, ragged_column
from pipeline.stage import ModelStage, TaskStage

if TYPE_CHECKING:  # imported by the stage's child alone: the model code stays out of the CPU tasks' workers
    from corrdiff.codec import EncodedImage
    from corrdiff.floor import StoredImage
    from pipeline.compress import FloorSettings
    from corrdiff.tiling import Tiling
    from pipeline.models import ModelSources

Batch = dict[str, np.ndarray]


DECODED_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_uri", pa.string()), ("source_bytes", pa.int64()),
    ("source_sha256", pa.string()), ("error", pa.string()),
])


class DecodeImages(TaskStage):
    """Source bytes -> RGB pixels, with the source's size and SHA-256 (for later audits).

    The images are decoded in a child process bounded by ``limits`` (pipeline.image_decoder):
    an image that crashes the decoder becomes an error row, and the rest of the batch decodes.
    Returns an Arrow table with explicit types (an all-null column would otherwise be
    inferred as untyped) and the pixels as a ragged tensor column (pipeline.ragged).
    """

    name = "DecodeImages"

    def __init__(self, max_pixels: int, limits: WorkerLimits) -> None:
        self.max_pixels, self.limits = max_pixels, limits

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        pixels, sizes, digests, errors = [], [], [], []
        with isolated_decoder(self.max_pixels, self.limits) as decode:
            for row in rows:
                data, error, image = row["data"], row["error"], EMPTY_PIXELS
                size = digest = None
                if data is None or error is not None:
                    error = error or "no image bytes"
                else:
                    size, digest = len(data), hashlib.sha256(data).hexdigest()
                    decoded = decode(data)
                    if isinstance(decoded, str):
                        error = decoded
                    else:
                        image = decoded
                pixels.append(image)
                sizes.append(size)
                digests.append(digest)
                errors.append(error)
        table = pa.Table.from_pydict({
            "key": [r["key"] for r in rows], "source_uri": [r["source_uri"] for r in rows],
            "source_bytes": sizes, "source_sha256": digests, "error": errors,
        }, schema=DECODED_SCHEMA)
        return table.append_column("pixels", ragged_column(pixels))


class EncodeImages(ModelStage):
    """Pixels -> archive rows: each image's verified CorrDiff record (or, under a quality
    floor, the fallback codec's), with what it cost and what it kept."""

    name = "EncodeImages"
    batch_format = "numpy"

    def __init__(self, models: ModelSources, model_id: str, device: str, seed: int, steps: int | None,
                 gamma_refine_steps: int, gamma_learning_rate: float, gamma_metric: str, torch_threads: int | None,
                 job_id: str, floor: FloorSettings | None = None, tiling: Tiling | None = None) -> None:
        self.models, self.model_id, self.device, self.seed, self.steps = models, model_id, device, seed, steps
        self.tiling = tiling  # None: the codec's default
        self.gamma_refine_steps, self.gamma_learning_rate = gamma_refine_steps, gamma_learning_rate
        self.gamma_metric = gamma_metric
        self.torch_threads, self.job_id = torch_threads, job_id
        self.floor = floor  # None: every image is stored by CorrDiff, unmeasured but for PSNR
        self.setup()

    def setup(self) -> None:
        """Load the model once per actor, by id from the archive's own copy (which the driver
        wrote and verified first), so that no node needs the driver's files; the library
        verifies that what it loads is that model."""
        import torch

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        device = None if self.device == "auto" else self.device
        self.codec = self.models.library(device).codec(self.model_id)
        if self.tiling is not None:
            self.codec.tiling = self.tiling
        if self.gamma_refine_steps > 0:
            from corrdiff.gamma import perceptual_fitter
            from corrdiff.metrics import perceptual_metric

            self.codec.gamma_fitter = perceptual_fitter(perceptual_metric(self.gamma_metric, self.codec.device),
                                                        self.gamma_refine_steps, self.gamma_learning_rate)
        self.lpips = None
        if self.floor is not None and self.floor.lpips is not None:  # LPIPS-alex, loaded once per actor
            from corrdiff.metrics import LPIPS

            self.lpips = LPIPS("alex", device=self.codec.device)

    def __call__(self, batch: Batch) -> pa.Table:
        from corrdiff.floor import CORRDIFF

        out = _no_results(len(batch["key"]))
        errors = list(batch["error"])
        for i, pixels in enumerate(batch["pixels"]):
            if errors[i] is not None:
                continue
            pixels = np.asarray(pixels, dtype=np.uint8)
            out["height"][i], out["width"][i] = int(pixels.shape[0]), int(pixels.shape[1])
            started = time.perf_counter()
            try:
                (encoded,) = self.codec.encode_detailed([pixels], seed=self.seed, steps=self.steps)
            except Exception as error:  # noqa: BLE001 - one failing image must not fail its batch
                detail = f"{type(error).__name__}: {error}"
                errors[i] = retryable("encode failed", detail) if is_out_of_memory(error) else f"encode failed: {detail}"
                continue
            record = encoded.record
            error = self.verify(encoded, record)
            if error is None:
                try:
                    stored = self.store(pixels, record, encoded.reconstruction)
                except Exception as store_error:  # noqa: BLE001 - a measure or a fallback encoder that failed
                    detail = f"{type(store_error).__name__}: {store_error}"
                    error = retryable("quality floor failed", detail) if is_out_of_memory(store_error) \
                        else f"quality floor failed: {detail}"
            if error is not None:
                errors[i] = error
                continue
            out["encode_seconds"][i] = time.perf_counter() - started
            out["record"][i] = stored.data
            out["codec"][i] = stored.codec
            out["codec_setting"][i] = stored.setting
            out["record_bytes"][i] = len(stored.data)
            out["bpp"][i] = 8 * len(stored.data) / (pixels.shape[0] * pixels.shape[1])
            out["psnr"][i] = stored.quality.psnr
            out["lpips"][i] = stored.quality.lpips
            if stored.codec == CORRDIFF:
                out["gammas"][i] = list(encoded.gammas)
                out["steps"][i] = len(encoded.gammas)
        return _archive_rows(batch, out, errors, self.codec.model_id_hex, self.job_id)

    def store(self, pixels: np.ndarray, record: bytes, reconstruction: np.ndarray) -> StoredImage:
        """What to archive of an image: its verified CorrDiff record, or, where that misses the
        floor, the fallback codec's smallest record meeting it (corrdiff.floor.store_meeting)."""
        from corrdiff.floor import CORRDIFF, FloorMeter, Quality, StoredImage, store_meeting
        from corrdiff.metrics import psnr

        if self.floor is None:
            return StoredImage(CORRDIFF, record, None, reconstruction, Quality(psnr(pixels, reconstruction)))
        meter = FloorMeter(pixels, self.lpips)
        corrdiff = StoredImage(CORRDIFF, record, None, reconstruction, meter(reconstruction))
        return store_meeting(pixels, corrdiff, self.floor.floor, self.floor.fallback, meter,
                             smaller=self.floor.choose == "smaller")

    def verify(self, encoded: EncodedImage, record: bytes) -> str | None:
        """Check the record about to be archived against what the encoder coded
        (``CorrDiffCodec.verify``); None if it holds, else the error row's reason. A record
        that fails is never archived: its key gets a retryable error row (the fault is the
        platform's, not the image's), and a rerun encodes it again."""
        try:
            self.codec.verify(encoded, record)
        except Exception as error:  # noqa: BLE001 - a failed check is a row, never a lost batch
            return retryable("record verification failed", f"{type(error).__name__}: {error}")
        return None

    @classmethod
    def lost(cls, batch: Batch, reason: str, settings: dict[str, Any]) -> pa.Table:
        """Error rows for images whose encode killed the worker (pipeline.isolation)."""
        errors = [error if error is not None else reason for error in batch["error"]]
        return _archive_rows(batch, _no_results(len(batch["key"])), errors, None, settings["job_id"])


RESULT_COLUMNS = ("record", "codec", "codec_setting", "record_bytes", "bpp", "psnr", "lpips", "width", "height",
                  "gammas", "steps", "encode_seconds")


def _no_results(rows: int) -> dict[str, list[Any]]:
    return {name: [None] * rows for name in RESULT_COLUMNS}


def _archive_rows(batch: Batch, out: dict[str, list[Any]], errors: list[str | None], model_id: str | None,
                  job_id: str) -> pa.Table:
    """The archive's rows (pipeline.archive.SCHEMA) for a batch: a record where ``errors``
    has None, else an error row with its reason. ``model_id`` and ``format_version`` belong
    to CorrDiff records alone."""
    from corrdiff.floor import CORRDIFF
    from corrdiff.record import FORMAT_VERSION

    n = len(batch["key"])
    ok = [e is None and codec == CORRDIFF for e, codec in zip(errors, out["codec"])]
    return pa.Table.from_pydict({
        "key": list(batch["key"]),
        "source_uri": list(batch["source_uri"]),
        "source_bytes": [int(v) if v >= 0 else None for v in batch["source_bytes"]],
        "source_sha256": list(batch["source_sha256"]),
        **out,
        "model_id": [model_id if good else None for good in ok],
        "format_version": [FORMAT_VERSION if good else None for good in ok],
        "error": errors,
        "created_at": [datetime.now(timezone.utc)] * n,
        "job_id": [job_id] * n,
    }, schema=SCHEMA)
