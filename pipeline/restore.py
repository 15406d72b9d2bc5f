"""Turning archive rows back into pixels: the model lookup and the per-record outcome.

Records are CorrDiff's or, where an image met a quality floor only so, a standard codec's
file (the row's ``codec``, corrdiff.floor), decoded without a model.

Shared by the restore job (which writes the pixels as PNG), the audit (which scores them)
and the verify pass (which only needs to know that they decode). Each record's outcome is
one of :data:`STATUSES`; an exception never escapes, because a corrupt record is a finding
to report, not a reason to stop restoring the others.

Records name their model by id. Unless a job fixes the model, each record is decoded by
the weights with that id, found through ``pipeline.models.ModelSources`` (the archive's own
``_models/``, the package, the configured stores), so one archive written by several
models (a model upgrade halfway) restores in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from corrdiff import CorrDiffCodec, ModelNotFoundError
from corrdiff.floor import CORRDIFF, STANDARD_CODECS, StandardRecordError, check_declared_size, decode_standard
from corrdiff.library import ModelLibrary
from corrdiff.record import MAX_PADDED_PIXELS, ModelMismatchError, Record, RecordError

from pipeline.jxl import JxlHeaderError, declared_size
from pipeline.models import ModelSources

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


class RecordDecoder:
    """Decodes records, loading each model the first time a record needs it."""

    def __init__(self, models: ModelSources, model: str | None, device: str, torch_threads: int | None) -> None:
        """``model`` (a bundled name or a weights file) decodes every record; None: each
        record's own model, from ``models``."""
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = None if device == "auto" else device
        self.fixed = CorrDiffCodec.from_pretrained(model, device=self.device) if model is not None else None
        self.library = models.library(self.device)

    def codec_for(self, model_id: str) -> CorrDiffCodec:
        return self.fixed if self.fixed is not None else self.library.codec(model_id)

    def restore(self, record: bytes | None, archive_error: str | None, mode: str,
                codec: str | None = CORRDIFF) -> Restored:
        """One archive row's pixels and status; ``codec`` is the row's (None or ``corrdiff``:
        a CorrDiff record; a standard codec's record decodes the same in every mode, and has
        no model)."""
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
            (pixels,) = codec.decode([record], mode=mode)
        except ModelMismatchError as error:
            return Restored(MODEL_MISSING, model_id=model_id, error=str(error))
        except RecordError as error:
            return Restored(CORRUPT, model_id=model_id, error=f"corrupt record: {error}")
        except Exception as error:  # noqa: BLE001 - one bad record must not stop the batch
            return Restored(DECODE_FAILED, model_id=model_id, error=f"decode failed: {type(error).__name__}: {error}")
        return Restored(OK, pixels=pixels, model_id=model_id)


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


def decode_records(models: ModelLibrary, records: list[bytes], codecs: list[str | None],
                   mode: str = "corrdiff") -> list[np.ndarray]:
    """The Python API's restore of archive rows of any codec: ``codecs`` gives each record's
    (the row's ``codec``; None or ``corrdiff``: a CorrDiff record, decoded by the model it
    names from ``models``, e.g. ``pipeline.models.archive_models(url)``). Raises
    ``RecordError``, ``StandardRecordError`` or ``ModelNotFoundError`` for a record that
    cannot be restored, ``ValueError`` for an unknown codec.

        [image] = decode_records(archive_models(url), [row["record"]], [row["codec"]])
    """
    if len(records) != len(codecs):
        raise ValueError(f"{len(records)} records but {len(codecs)} codecs")
    unknown = {c for c in codecs if c not in (None, CORRDIFF, *STANDARD_CODECS)}
    if unknown:
        raise ValueError(f"unknown codec {sorted(unknown)[0]!r}; known: {CORRDIFF}, {', '.join(STANDARD_CODECS)}")
    return [decode_standard_record(codec, record) if codec in STANDARD_CODECS else
            models.decode([record], mode=mode)[0]  # type: ignore[arg-type]
            for record, codec in zip(records, codecs)]
