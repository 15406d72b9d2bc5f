"""The job summary, computed from the archive itself so that it covers resumed runs too;
only what this job's listing and readers skipped is of this job alone."""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from corrdiff.floor import fallback_share

from pipeline.archive import list_data_files, read_columns
from pipeline.errors import is_retryable
from pipeline.models import archive_store
from pipeline.skipped import Skipped
from pipeline.storage import StorageConfig, filesystem

TOP_REASONS = 10


def summarize(url: str, storage: StorageConfig, job_id: str, seconds: float, skipped: Skipped) -> dict[str, Any]:
    """The archive's counts, plus ``skipped_this_job``: the input files and tar members this
    job's extension filter left out (they have no rows, so only the job can say)."""
    table = read_columns(url, storage, ["key", "error", "source_bytes", "bpp", "record_bytes", "width", "height",
                                        "model_id", "codec", "job_id"])
    keys = table.column("key")
    errors = table.column("error")
    ok_mask = pc.is_null(errors)
    error_texts = [e for e in errors.to_pylist() if e is not None]
    this_job = int(pc.sum(pc.equal(table.column("job_id"), job_id)).as_py() or 0)
    fs, _ = filesystem(url, storage)
    archive_bytes = sum(fs.size(p) for p in list_data_files(url, storage))
    input_bytes = int(pc.sum(table.column("source_bytes")).as_py() or 0)
    codecs = Counter(c for c in table.column("codec").to_pylist() if c is not None)
    return {
        "archive": url,
        "job_id": job_id,
        "rows": table.num_rows,
        "unique_keys": pc.count_distinct(keys).as_py(),
        "ok": int(pc.sum(ok_mask).as_py() or 0),
        "errors": len(error_texts),
        "retryable_errors": sum(is_retryable(e) for e in error_texts),  # a rerun tries these keys again
        "error_reasons": dict(Counter(_reason(e) for e in error_texts).most_common(TOP_REASONS)),
        "input_bytes": input_bytes,
        "archive_bytes": archive_bytes,
        "compression_ratio": round(input_bytes / archive_bytes, 3) if archive_bytes else None,
        **_rate(table.filter(ok_mask)),
        "models": _models(url, storage, table.column("model_id").to_pylist()),
        # Records by codec: CorrDiff's, and the fallback's where an image met the floor only so.
        "codecs": dict(sorted(codecs.items())),
        "fallback_share": fallback_share(codecs),
        "processed_this_job": this_job,
        "skipped_this_job": skipped.report(),
        "seconds": round(seconds, 2),
        "images_per_second": round(this_job / seconds, 3) if seconds > 0 else None,
    }


def _rate(records: pa.Table) -> dict[str, Any]:
    """The archive's rate: ``bpp``, all record bits over all pixels (what storing the
    collection costs), and the distribution of the per-image rates apart. A plain mean
    of per-image rates lets one tiny image (a 1x1 record costs about 130 bpp) set the
    figure for a whole archive."""
    if records.num_rows == 0:
        return {"bpp": None, "bpp_per_image": None}
    pixels = pc.sum(pc.multiply(records.column("width").cast(pa.int64()), records.column("height").cast(pa.int64())))
    bits = 8 * int(pc.sum(records.column("record_bytes")).as_py())
    p5, p50, p95 = pc.quantile(records.column("bpp"), q=[0.05, 0.5, 0.95], interpolation="nearest").to_pylist()
    return {"bpp": bits / pixels.as_py(),
            "bpp_per_image": {"p5": p5, "median": p50, "p95": p95, "max": pc.max(records.column("bpp")).as_py()}}


def _models(url: str, storage: StorageConfig, model_ids: list[str | None]) -> dict[str, dict[str, Any]]:
    """Each model the records use: how many records, and its file in the archive's
    ``_models/`` (None: the archive cannot restore those records by itself, e.g. records
    written before archives kept their models)."""
    store = archive_store(url, storage)
    models = {}
    for model_id, rows in sorted(Counter(m for m in model_ids if m).items()):
        fs, path = filesystem(store.path(model_id), storage)
        models[model_id] = {"records": rows, "file": store.path(model_id) if fs.exists(path) else None}
    return models


def _reason(error: str) -> str:
    """Group errors by their kind (the text before the first colon), not by file-specific detail."""
    return error.split(":", 1)[0]


def write_summary(url: str, storage: StorageConfig, summary: dict[str, Any]) -> str:
    """Write the summary as ``_summary.json`` (latest) and ``_summaries/<job>.json`` (history)."""
    fs, root = filesystem(url, storage)
    fs.makedirs(posixpath.join(root, "_summaries"), exist_ok=True)
    text = json.dumps(summary, indent=2, sort_keys=True)
    fs.pipe_file(posixpath.join(root, "_summaries", f"{summary['job_id']}.json"), text.encode())
    latest = posixpath.join(root, "_summary.json")
    fs.pipe_file(latest, text.encode())
    return fs.unstrip_protocol(latest)
