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
import functools
import io
import json
import math
import posixpath
from typing import Any

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from markupsafe import Markup

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


# Every value reaches the page through Jinja2 with autoescaping: keys, error texts, config
# values and, above all, earlier audits' summary.json files (read back from the report
# prefix, which anyone who can write there controls) are data, never markup. The only
# markup not written in this template is trusted constant text (_ABOUT_*).
_PAGE = """
{%- macro td(value) %}<td{% if numeric(value) %} class='num'{% endif %}>{{ value }}</td>{% endmacro %}
{%- macro img(png, alt) %}<img alt='{{ alt }}' src='data:image/png;base64,{{ b64(png) }}'>{% endmacro -%}
<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{{ title }}</title>
<style>{{ style }}</style></head><body>
<h1>{{ title }}</h1>
<p class='muted'>{{ summary.time }} &middot; archive <code>{{ summary.archive }}</code></p>
{% if failed %}<div class='banner FAIL'>FAIL: {{ failed|length }} of {{ summary.checks|length }} checks breached: {{ breaches }}</div>
{%- else %}<div class='banner PASS'>PASS: all {{ summary.checks|length }} checks hold</div>{% endif %}
<h2>Overview</h2><table>{% for label, value in overview %}<tr><td>{{ label }}</td><td>{{ value }}</td></tr>{% endfor %}</table>
<h2>Checks</h2>
{%- if summary.checks %}<table><tr><th>measure</th><th>required</th><th>value</th><th>result</th></tr>
{%- for c in summary.checks %}<tr>{{ td(c.measure) }}{{ td(c.bound) }}{{ td(fmt(c.value)) }}<td><span class='{{ c.status|replace("/", "") }}'>{{ c.status|upper }}</span></td></tr>{% endfor %}</table>
<p class='muted'>A check without a value fails: quality that cannot be measured is not shown. N/A: this kind of run does not compute the measure.</p>
{%- else %}<p>No thresholds configured.</p>{% endif %}
<h2>Trend ({{ count(trend|length, noun) }} under this report prefix)</h2>
<table><tr><th>run</th><th>time</th><th>archive rows</th>{% for _, label in trend_columns %}<th>{{ label }}</th>{% endfor %}<th>verdict</th></tr>
{%- for s in trend[-20:] %}<tr>{{ td(s.audit_id ~ (" (this)" if loop.last else "")) }}{{ td(s.time) }}{{ td(thousands(s.archive_rows)) }}
{%- for key, _ in trend_columns %}{{ td(fmt(s.measures.get(key))) }}{% endfor %}<td><span class='{{ s.verdict|lower }}'>{{ s.verdict }}</span></td></tr>{% endfor %}</table>
{%- if trend_plot %}<div class='plots'>{{ img(trend_plot, 'trend of median LPIPS and p5 PSNR') }}</div>{% endif %}
{%- if summary.kind == "audit" %}
<h2>Distributions</h2>{% if distribution_plot %}<div class='plots'>{{ img(distribution_plot, 'histograms of bpp, PSNR and LPIPS, and rate against quality') }}</div>{% else %}<p>No image could be scored.</p>{% endif %}
{%- if summary.by_codec %}
<h2>By codec</h2><p class='muted'>CorrDiff's records, and those of the fallback codec that stored the images CorrDiff would have stored below the archive's quality floor.</p>
<table><tr><th>codec</th><th>records</th><th>mean bpp</th><th>median PSNR (dB)</th><th>5th-percentile PSNR (dB)</th><th>median LPIPS</th></tr>
{%- for codec, c in summary.by_codec.items() %}<tr>{{ td(codec) }}{{ td(c.records) }}{{ td(fmt(c["bpp.mean"])) }}{{ td(fmt(c["psnr.median"])) }}{{ td(fmt(c["psnr.p5"])) }}{{ td(fmt(c["lpips.median"])) }}</tr>{% endfor %}</table>
{%- endif %}
{%- if worst %}
<h2>Worst images</h2><p class='muted'>The sampled images with the highest LPIPS; each crop is the region with the largest squared error, original on the left, restored on the right, at 1:1 pixels (shown at 256 px wide).</p>
{%- for w in worst %}
<div class='worst'><div><code>{{ w.key }}</code> &middot; LPIPS {{ fmt(w.lpips) }} &middot; PSNR {{ fmt(w.psnr) }} dB &middot; {{ fmt(w.bpp) }} bpp &middot; {{ w.width }}x{{ w.height }} px, crop {{ w.box[2] }}x{{ w.box[3] }} at ({{ w.box[0] }}, {{ w.box[1] }})</div><div class='pair'><figure>{{ img(w.original, 'original') }}<figcaption>original</figcaption></figure><figure>{{ img(w.restored, 'restored') }}<figcaption>restored</figcaption></figure></div></div>
{%- endfor %}{% endif %}{% endif %}
<h2>Integrity</h2><table><tr><th>finding</th><th>count</th></tr>{% for finding, n in counts %}<tr>{{ td(finding) }}{{ td(n) }}</tr>{% endfor %}</table>
{%- if problems %}
<p>{{ count(problems|length, 'row') }} with a finding{% if problems|length > shown|length %}; the first {{ shown|length }} shown, all in metrics.parquet{% endif %}:</p>
<table><tr><th>key</th><th>record</th>{% if audit %}<th>original</th>{% endif %}<th>reason</th><th>archive file</th></tr>
{%- for r in shown %}<tr>{{ td(r.key or "-") }}{{ td(r.record_status) }}{% if audit %}{{ td(r.original_status or "-") }}{% endif %}{{ td(r.error or "") }}<td><code>{{ basename(r.archive_file or "") }}</code> row {{ r.archive_row }}</td></tr>{% endfor %}</table>
{%- endif %}
<h2>How to read this</h2><ul class='muted'>{{ about }}</ul><p class='muted'>Files of this run:</p><ul>{% for url in summary.get("files", {}).values() %}<li><code>{{ url }}</code></li>{% endfor %}</ul>
</body></html>"""
_ABOUT_AUDIT = Markup(
    "<li><b>LPIPS</b> (AlexNet, real ImageNet weights): perceptual distance to the original; 0 is identical, "
    "lower is better; below about 0.1 differences are hard to see.</li>"
    "<li><b>PSNR</b>: over all RGB values, peak 255; higher is better. <b>MS-SSIM</b>: 1 is identical; not "
    "defined for images with a side of 160 px or less.</li>"
    "<li><b>bpp</b>: bits of the stored record (all headers included) per pixel.</li>"
    "<li><b>Originals</b> are fetched from each row's source_uri and their SHA-256 compared with the one "
    "stored at compression; a changed or missing original is reported and not scored.</li>"
    "<li>The sample is stratified over the archive's files and seeded: the same seed over the same files "
    "scores the same images.</li>")
