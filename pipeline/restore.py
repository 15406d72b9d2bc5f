"""Restoring archive rows to pixels: the model lookup, the per-record outcome, the stage.

Words, used one way across the project: *decode* is what a codec does to its bytes (an
image file, a CorrDiff record, a standard codec's record); *restore* is what the pipeline
does to an archive row (whatever its codec, with a status saying how it went); the
*restore job* (pipeline.restore_archive) restores rows to PNG files.

Records are CorrDiff's or, where an image met a quality floor only so, a standard codec's
file (the row's ``codec``, corrdiff.floor), decoded without a model.

Shared by the restore job (which writes the pixels as PNG), the audit (which scores them)
and the verify pass (which only needs to know that they decode): :class:`RestoreRecords`
is the model stage of the first and the last. Each record's outcome is
one of :data:`STATUSES`; an exception never escapes, because a corrupt record is a finding
to report, not a reason to stop restoring the others.

Records name their model by id. Unless a job fixes the model, each record is decoded by
the weights with that id, found through ``pipeline.models.ModelSources`` (the archive's own
``_models/``, the package, the configured stores), so one archive written by several
models (a model upgrade halfway) restores in one pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from corrdiff import CorrDiffCodec, ModelNotFoundError
from corrdiff.floor import CORRDIFF, STANDARD_CODECS, StandardRecordError, check_declared_size, decode_standard
from corrdiff.library import ModelLibrary
from corrdiff.record import MAX_PADDED_PIXELS, ModelMismatchError, Record, RecordError

from pipeline.jxl import JxlHeaderError, declared_size
from pipeline.models import ModelSources
from pipeline.ragged import EMPTY_PIXELS, ragged_column
from pipeline.stage import ModelStage

OK = "ok"
COMPRESS_ERROR = "compress_error"  # the archive holds an error row: the image was never compressed
CORRUPT = "corrupt"  # checksum, truncation or format error in the record bytes
MODEL_MISSING = "model_missing"  # no source holds verified weights with the record's model id
DECODE_FAILED = "decode_failed"  # anything else raised while decoding
# Restoring it killed the worker process (out of memory, a crash in native code), every
# time it was tried (pipeline.isolation): unproven here, e.g. too large for this node.
WORKER_DIED = "worker_died"
STATUSES = (OK, COMPRESS_ERROR, CORRUPT, MODEL_MISSING, DECODE_FAILED, WORKER_DIED)


@dataclass(frozen=True)
class Restored:
    status: str
    pixels: np.ndarray | None = None
    model_id: str | None = None
    error: str | None = None


class Restorer:
    """Restores archive rows, loading each model the first time a record needs it."""

    def __init__(self, models: ModelSources, model: str | None, device: str, torch_threads: int | None) -> None:
        """``model`` (a bundled name or a weights file) decodes every record; None: each
        record's own model, from ``models``."""
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.threads = torch.get_num_threads()  # the worker's own: for records whose encoder's count is unknown
        self.device = None if device == "auto" else device
        self.fixed = CorrDiffCodec.from_pretrained(model, device=self.device) if model is not None else None
        self.library = models.library(self.device)

    def codec_for(self, model_id: str) -> CorrDiffCodec:
        return self.fixed if self.fixed is not None else self.library.codec(model_id)

    def restore(self, record: bytes | None, archive_error: str | None, mode: str,
                codec: str | None = CORRDIFF, threads: int | None = None) -> Restored:
        """One archive row's pixels and status; ``codec`` is the row's (None or ``corrdiff``:
        a CorrDiff record; a standard codec's record decodes the same in every mode, and has
        no model). ``threads``: the torch thread count the record's encoder ran with (its
        file's ``corrdiff.torch_threads``), which the float networks then run with too: on
        the same CPU kind, that reproduces the encoder's pixels exactly (docs/method.md,
        "Reproducible pixels"); None: the worker's own count."""
        if record is None:
            return Restored(COMPRESS_ERROR, error=archive_error or "the archive row has no record")
        if codec not in (None, CORRDIFF):
            if codec not in STANDARD_CODECS:
                return Restored(CORRUPT, error=f"corrupt record: unknown codec {codec!r}")
            try:
                return Restored(OK, pixels=decode_standard_record(codec, record))
            except StandardRecordError as error:
                return Restored(CORRUPT, error=f"corrupt record: {error}")
        try:
            model_id = Record.from_bytes(record).model_id.hex()
        except RecordError as error:
            return Restored(CORRUPT, error=f"corrupt record: {error}")
        try:
            codec = self.codec_for(model_id)
        except ModelNotFoundError as error:
            return Restored(MODEL_MISSING, model_id=model_id, error=str(error))
        try:
            _use_threads(threads or self.threads)
            (pixels,) = codec.decode([record], mode=mode)
        except ModelMismatchError as error:
            return Restored(MODEL_MISSING, model_id=model_id, error=str(error))
        except RecordError as error:
            return Restored(CORRUPT, model_id=model_id, error=f"corrupt record: {error}")
        except Exception as error:  # noqa: BLE001 - one bad record must not stop the batch
            return Restored(DECODE_FAILED, model_id=model_id, error=f"decode failed: {type(error).__name__}: {error}")
        return Restored(OK, pixels=pixels, model_id=model_id)


