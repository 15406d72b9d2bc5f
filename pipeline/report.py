"""An audit's outputs: per-image Parquet, summary JSON and one self-contained HTML report.

Layout under the report prefix (one folder per audit, so history is a listing)::

    REPORT/<audit id>/report.html     everything a person needs; images and plots inline
    REPORT/<audit id>/summary.json    measures, checks, verdict (what a scheduler reads)
    REPORT/<audit id>/metrics.parquet per-image rows (verify: only the problem rows)
    REPORT/latest.html, latest.json   copies of the newest audit's report and summary

The HTML has no external references at all (plots are PNG data URIs, styles inline), so
it can be mailed, attached to a ticket or opened from object storage years later.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.selection import describe_sample
from pipeline.storage import StorageConfig, filesystem, with_retries

PROBLEM_ROWS_SHOWN = 50
# The columns of the trend table, per kind of run: (measure, heading).
TREND_MEASURES = {
    "audit": (("sampled", "sampled"), ("lpips.median", "median LPIPS"), ("psnr.p5", "5th-percentile PSNR (dB)"),
              ("bpp.mean", "mean bpp"), ("error_rate", "error rate"), ("integrity_failures", "integrity failures")),
    "verify": (("sampled", "records checked"), ("error_rate", "error rate"), ("corrupt_records", "corrupt"),
               ("model_missing", "model missing"), ("decode_failures", "decode failures"),
               ("unreadable_files", "unreadable files")),
}


def write_report(report: str, storage: StorageConfig, summary: dict[str, Any], metrics: pa.Table,
                 crops: pa.Table) -> dict[str, str]:
    """Write the three files (and the latest.* copies); return their URLs."""
    fs, root = filesystem(report, storage)
    folder = posixpath.join(root, summary["audit_id"])
    history = [s for s in load_history(report, storage) if s["audit_id"] != summary["audit_id"]] + [summary]
    urls = {name: fs.unstrip_protocol(posixpath.join(folder, name))
            for name in ("report.html", "summary.json", "metrics.parquet")}
    summary["files"] = urls
    buffer = io.BytesIO()
    pq.write_table(metrics, buffer, compression="zstd")
    fs.makedirs(folder, exist_ok=True)  # local paths need it; object stores have no folders
    page = render_html(summary, metrics, crops, history).encode()
    text = json.dumps(summary, indent=2, default=str).encode()
    for name, data in (("metrics.parquet", buffer.getvalue()), ("report.html", page), ("summary.json", text)):
        # summary.json last: its presence marks a complete audit for later trend tables.
        with_retries(lambda: fs.pipe_file(posixpath.join(folder, name), data), storage, f"write {name}")
    with_retries(lambda: fs.pipe_file(posixpath.join(root, "latest.html"), page), storage, "write latest.html")
    with_retries(lambda: fs.pipe_file(posixpath.join(root, "latest.json"), text), storage, "write latest.json")
    return urls


def load_history(report: str, storage: StorageConfig) -> list[dict[str, Any]]:
    """Summaries of every audit under the report prefix (REPORT/*/summary.json), oldest first."""
    fs, root = filesystem(report, storage)
    if not fs.exists(root):
        return []
    summaries = []
    for path in fs.glob(posixpath.join(root, "*", "summary.json")):
        try:
            summaries.append(json.loads(fs.cat_file(path)))
        except (ValueError, OSError):
            continue  # a half-written or foreign file is not history
    return sorted((s for s in summaries if "audit_id" in s and "time" in s), key=lambda s: (s["time"], s["audit_id"]))


def worst_first(row: dict[str, Any]) -> tuple[float, float]:
    """Sort key of a scored row: highest LPIPS first, then lowest PSNR (rows without LPIPS,
    too small for it, come after those with it)."""
    return (-(row["lpips"] if row.get("lpips") is not None else -1.0), row.get("psnr") or 0.0)


# HTML ---------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;
line-height:1.45;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.banner{padding:1rem 1.2rem;border-radius:6px;font-size:1.2rem;font-weight:600;margin:1rem 0}
.PASS{background:#e6f4ea;color:#135c2a;border:1px solid #9fd3ad}.FAIL{background:#fce8e6;color:#8c1d18;
border:1px solid #f1a9a1}
table{border-collapse:collapse;margin:.5rem 0;font-size:.92rem}td,th{border:1px solid #ddd;padding:.3rem .6rem;
text-align:left;vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#135c2a;font-weight:600}.fail{color:#8c1d18;font-weight:600}.na{color:#777}
.muted{color:#666;font-size:.9rem}.pair{display:flex;gap:.5rem;flex-wrap:wrap}.pair figure{margin:0}
.pair img{image-rendering:pixelated;border:1px solid #ccc;width:256px;height:auto}
figcaption{font-size:.8rem;color:#555}.worst{margin-bottom:1.2rem}code{font-size:.85rem;word-break:break-all}
.plots img{max-width:100%}
"""


def render_html(summary: dict[str, Any], metrics: pa.Table, crops: pa.Table, history: list[dict[str, Any]]) -> str:
    kind = summary["kind"]
    title = f"CorrDiff archive {'audit' if kind == 'audit' else 'integrity check'} {summary['audit_id']}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f"<p class='muted'>{_e(summary['time'])} &middot; archive <code>{_e(summary['archive'])}</code></p>",
             _banner(summary), _overview(summary), _checks(summary)]
    if kind == "audit":
        parts += [_trend(history), _plots(metrics), _worst(metrics, crops)]
    else:
        parts.append(_trend(history))
    parts += [_integrity(summary, metrics), _about(summary), "</body></html>"]
    return "\n".join(parts)


def _banner(summary: dict[str, Any]) -> str:
    failed = [c for c in summary["checks"] if c["status"] == "fail"]
    if not failed:
        return f"<div class='banner PASS'>PASS: all {len(summary['checks'])} checks hold</div>"
    items = "; ".join(f"{c['measure']} = {_fmt(c['value'])}, required {c['bound']}" for c in failed)
    return f"<div class='banner FAIL'>FAIL: {len(failed)} of {len(summary['checks'])} checks breached: {_e(items)}</div>"


def _overview(summary: dict[str, Any]) -> str:
    m, config = summary["measures"], summary["config"]
    rows = [("archive rows / files", f"{summary['archive_rows']:,} in {_count(summary['archive_files'], 'file')}")]
    if summary["kind"] == "audit":
        rows += [
            ("sample", f"{m['sampled']:,} rows ({describe_sample(config['sample'])}, seed {config['seed']}), "
                       f"{m['scored']:,} scored"),
            ("decode mode", config["mode"]),
            ("median LPIPS-" + config["lpips_net"], _fmt(m["lpips.median"])),
            *([("median DISTS", _fmt(m["dists.median"]))] if config.get("dists") else []),
            ("PSNR median / 5th percentile", f"{_fmt(m['psnr.median'])} / {_fmt(m['psnr.p5'])} dB"),
            ("MS-SSIM median", _fmt(m["ms_ssim.median"])),
            ("bpp mean (min - max)", f"{_fmt(m['bpp.mean'])} ({_fmt(m['bpp.min'])} - {_fmt(m['bpp.max'])})"),
        ]
    else:
        rows.append(("records checked", f"{m['sampled']:,} (every row, e2e decoder, not scored)"))
    rows += [("error rate", _fmt(m["error_rate"])), ("integrity failures", str(m["integrity_failures"])),
             ("models (where found)", ", ".join(f"{model_id}: {location or 'found nowhere'}"
                                                for model_id, location in summary.get("models", {}).items()) or "-"),
             ("run time", f"{summary['seconds']} s")]
    return "<h2>Overview</h2>" + _table(None, rows, align_numbers=False)


def _checks(summary: dict[str, Any]) -> str:
    rows = [(c["measure"], c["bound"], _fmt(c["value"]),
             f"<span class='{c['status'].replace('/', '')}'>{c['status'].upper()}</span>") for c in summary["checks"]]
    note = "<p class='muted'>A check without a value fails: quality that cannot be measured is not shown. " \
           "N/A: this kind of run does not compute the measure.</p>"
    return "<h2>Checks</h2>" + (_table(["measure", "required", "value", "result"], rows, raw_last=True) + note
                                if rows else "<p>No thresholds configured.</p>")


def _trend(history: list[dict[str, Any]]) -> str:
    kind = history[-1]["kind"]
    same_kind = [s for s in history if s.get("kind") == kind]
    columns = TREND_MEASURES[kind]
    header = ["run", "time", "archive rows"] + [label for _, label in columns] + ["verdict"]
    rows = [(_e(s["audit_id"]) + (" (this)" if s is history[-1] else ""), _e(s["time"]),
             f"{s.get('archive_rows', 0):,}", *[_fmt(s["measures"].get(key)) for key, _ in columns],
             f"<span class='{s['verdict'].lower()}'>{s['verdict']}</span>") for s in same_kind[-20:]]
    noun = "audit" if kind == "audit" else "integrity check"
    out = f"<h2>Trend ({_count(len(same_kind), noun)} under this report prefix)</h2>"
    out += _table(header, rows, raw=True)
    if len(same_kind) >= 2 and kind == "audit":
        out += f"<div class='plots'>{_img(_trend_plot(same_kind[-20:]), 'trend of median LPIPS and p5 PSNR')}</div>"
    return out


def _plots(metrics: pa.Table) -> str:
    columns = {name: np.array([v for v in metrics[name].to_pylist() if v is not None and math.isfinite(v)])
               for name in ("bpp", "psnr", "lpips", "ms_ssim")}
    if not any(len(v) for v in columns.values()):
        return "<h2>Distributions</h2><p>No image could be scored.</p>"
    return ("<h2>Distributions</h2><div class='plots'>" + _img(_distribution_plot(metrics, columns),
            "histograms of bpp, PSNR and LPIPS, and rate against quality") + "</div>")


def _worst(metrics: pa.Table, crops: pa.Table) -> str:
    if crops.num_rows == 0:
        return ""
    by_key = {r["key"]: r for r in metrics.to_pylist() if r["key"] is not None}
    out = ["<h2>Worst images</h2><p class='muted'>The sampled images with the highest LPIPS; each crop is the "
           "region with the largest squared error, original on the left, restored on the right, at 1:1 pixels "
           "(shown at 256 px wide).</p>"]
    ranked = sorted(crops.to_pylist(), key=lambda c: worst_first(by_key.get(c["key"], {})))
    for crop in ranked:
        row = by_key.get(crop["key"], {})
        left, top, width, height = crop["crop_box"]
        caption = (f"<code>{_e(crop['key'])}</code> &middot; LPIPS {_fmt(row.get('lpips'))} &middot; "
                   f"PSNR {_fmt(row.get('psnr'))} dB &middot; {_fmt(row.get('bpp'))} bpp &middot; "
                   f"{row.get('width')}x{row.get('height')} px, crop {width}x{height} at ({left}, {top})")
        out.append(f"<div class='worst'><div>{caption}</div><div class='pair'>"
                   f"<figure>{_img(crop['original_png'], 'original')}<figcaption>original</figcaption></figure>"
                   f"<figure>{_img(crop['restored_png'], 'restored')}<figcaption>restored</figcaption></figure>"
                   f"</div></div>")
    return "\n".join(out)


def _integrity(summary: dict[str, Any], metrics: pa.Table) -> str:
    m = summary["measures"]
    counts = [("compress errors (images that were never archived)", m["compress_errors"]),
              ("corrupt records (checksum or format)", m["corrupt_records"]),
              ("records whose model is not available", m["model_missing"]),
              ("records that failed to decode", m["decode_failures"]),
              ("unreadable archive files", m["unreadable_files"])]
    if summary["kind"] == "audit":
        counts += [("originals missing", m["missing_originals"]), ("originals changed since archiving",
                                                                   m["changed_originals"]),
                   ("originals unreadable", m["unreadable_originals"]),
                   ("originals without a stored checksum", m["originals_without_checksum"])]
    audit = summary["kind"] == "audit"
    problems = [r for r in metrics.to_pylist()
                if r["record_status"] != "ok" or (audit and r["original_status"] not in (None, "ok"))]
    rows = [(_e(r["key"] or "-"), _e(r["record_status"]), *([_e(r["original_status"] or "-")] if audit else []),
             _e(r["error"] or ""),
             f"<code>{_e(posixpath.basename(r['archive_file'] or ''))}</code> row {r['archive_row']}")
            for r in problems[:PROBLEM_ROWS_SHOWN]]
    out = "<h2>Integrity</h2>" + _table(["finding", "count"], [(k, str(v)) for k, v in counts])
    if rows:
        more = len(problems) - len(rows)
        out += (f"<p>{_count(len(problems), 'row')} with a finding" + (f"; the first {len(rows)} shown, all in "
                "metrics.parquet" if more > 0 else "") + ":</p>")
        out += _table(["key", "record", *(["original"] if audit else []), "reason", "archive file"], rows, raw=True)
    return out


def _about(summary: dict[str, Any]) -> str:
    files = summary.get("files", {})
    links = "".join(f"<li><code>{_e(url)}</code></li>" for url in files.values())
    if summary["kind"] == "audit":
        items = (
            "<li><b>LPIPS</b> (AlexNet, real ImageNet weights): perceptual distance to the original; 0 is identical, "
            "lower is better; below about 0.1 differences are hard to see.</li>"
            "<li><b>PSNR</b>: over all RGB values, peak 255; higher is better. <b>MS-SSIM</b>: 1 is identical; not "
            "defined for images with a side of 160 px or less.</li>"
            "<li><b>bpp</b>: bits of the stored record (all headers included) per pixel.</li>"
            "<li><b>Originals</b> are fetched from each row's source_uri and their SHA-256 compared with the one "
            "stored at compression; a changed or missing original is reported and not scored.</li>"
            "<li>The sample is stratified over the archive's files and seeded: the same seed over the same files "
            "scores the same images.</li>")
    else:
        items = (
            "<li>Every row of every archive file was read, and every record decoded with the fast end-to-end "
            "decoder: its checksum, format, model and entropy-coded data were all checked. Images are not "
            "compared with their originals here; an audit does that for a sample.</li>"
            "<li><b>Compress errors</b> are inputs that were never archived (bad images, with their reason): "
            "they count in the error rate, not as integrity failures.</li>")
    return (f"<h2>How to read this</h2><ul class='muted'>{items}</ul>"
            f"<p class='muted'>Files of this run:</p><ul>{links}</ul>")


# Plots --------------------------------------------------------------------------------


def _distribution_plot(metrics: pa.Table, columns: dict[str, np.ndarray]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for axis, (name, label) in zip(axes[:3], (("bpp", "bits per pixel"), ("psnr", "PSNR (dB)"),
                                              ("lpips", "LPIPS (lower is better)"))):
        values = columns[name]
        if len(values):
            axis.hist(values, bins=min(30, max(5, len(values) // 3)), color="#4c72b0")
            axis.axvline(float(np.median(values)), color="#c44e52", linestyle="--", label="median")
            axis.legend(fontsize=8)
        axis.set_xlabel(label)
        axis.set_ylabel("images")
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    pairs = [(r["bpp"], r["lpips"]) for r in metrics.select(["bpp", "lpips"]).to_pylist()
             if r["bpp"] is not None and r["lpips"] is not None]
    axis = axes[3]
    if pairs:
        axis.scatter(*zip(*pairs), s=12, alpha=0.7, color="#4c72b0")
    axis.set_xlabel("bits per pixel")
    axis.set_ylabel("LPIPS")
    axis.set_title("rate against quality", fontsize=10)
    figure.tight_layout()
    return _png(figure)


def _trend_plot(history: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, left = plt.subplots(figsize=(9, 3.2))
    x = np.arange(len(history))
    lpips = [s["measures"].get("lpips.median") for s in history]
    psnr = [s["measures"].get("psnr.p5") for s in history]
    left.plot(x, [v if v is not None else np.nan for v in lpips], "o-", color="#c44e52", label="median LPIPS")
    left.set_ylabel("median LPIPS", color="#c44e52")
    right = left.twinx()
    right.plot(x, [v if v is not None else np.nan for v in psnr], "s-", color="#4c72b0", label="p5 PSNR")
    right.set_ylabel("5th-percentile PSNR (dB)", color="#4c72b0")
    left.set_xticks(x, [s["time"][:16].replace("T", "\n") for s in history], fontsize=7)
    for i, s in enumerate(history):
        if s["verdict"] == "FAIL":
            left.axvspan(i - 0.4, i + 0.4, color="#fce8e6", zorder=0)
    left.set_title("audits under this report prefix (red band: FAIL)", fontsize=10)
    figure.tight_layout()
    return _png(figure)


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


# Small helpers ------------------------------------------------------------------------


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _table(columns: list[str] | None, rows: list[tuple], raw: bool = False, raw_last: bool = False,
           align_numbers: bool = True) -> str:
    """Rows as an HTML table; cells are escaped unless ``raw`` (or ``raw_last``: the last cell);
    numbers are right-aligned (``align_numbers``) for columns of values to compare."""
    head = "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>" if columns else ""
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            text = str(value) if raw or (raw_last and i == len(row) - 1) else _e(str(value))
            cls = " class='num'" if align_numbers and _numeric(value) else ""
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _numeric(value: Any) -> bool:
    try:
        float(str(value).replace(",", ""))
        return True
    except ValueError:
        return False


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
