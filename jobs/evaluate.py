"""Evaluate a CorrDiff model against JPEG, WebP and AVIF at the same rate, image by image.

    python jobs/evaluate.py --images DIR_OR_URL --model NAME_OR_PATH [--output DIR]
        [--modes corrdiff,e2e,diffusion] [--baselines jpeg,webp,avif] [--device cpu]
        [--curve-qualities 5,10,20,30,40,50,60,70,80,90] [--gamma-refine-steps N [--gamma-lr LR]
        [--gamma-metric lpips-alex|lpips-vgg|dists]]

Each image is encoded once (``CorrDiffCodec.encode``) and its record decoded in every
mode, so the numbers are what a reader of the archive gets. Quality is PSNR, MS-SSIM,
LPIPS-alex, LPIPS-vgg and DISTS: training optimises LPIPS-alex only, and perceptual mode's
gamma fit one metric of the three (``--gamma-metric``), so a gain that only the fitted
metric sees shows up as one (docs/models.md). DISTS, which compares feature
statistics rather than features position by position, is scored on the matched-rate rows
only, not on the curves below: one more VGG pass per curve point would add about half
again to an evaluation of large photos. The rate is the whole record's bits per pixel.
Each classic codec is then run on the same image at the quality whose file is closest to
that record's size (``corrdiff.baselines.match_bpp``), and, to place the CorrDiff points
against the codec's whole curve, at a fixed grid of qualities
(``--curve-qualities ''`` skips the curves, the slowest part on large images). Images are
evaluated one at a time and each original's LPIPS and DISTS features are computed once,
for all its scores (``LPIPS.reference``, ``DISTS.reference``).

Averages are means of the per-image values (PSNR too: a mean of dB, not the PSNR of the
mean MSE); MS-SSIM is averaged over the images where it is defined (> 160 px a side).
Images smaller than LPIPS-alex's minimum (31 px a side) are skipped with a message.

Writes to OUTPUT (default ``runs/eval/<model name>``):

- ``eval.json``: model name and id, library versions, date, per-image and average metrics,
  the win counts below, and the classic codecs' curves. Strict JSON: an infinite PSNR
  (identical images) and an undefined MS-SSIM are both ``null``.
- ``eval.md``: a table with one row per decode mode and baseline, and one that counts the
  images on which the corrdiff decode beats each other method (PSNR, both LPIPS, DISTS): a
  mean over a handful of photos can be carried by one of them, a count cannot.
- ``rate_quality.png``: PSNR and LPIPS-alex against bpp.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import PIL
import torch
from PIL import features

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corrdiff import DECODE_MODES, CorrDiffCodec  # noqa: E402
from corrdiff import weights  # noqa: E402
from corrdiff.baselines import CLASSIC_CODECS, decode_classic, encode_classic, match_bpp  # noqa: E402
from corrdiff.gamma import GammaFitter, perceptual_fitter  # noqa: E402
from corrdiff.metrics import DISTS, LPIPS, PERCEPTUAL_METRICS, FeatureMetric, bits_per_pixel, ms_ssim, psnr  # noqa: E402
from pipeline.image_folder import load_images  # noqa: E402



@dataclass(frozen=True)
class Measure:
    """One column of the report: its key in eval.json, its label and digits in eval.md,
    whether a higher value is better (None for the rate), whether the win counts include
    it, and whether the classic codecs' curves carry it."""

    key: str
    label: str
    digits: int
    higher_is_better: bool | None
    counted: bool
    on_curve: bool