def _use_threads(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class RestoreRecords(ModelStage):
    """Archive rows -> pixels (a ragged column: pipeline.ragged) and a status per row."""

    name = "RestoreRecords"

    def __init__(self, models: ModelSources, model: str | None, device: str, torch_threads: int | None, mode: str,
                 keep_pixels: bool = True) -> None:
        self.models, self.model, self.device, self.torch_threads, self.mode = models, model, device, torch_threads, mode
        self.keep_pixels = keep_pixels  # False: only the status matters (verify), ship no pixels
        self.setup()

    def setup(self) -> None:
        self.restorer = Restorer(self.models, self.model, self.device, self.torch_threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        restored, seconds = [], []
        for record, error, codec, threads in zip(*(batch[name].to_pylist()
                                                   for name in ("record", "error", "codec", "torch_threads"))):
            started = time.perf_counter()
            restored.append(self.restorer.restore(record, error, self.mode, codec, threads))
            seconds.append(time.perf_counter() - started)
        return _restored_rows(batch, restored, seconds, self.keep_pixels)

    @classmethod
    def lost(cls, batch: pa.Table, reason: str, settings: dict[str, Any]) -> pa.Table:
        """Rows for records whose restore killed the worker (pipeline.isolation)."""
        return _restored_rows(batch, [Restored(WORKER_DIED, error=reason)] * batch.num_rows, [0.0] * batch.num_rows,
                              keep_pixels=False)


def _restored_rows(batch: pa.Table, restored: list[Restored], seconds: list[float], keep_pixels: bool) -> pa.Table:
    return pa.table({
        "key": batch["key"], "archive_file": batch["archive_file"], "archive_row": batch["archive_row"],
        "status": pa.array([r.status for r in restored], pa.string()),
        "error": pa.array([r.error for r in restored], pa.string()),
        "model_id": pa.array([r.model_id for r in restored], pa.string()),
        "codec": batch["codec"],
        "seconds": pa.array(seconds, pa.float64()),
        "pixels": ragged_column([r.pixels if r.pixels is not None and keep_pixels else EMPTY_PIXELS
                                 for r in restored]),
    })


def decode_standard_record(codec: str, data: bytes) -> np.ndarray:
    """A standard codec's record from an archive (``corrdiff.floor.decode_standard``), its
    bytes untrusted: a JPEG XL's declared size is read from its header and bounded first
    (its plugin decodes every pixel while opening, :mod:`pipeline.jxl`)."""
    if codec == "jxl":
        try:
            check_declared_size(declared_size(data), MAX_PADDED_PIXELS, codec)
        except JxlHeaderError as error:
            raise StandardRecordError(f"jxl record: {error}") from error
    return decode_standard(codec, data)


def restore_records(models: ModelLibrary, records: list[bytes], codecs: list[str | None],
                   mode: str = "corrdiff") -> list[np.ndarray]:
    """The Python API's restore of archive rows of any codec: ``codecs`` gives each record's
    (the row's ``codec``; None or ``corrdiff``: a CorrDiff record, decoded by the model it
    names from ``models``, e.g. ``pipeline.models.archive_models(url)``). Raises
    ``RecordError``, ``StandardRecordError`` or ``ModelNotFoundError`` for a record that
    cannot be restored, ``ValueError`` for an unknown codec.

        [image] = restore_records(archive_models(url), [row["record"]], [row["codec"]])
    """
    if len(records) != len(codecs):
        raise ValueError(f"{len(records)} records but {len(codecs)} codecs")
    unknown = {c for c in codecs if c not in (None, CORRDIFF, *STANDARD_CODECS)}
    if unknown:
        raise ValueError(f"unknown codec {sorted(unknown)[0]!r}; known: {CORRDIFF}, {', '.join(STANDARD_CODECS)}")
    return [decode_standard_record(codec, record) if codec in STANDARD_CODECS else
            models.decode([record], mode=mode)[0]  # type: ignore[arg-type]
            for record, codec in zip(records, codecs)]
