"""The evaluation's report files: eval.md's tables and rate_quality.png's plot, from the
report that ``pipeline.evaluate.run_evaluate`` also writes as eval.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from corrdiff import DECODE_MODES  # noqa: E402
from corrdiff.evaluation import BPP_TOLERANCE, COUNTED, MEASURES, finite  # noqa: E402

CODEC_NAMES = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}
LABELS = {**{mode: f"CorrDiff, {mode} decode" for mode in DECODE_MODES},
          **{codec: f"{name}, matched bpp" for codec, name in CODEC_NAMES.items()}}


def strict_json(value: Any) -> Any:
    """Infinite and NaN floats -> None, so eval.json is strict JSON."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _coding(coding: dict | None) -> str:
    """How the records were coded; reports from before it was recorded say nothing."""
    if not coding:
        return ""
    return (f"Records: format {coding['format_version']}, tiles of {coding['tile']} px overlapping by "
            f"{coding['tile_overlap']}, {coding['tile_batch']} per score-network call. ")


def markdown(report: dict) -> str:
    """The averages as a markdown table, one row per decode mode and baseline, and the win counts."""
    count = len(report["images"])
    lines = [
        f"# {report['model']['name']} (model id `{report['model']['id']}`)",
        "",
        f"{count} images from `{report['images_url']}`, {report['date']}. Gammas: {report['gamma_fit']}. "
        f"{_coding(report.get('coding'))}Means over images; baselines at the quality closest to each image's "
        "CorrDiff rate.",
        "",
        "| method | " + " | ".join(m.label for m in MEASURES) + " |",
        "|---|" + "---:|" * len(MEASURES),
    ]
    notes = []
    measurable = sum(min(im["height"], im["width"]) > 160 for im in report["images"])
    if measurable < count:
        notes.append(f"MS-SSIM over the {measurable} of {count} images larger than 160 px a side.")
    for method, average in report["averages"].items():
        cells = [_format(average[m.key], m.digits) for m in MEASURES]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        if average.get("within_tolerance", count) < count:
            notes.append(f"{LABELS[method]}: within {BPP_TOLERANCE:.0%} of the CorrDiff rate on "
                         f"{average['within_tolerance']} of {count} images; the others use the quality with the "
                         "closest rate (eval.json).")
    lines += _wins_table(report["wins"])
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


def _wins_table(counts: dict) -> list[str]:
    if not counts:
        return []
    lines = ["", "Images where the corrdiff decode does better than each other method:", "",
             "| against | " + " | ".join(m.label.removesuffix(" (dB)") for m in COUNTED) + " |",
             "|---|" + "---:|" * len(COUNTED)]
    for method, by_metric in counts.items():
        cells = [f"{by_metric[m.key]['better']} of {by_metric[m.key]['of']}" for m in COUNTED]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return lines


def _format(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def plot(report: dict, path: Path) -> None:
    """PSNR and LPIPS-alex against bpp: each method's mean point, each classic codec's curve."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = {"corrdiff": "*", "e2e": "o", "diffusion": "D", "jpeg": "s", "webp": "^", "avif": "v"}
    for axis, metric, title in zip(axes, ("psnr", "lpips"), ("PSNR (dB), higher is better",
                                                            "LPIPS-alex, lower is better")):
        for method, average in report["averages"].items():
            color = None
            if method in report["curves"]:
                points = [(c["bpp"], c[metric]) for c in report["curves"][method] if finite(c[metric])]
                (line,) = axis.plot([p[0] for p in points], [p[1] for p in points], "-", alpha=0.6,
                                    label=f"{CODEC_NAMES[method]} over qualities")
                color = line.get_color()
            if finite(average[metric]):
                # The corrdiff point goes on top: it often sits on the e2e point.
                axis.plot(average["bpp"], average[metric], markers[method], color=color,
                          markersize=11 if method == "corrdiff" else 8, label=LABELS[method],
                          zorder=3 if method == "corrdiff" else 2)
        axis.set_xlabel("bits per pixel")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(f"{report['model']['name']}: {len(report['images'])} images")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