MEASURES = (
    Measure("bpp", "bpp", 4, None, counted=False, on_curve=True),
    Measure("psnr", "PSNR (dB)", 2, True, counted=True, on_curve=True),
    Measure("ms_ssim", "MS-SSIM", 4, True, counted=False, on_curve=True),
    Measure("lpips", "LPIPS-alex", 4, False, counted=True, on_curve=True),
    Measure("lpips_vgg", "LPIPS-vgg", 4, False, counted=True, on_curve=True),
    Measure("dists", "DISTS", 4, False, counted=True, on_curve=False),
)
METRICS = tuple(m.key for m in MEASURES)  # of each image's decode modes and matched-rate baselines
CURVE_METRICS = tuple(m.key for m in MEASURES if m.on_curve)
COUNTED = tuple(m for m in MEASURES if m.counted)
BPP_TOLERANCE = 0.05  # a baseline within 5% of the CorrDiff rate counts as matched
CURVE_QUALITIES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90)
CODEC_NAMES = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}
LABELS = {**{mode: f"CorrDiff, {mode} decode" for mode in DECODE_MODES},
          **{codec: f"{name}, matched bpp" for codec, name in CODEC_NAMES.items()}}


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; the command line's flags one to one (modes and codecs as tuples)."""

    images: str
    model: str
    output: str
    modes: tuple[str, ...] = DECODE_MODES
    baselines: tuple[str, ...] = CLASSIC_CODECS
    device: str = "cpu"
    curve_qualities: tuple[int, ...] = CURVE_QUALITIES
    gamma_refine_steps: int = 0  # as the compress job's codec.gamma_refine_steps: 0 = closed-form MSE
    gamma_learning_rate: float = 0.1
    gamma_metric: str = "lpips-alex"  # the perceptual term of those steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="fsspec URL or folder of test images")
    parser.add_argument("--model", required=True, help="a shipped model's name or a weights file")
    parser.add_argument("--output", help="output directory (default runs/eval/<model name>)")
    parser.add_argument("--modes", default=",".join(DECODE_MODES), help="decode modes, comma-separated")
    parser.add_argument("--baselines", default=",".join(CLASSIC_CODECS), help="classic codecs, comma-separated ('' for none)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--curve-qualities", default=",".join(map(str, CURVE_QUALITIES)),
                        help="qualities at which to trace each classic codec's curve, comma-separated ('' for none)")
    parser.add_argument("--gamma-refine-steps", type=int, default=0,
                        help="perceptual mode: Adam steps on MSE + --gamma-metric after the closed-form gamma (0 = off)")
    parser.add_argument("--gamma-lr", type=float, default=0.1, help="learning rate of those steps")
    parser.add_argument("--gamma-metric", default="lpips-alex", choices=PERCEPTUAL_METRICS,
                        help="the perceptual term of those steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    config = EvalConfig(
        images=args.images, model=args.model,
        output=args.output or str(Path("runs/eval") / weights.resolve(args.model).stem),
        modes=_choices(args.modes, DECODE_MODES, "mode"),
        baselines=_choices(args.baselines, CLASSIC_CODECS, "baseline"), device=args.device,
        curve_qualities=tuple(int(q) for q in args.curve_qualities.split(",") if q.strip()),
        gamma_refine_steps=args.gamma_refine_steps, gamma_learning_rate=args.gamma_lr,
        gamma_metric=args.gamma_metric,
    )
    print(markdown(run(config)))


def _choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    chosen = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return chosen


