"""The job summary, computed from the archive itself so that it covers resumed runs too;
only what this job's listing and readers skipped is of this job alone.

It reads footers, not rows: each data file carries the summary of its rows
(pipeline.file_summary), and the archive's is their merge, so it costs a few KB per file
whatever the images. Files written before footers held summaries are read for their
summary columns (never their records). Two figures follow from that: ``unique_keys``
counts keys file by file (a key twice in one file counts once; a key in two files twice),
and the per-image bpp percentiles are read from a histogram, within 1.1 %. A key's older
retryable error row and its newer row are two rows here: the compress run supersedes the
older one (pipeline.supersede) before it summarizes, so after a run no such pair remains.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from typing import Any

from corrdiff.floor import fallback_share

from pipeline.archive import file_summaries
from pipeline.file_summary import FileSummary
from pipeline.models import archive_store
from pipeline.skipped import Skipped
from pipeline.storage import StorageConfig, filesystem

TOP_REASONS = 10


def summarize(url: str, storage: StorageConfig, job_id: str, seconds: float, skipped: Skipped) -> dict[str, Any]:
    """The archive's counts, plus ``skipped_this_job``: the input files and tar members this
    job's extension filter left out (they have no rows, so only the job can say)."""
    total, archive_bytes = FileSummary(), 0
    for size, summary in file_summaries(url, storage):  # merged as they come: memory holds a batch of them
        total, archive_bytes = total.merge(summary), archive_bytes + size
    this_job = total.jobs.get(job_id, 0)
    return {
        "archive": url,
        "job_id": job_id,
        "rows": total.rows,
        "unique_keys": total.keys,
        "ok": total.ok,
        "errors": total.errors,
        "retryable_errors": total.retryable_errors,  # a rerun tries these keys again
        "error_reasons": dict(list(total.error_reasons.items())[:TOP_REASONS]),
        "input_bytes": total.input_bytes,
        "archive_bytes": archive_bytes,
        "compression_ratio": round(total.input_bytes / archive_bytes, 3) if archive_bytes else None,
        **_rate(total),
        "models": _models(url, storage, total.models),
        # Records by codec: CorrDiff's, and the fallback's where an image met the floor only so.
        "codecs": dict(total.codecs),
        "fallback_share": fallback_share(total.codecs),
        "processed_this_job": this_job,
        "skipped_this_job": skipped.report(),
        "seconds": round(seconds, 2),
        "images_per_second": round(this_job / seconds, 3) if seconds > 0 else None,
    }


def _rate(total: FileSummary) -> dict[str, Any]:
    """The archive's rate: ``bpp``, all record bits over all pixels (what storing the
    collection costs), and the distribution of the per-image rates apart. A plain mean
    of per-image rates lets one tiny image (a 1x1 record costs about 130 bpp) set the
    figure for a whole archive."""
    if total.ok == 0 or total.pixels == 0:
        return {"bpp": None, "bpp_per_image": None}
    histogram = total.bpp
    return {"bpp": 8 * total.record_bytes / total.pixels,
            "bpp_per_image": {"p5": histogram.quantile(0.05), "median": histogram.quantile(0.5),
                              "p95": histogram.quantile(0.95), "max": histogram.high}}


def _models(url: str, storage: StorageConfig, records: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Each model the records use: how many records, and its file in the archive's
    ``_models/`` (None: the archive cannot restore those records by itself, e.g. records
    written before archives kept their models)."""
    store = archive_store(url, storage)
    models = {}
    for model_id, rows in sorted(records.items()):
        fs, path = filesystem(store.path(model_id), storage)
        models[model_id] = {"records": rows, "file": store.path(model_id) if fs.exists(path) else None}
    return models


def write_summary(url: str, storage: StorageConfig, summary: dict[str, Any]) -> str:
    """Write the summary as ``_summary.json`` (latest) and ``_summaries/<job>.json`` (history)."""
    fs, root = filesystem(url, storage)
    fs.makedirs(posixpath.join(root, "_summaries"), exist_ok=True)
    text = json.dumps(summary, indent=2, sort_keys=True)
    fs.pipe_file(posixpath.join(root, "_summaries", f"{summary['job_id']}.json"), text.encode())
    latest = posixpath.join(root, "_summary.json")
    fs.pipe_file(latest, text.encode())
    return fs.unstrip_protocol(latest)