_ABOUT_VERIFY = Markup(
    "<li>Every row of every archive file was read, and every record decoded with the fast end-to-end "
    "decoder: its checksum, format, model and entropy-coded data were all checked. Images are not "
    "compared with their originals here; an audit does that for a sample.</li>"
    "<li><b>Compress errors</b> are inputs that were never archived (bad images, with their reason): "
    "they count in the error rate, not as integrity failures.</li>"
    "<li><b>Unreadable files</b> (a footer that cannot be read, a page that fails its checksum) count as "
    "an integrity failure per row their footer says they held.</li>")


def render_html(summary: dict[str, Any], metrics: pa.Table, crops: pa.Table, history: list[dict[str, Any]]) -> str:
    """The report page; ``history`` ends with this run's summary (earlier ones are untrusted)."""
    kind = summary["kind"]
    audit = kind == "audit"
    failed = [c for c in summary["checks"] if c["status"] == "fail"]
    trend = [s for s in history if isinstance(s, dict) and s.get("kind") == kind
             and isinstance(s.get("measures"), dict)]
    problems = [r for r in metrics.to_pylist()
                if r["record_status"] != "ok" or (audit and r["original_status"] not in (None, "ok"))]
    return _template().render(
        title=f"CorrDiff archive {'audit' if audit else 'integrity check'} {summary['audit_id']}",
        style=Markup(_STYLE), summary=summary, failed=failed, audit=audit, noun="audit" if audit else "integrity check",
        breaches="; ".join(f"{c['measure']} = {_fmt(c['value'])}, required {c['bound']}" for c in failed),
        overview=_overview(summary), trend=trend, trend_columns=TREND_MEASURES[kind],
        trend_plot=_trend_plot(trend[-20:]) if audit and len(trend) >= 2 else None,
        distribution_plot=_plots(metrics) if audit else None, worst=_worst(metrics, crops) if audit else [],
        counts=_integrity_counts(summary), problems=problems, shown=problems[:PROBLEM_ROWS_SHOWN],
        about=_ABOUT_AUDIT if audit else _ABOUT_VERIFY,
    )