def run(config: EvalConfig) -> dict:
    """Evaluate, write eval.json, eval.md and rate_quality.png, and return the report."""
    model_path = weights.resolve(config.model)
    codec = CorrDiffCodec.from_pretrained(model_path, device=config.device)
    score = Scorer(LPIPS("alex", device=config.device), LPIPS("vgg", device=config.device),
                   DISTS(device=config.device))
    if config.gamma_refine_steps > 0:
        codec.gamma_fitter = perceptual_fitter(score.metric(config.gamma_metric), config.gamma_refine_steps,
                                               config.gamma_learning_rate)
    images = load_images(config.images, max(score.alex.min_side, score.vgg.min_side))
    if not images:
        raise SystemExit(f"no image under {config.images} is large enough to evaluate")
    per_image, curve_points = map(list, zip(*(_evaluate_image(url, image, codec, score, config) for url, image in images)))
    report = {
        "model": {"name": model_path.stem, "id": codec.model_id_hex, "path": str(model_path)},
        "gamma_fit": _gamma_fit(codec.gamma_fitter),
        "images_url": config.images,
        "modes": list(config.modes),
        "baselines": list(config.baselines),
        "versions": _versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "images": per_image,
        "averages": {method: _average([im["methods"][method] for im in per_image], METRICS)
                     for method in [*config.modes, *config.baselines]},
        "wins": wins(per_image),
        "curves": {name: [{"quality": quality, **_average([points[name][i] for points in curve_points], CURVE_METRICS)}
                          for i, quality in enumerate(config.curve_qualities)]
                   for name in config.baselines if config.curve_qualities},
    }
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n")
    (output / "eval.md").write_text(markdown(report))
    _plot(report, output / "rate_quality.png")
    return report


@dataclass(frozen=True)
class Scorer:
    """Every quality measure of one reconstruction; the networks are loaded once."""

    alex: LPIPS
    vgg: LPIPS
    dists: DISTS

    def metric(self, name: str) -> FeatureMetric:
        """The loaded network that ``corrdiff.metrics.perceptual_metric(name)`` would build
        (the config names are the metrics' own names, lower-cased; tested)."""
        return next(m for m in (self.alex, self.vgg, self.dists) if m.name.lower() == name)

    def against(self, original: np.ndarray) -> Callable[..., dict]:
        """Scores of reconstructions of ``original``, whose deep features are computed once
        for all of them (each image is scored 3 + 3 + 3 x curve points times); DISTS unless
        ``on_curve`` (module docstring)."""
        alex, vgg, dists = self.alex.reference(original), self.vgg.reference(original), self.dists.reference(original)

        def scores(reconstruction: np.ndarray, on_curve: bool = False) -> dict:
            result = {"psnr": psnr(original, reconstruction), "ms_ssim": ms_ssim(original, reconstruction),
                      "lpips": alex(reconstruction), "lpips_vgg": vgg(reconstruction)}
            return result if on_curve else {**result, "dists": dists(reconstruction)}

        return scores


def _evaluate_image(url: str, image: np.ndarray, codec: CorrDiffCodec, score: Scorer,
                    config: EvalConfig) -> tuple[dict, dict[str, list[dict]]]:
    """The image's report entry, and each classic codec's rate and scores at the curve
    qualities (averaged over images by the caller). One image at a time, so that only one
    original's LPIPS features are held, and computed once for every score of it."""
    height, width = image.shape[:2]
    [record] = codec.encode([image])
    bpp = bits_per_pixel(len(record), height, width)
    methods = {}
    scores = score.against(image)
    for mode in config.modes:
        [reconstruction] = codec.decode([record], mode=mode)
        methods[mode] = {"bpp": bpp, **scores(reconstruction)}
    for name in config.baselines:
        result = match_bpp(image, name, bpp, tolerance=BPP_TOLERANCE)
        methods[name] = {"bpp": result.bpp, **scores(result.reconstruction),
                         "quality": result.quality, "within_tolerance": result.within_tolerance}
    print(f"{url}: {width}x{height}, {bpp:.4f} bpp, "
          + ", ".join(f"{m} {v['psnr']:.2f} dB / LPIPS {v['lpips']:.4f}" for m, v in methods.items()), flush=True)
    curve_points = {name: [_classic_point(image, name, quality, scores) for quality in config.curve_qualities]
                    for name in config.baselines}
    return {"url": url, "height": height, "width": width, "record_bytes": len(record), "methods": methods}, curve_points


