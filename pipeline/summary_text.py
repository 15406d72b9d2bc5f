"""What the compress and audit commands print at the end: their summaries as a few lines
of text (the whole summaries are JSON files beside the archive and the report)."""

from __future__ import annotations

import json
from typing import Any


def compress_summary_text(summary: dict[str, Any]) -> str:
    """The compress summary (``pipeline.summary.summarize``) for a terminal or a job log."""
    lines = [
        f"archive        {summary['archive']}",
        f"job            {summary['job_id']}",
        f"images         {summary['rows']} ({summary['ok']} ok, {summary['errors']} errors)"
        + ("" if summary["rows"] == summary["unique_keys"]
           else f"  WARNING: {summary['rows'] - summary['unique_keys']} duplicate keys"),
        f"bytes          {summary['input_bytes']:,} in -> {summary['archive_bytes']:,} archived"
        + (f" ({summary['compression_ratio']}x)" if summary["compression_ratio"] else ""),
        (f"bpp            {summary['bpp']:.4f} (all bits / all pixels; per image: median "
         f"{summary['bpp_per_image']['median']:.4f}, 5-95% {summary['bpp_per_image']['p5']:.4f}-"
         f"{summary['bpp_per_image']['p95']:.4f})") if summary["bpp"] is not None else "bpp            -",
        f"this run       {summary['processed_this_job']} images in {summary['seconds']} s"
        + (f" ({summary['images_per_second']} images/s)" if summary["images_per_second"] else ""),
    ]
    if summary["fallback_share"]:
        lines.append("codecs         " + ", ".join(f"{codec} {n}" for codec, n in summary["codecs"].items())
                     + f" (fallback share {summary['fallback_share']:.1%}: images that met the floor only so)")
    for model_id, model in summary["models"].items():
        lines.append(f"model          {model_id}: {model['records']} records, "
                     + (f"weights in {model['file']}" if model["file"] else
                        "WARNING: no copy in the archive's _models/ (decoding needs the package or a model store)"))
    skipped = summary["skipped_this_job"]
    if skipped["count"]:
        lines.append(f"skipped        {skipped['count']} files or tar members without an image extension: " + "; ".join(
            f"{extension or '(none)'} {entry['count']} (e.g. {', '.join(entry['examples'])})"
            for extension, entry in skipped["by_extension"].items()))
    if summary["error_reasons"]:
        lines.append("error reasons  " + json.dumps(summary["error_reasons"]))
    if summary["retryable_errors"]:
        lines.append(f"retryable      {summary['retryable_errors']} error rows failed for a passing reason "
                     "(storage, memory): run the same command again to retry them")
    return "\n".join(lines)


def audit_summary_text(summary: dict[str, Any]) -> str:
    """An audit's or a verification's summary (``pipeline.audit``): the verdict first, then
    each check."""
    m = summary["measures"]
    lines = [f"{summary['verdict']}  {summary['kind']} {summary['audit_id']} of {summary['archive']}"]
    if summary["kind"] == "audit":
        lines.append(f"sampled {m['sampled']} of {summary['archive_rows']} rows, scored {m['scored']}: "
                     f"median LPIPS {_f(m['lpips.median'])}, "
                     + (f"median DISTS {_f(m['dists.median'])}, " if summary["config"].get("dists") else "")
                     + f"p5 PSNR {_f(m['psnr.p5'])} dB, "
                     f"mean bpp {_f(m['bpp.mean'])}")
    else:
        lines.append(f"checked {m['sampled']} records: " + ", ".join(
            f"{k} {v}" for k, v in summary["record_statuses"].items()))
    lines.append(f"error rate {_f(m['error_rate'])}, integrity failures {m['integrity_failures']}")
    lines += [f"  {c['status'].upper():4}  {c['measure']} = {_f(c['value'])} (required {c['bound']})"
              for c in summary["checks"]]
    lines.append(f"report {summary['files']['report.html']}")
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
