"""The evaluation run: a model against JPEG, WebP and AVIF at the same rate, image by image
(``corrdiff.evaluation`` scores; this module reads the photos and writes the report).

Writes to the output folder (default ``runs/eval/<model name>``):

- ``eval.json``: model name and id, library versions, date, per-image and average metrics,
  the win counts, and the classic codecs' curves. Strict JSON: an infinite PSNR (identical
  images) and an undefined MS-SSIM are both ``null``.
- ``eval.md``: a table with one row per decode mode and baseline, and one that counts the
  images on which the corrdiff decode beats each other method (PSNR, both LPIPS, DISTS).
- ``rate_quality.png``: PSNR and LPIPS-alex against bpp.

Images smaller than LPIPS-alex's minimum (31 px a side) are skipped with a message.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import features
from tqdm import tqdm

from corrdiff import DECODE_MODES, CorrDiffCodec, weights
from corrdiff.baselines import CLASSIC_CODECS
from corrdiff.evaluation import CURVE_METRICS, CURVE_QUALITIES, METRICS, Scorer, average, evaluate_image, wins
from corrdiff.gamma import GammaFitter, perceptual_fitter
from corrdiff.metrics import PERCEPTUAL_METRICS, bits_per_pixel
from corrdiff.record import FORMAT_VERSION
from pipeline.evaluation_report import markdown, plot, strict_json
from pipeline.image_folder import load_images

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate (configs/evaluate.yaml documents every key)."""

    images: str  # fsspec URL or folder of test images
    model: str  # a shipped model's name or a weights file
    output: str | None = None  # None = runs/eval/<model name>
    modes: tuple[str, ...] = DECODE_MODES
    baselines: tuple[str, ...] = CLASSIC_CODECS
    device: str = "cpu"
    curve_qualities: tuple[int, ...] = CURVE_QUALITIES  # () skips the curves, the slowest part on large images
    gamma_refine_steps: int = 0  # as the compress job's codec.gamma_refine_steps: 0 = closed-form MSE
    gamma_learning_rate: float = 0.1
    gamma_metric: str = "lpips-alex"  # the perceptual term of those steps

    def __post_init__(self) -> None:
        for what, chosen, allowed in (("modes", self.modes, DECODE_MODES),
                                      ("baselines", self.baselines, CLASSIC_CODECS),
                                      ("gamma_metric", (self.gamma_metric,), PERCEPTUAL_METRICS)):
            unknown = [item for item in chosen if item not in allowed]
            if unknown:
                raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
        bad = [q for q in self.curve_qualities if not 0 <= q <= 100]
        if bad:
            raise ValueError(f"curve qualities must be within 0-100, not {bad}")
        if self.gamma_refine_steps < 0 or self.gamma_learning_rate <= 0:
            raise ValueError("gamma_refine_steps must be >= 0 and gamma_learning_rate > 0")


def run_evaluate(config: EvaluateConfig) -> dict:
    """Evaluate, write eval.json, eval.md and rate_quality.png, and return the report."""
    model_path = weights.resolve(config.model)
    codec = CorrDiffCodec.from_pretrained(model_path, device=config.device)
    score = Scorer.load(config.device)
    if config.gamma_refine_steps > 0:
        codec.gamma_fitter = perceptual_fitter(score.metric(config.gamma_metric), config.gamma_refine_steps,
                                               config.gamma_learning_rate)
    images = load_images(config.images, score.min_side)
    if not images:
        raise ValueError(f"no image under {config.images} is large enough to evaluate")
    per_image, curve_points = [], []
    for url, image in tqdm(images, desc="evaluate", unit="image", disable=None):
        entry, points = evaluate_image(image, codec, score, config.modes, config.baselines, config.curve_qualities)
        bpp = bits_per_pixel(entry["record_bytes"], entry["height"], entry["width"])
        log.info(f"{url}: {entry['width']}x{entry['height']}, {bpp:.4f} bpp, "
                 + ", ".join(f"{m} {v['psnr']:.2f} dB / LPIPS {v['lpips']:.4f}" for m, v in entry["methods"].items()))
        per_image.append({"url": url, **entry})
        curve_points.append(points)
    report = {
        "model": {"name": model_path.stem, "id": codec.model_id_hex, "path": str(model_path)},
        "gamma_fit": _gamma_fit(codec.gamma_fitter),
        "coding": {"format_version": FORMAT_VERSION, "tile": codec.tiling.tile, "tile_overlap": codec.tiling.overlap,
                   "tile_batch": codec.tiling.batch},
        "images_url": config.images,
        "modes": list(config.modes),
        "baselines": list(config.baselines),
        "versions": _versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "images": per_image,
        "averages": {method: average([im["methods"][method] for im in per_image], METRICS)
                     for method in [*config.modes, *config.baselines]},
        "wins": wins(per_image),
        "curves": {name: [{"quality": quality, **average([points[name][i] for points in curve_points], CURVE_METRICS)}
                          for i, quality in enumerate(config.curve_qualities)]
                   for name in config.baselines if config.curve_qualities},
    }
    output = Path(config.output or Path("runs/eval") / model_path.stem)
    output.mkdir(parents=True, exist_ok=True)
    (output / "eval.json").write_text(json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n")
    (output / "eval.md").write_text(markdown(report))
    plot(report, output / "rate_quality.png")
    return report


def _gamma_fit(fitter: GammaFitter) -> str:
    if not fitter.refines:
        return "closed-form MSE"
    return (f"closed-form MSE, then {fitter.refine_steps} Adam steps (lr {fitter.learning_rate:g}) "
            f"on MSE + {fitter.perceptual.name}")


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