def _average(results: list[dict], metrics: tuple[str, ...]) -> dict:
    """Mean of each metric over the images where it is defined, and how many those were."""
    average: dict = {}
    for metric in metrics:
        values = [r[metric] for r in results if r[metric] is not None]
        average[metric] = float(np.mean(values)) if values else None
    average["images"] = len(results)
    average["ms_ssim_images"] = sum(r["ms_ssim"] is not None for r in results)
    if "within_tolerance" in results[0]:
        average["within_tolerance"] = sum(r["within_tolerance"] for r in results)
    return average


def wins(per_image: list[dict]) -> dict:
    """Per other method and quality measure, on how many images the corrdiff decode does
    better (:data:`COUNTED`): a mean can be carried by one image, a count cannot.
    Empty when the corrdiff mode was not evaluated; images where either value is undefined
    are left out of that count."""
    if not per_image or "corrdiff" not in per_image[0]["methods"]:
        return {}
    result = {}
    for method in per_image[0]["methods"]:
        if method == "corrdiff":
            continue
        counts = {}
        for measure in COUNTED:
            pairs = [(im["methods"]["corrdiff"][measure.key], im["methods"][method][measure.key]) for im in per_image]
            pairs = [(ours, theirs) for ours, theirs in pairs if _finite(ours) and _finite(theirs)]
            better = sum((ours > theirs) if measure.higher_is_better else (ours < theirs) for ours, theirs in pairs)
            counts[measure.key] = {"better": better, "of": len(pairs)}
        result[method] = counts
    return result


def _classic_point(image: np.ndarray, codec: str, quality: int, scores: Callable[..., dict]) -> dict:
    data = encode_classic(image, codec, quality)
    return {"bpp": bits_per_pixel(len(data), *image.shape[:2]), **scores(decode_classic(data), on_curve=True)}


def _versions() -> dict:
    return {
        "corrdiff-archive": _package_version("corrdiff-archive"),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "lpips": _package_version("lpips"),
        "DISTS-pytorch": _package_version("DISTS-pytorch"),
        "pytorch-msssim": _package_version("pytorch-msssim"),
        "libjpeg-turbo": features.version("libjpeg_turbo"),
        "libwebp": features.version("webp"),
        "libavif": features.version("avif"),
    }


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def strict_json(value):
    """Infinite and NaN floats -> None, so eval.json is strict JSON."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [strict_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _gamma_fit(fitter: GammaFitter) -> str:
    if not fitter.refines:
        return "closed-form MSE"
    return (f"closed-form MSE, then {fitter.refine_steps} Adam steps (lr {fitter.learning_rate:g}) "
            f"on MSE + {fitter.perceptual.name}")


def markdown(report: dict) -> str:
    """The averages as a markdown table, one row per decode mode and baseline."""
    count = len(report["images"])
    lines = [
        f"# {report['model']['name']} (model id `{report['model']['id']}`)",
        "",
        f"{count} images from `{report['images_url']}`, {report['date']}. Gammas: {report['gamma_fit']}. "
        "Means over images; baselines at the quality closest to each image's CorrDiff rate.",
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
            notes.append(f"{LABELS[method]}: within {BPP_TOLERANCE:.0%} of the CorrDiff rate on {average['within_tolerance']} of "
                         f"{count} images; the others use the quality with the closest rate (eval.json).")
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


def _plot(report: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = {"corrdiff": "*", "e2e": "o", "diffusion": "D", "jpeg": "s", "webp": "^", "avif": "v"}
    for axis, metric, title in zip(axes, ("psnr", "lpips"), ("PSNR (dB), higher is better",
                                                            "LPIPS-alex, lower is better")):
        for method, average in report["averages"].items():
            color = None
            if method in report["curves"]:
                points = [(c["bpp"], c[metric]) for c in report["curves"][method] if _finite(c[metric])]
                (line,) = axis.plot([p[0] for p in points], [p[1] for p in points], "-", alpha=0.6,
                                    label=f"{CODEC_NAMES[method]} over qualities")
                color = line.get_color()
            if _finite(average[metric]):
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


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


if __name__ == "__main__":
    main()