@functools.cache
def _template() -> jinja2.Template:
    """The page template, in an environment that escapes every value it renders."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.ChainableUndefined)
    environment.globals |= {"fmt": _fmt, "thousands": _thousands, "numeric": _numeric, "count": _count,
                            "b64": lambda png: base64.b64encode(png).decode(), "basename": posixpath.basename}
    return environment.from_string(_PAGE)


def _overview(summary: dict[str, Any]) -> list[tuple[str, str]]:
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
    codecs = summary.get("by_codec") or {}
    rows.append(("records by codec", ", ".join(f"{codec} {entry['records']:,}" for codec, entry in codecs.items())
                 + f" (fallback share {_fmt(m.get('fallback_share'))})" if codecs else "-"))
    rows += [("error rate", _fmt(m["error_rate"])), ("integrity failures", str(m["integrity_failures"])),
             ("models (where found)", ", ".join(f"{model_id}: {location or 'found nowhere'}"
                                                for model_id, location in summary.get("models", {}).items()) or "-"),
             ("run time", f"{summary['seconds']} s")]
    return rows


def _plots(metrics: pa.Table) -> bytes | None:
    """The distribution plots' PNG, or None if no image could be scored."""
    columns = {name: np.array([v for v in metrics[name].to_pylist() if v is not None and math.isfinite(v)])
               for name in ("bpp", "psnr", "lpips", "ms_ssim")}
    return _distribution_plot(metrics, columns) if any(len(v) for v in columns.values()) else None


def _worst(metrics: pa.Table, crops: pa.Table) -> list[dict[str, Any]]:
    """The worst images' crops, worst first, with their scores."""
    by_key = {r["key"]: r for r in metrics.to_pylist() if r["key"] is not None}
    ranked = sorted(crops.to_pylist(), key=lambda c: worst_first(by_key.get(c["key"], {})))
    return [{"key": crop["key"], "box": crop["crop_box"], "original": crop["original_png"],
             "restored": crop["restored_png"], **{name: by_key.get(crop["key"], {}).get(name)
                                                  for name in ("lpips", "psnr", "bpp", "width", "height")}}
            for crop in ranked]


def _integrity_counts(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    m = summary["measures"]
    counts = [("compress errors (images that were never archived)", m["compress_errors"]),
              ("corrupt records (checksum or format)", m["corrupt_records"]),
              ("records whose model is not available", m["model_missing"]),
              ("records that failed to decode", m["decode_failures"]),
              ("records whose restore killed its worker every time (out of memory?)", m["worker_deaths"]),
              ("unreadable archive files", m["unreadable_files"]),
              ("rows those files held (per their footers)", m["unreadable_rows"])]
    if summary["kind"] == "audit":
        counts += [("originals missing", m["missing_originals"]), ("originals changed since archiving",
                                                                   m["changed_originals"]),
                   ("originals unreadable", m["unreadable_originals"]),
                   ("originals without a stored checksum", m["originals_without_checksum"])]
    return counts


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
    lpips = [_number(s["measures"].get("lpips.median")) for s in history]
    psnr = [_number(s["measures"].get("psnr.p5")) for s in history]
    left.plot(x, lpips, "o-", color="#c44e52", label="median LPIPS")
    left.set_ylabel("median LPIPS", color="#c44e52")
    right = left.twinx()
    right.plot(x, psnr, "s-", color="#4c72b0", label="p5 PSNR")
    right.set_ylabel("5th-percentile PSNR (dB)", color="#4c72b0")
    left.set_xticks(x, [str(s.get("time"))[:16].replace("T", "\n") for s in history], fontsize=7)
    for i, s in enumerate(history):
        if s.get("verdict") == "FAIL":
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


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


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


def _number(value: Any) -> float:
    """A plotted value: a number, or NaN for none (or for whatever else an earlier summary holds)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def _thousands(value: Any) -> str:
    """A count with thousands separators; anything else (an earlier summary may hold anything) as text."""
    return f"{value:,}" if isinstance(value, int) else _fmt(value)
