"""Rate-quality evaluation of a codec on one image at a time, against the classic codecs.

Each image is encoded once (``CorrDiffCodec.encode``) and its record decoded in every mode,
so the numbers are what a reader of the archive gets. Quality is PSNR, MS-SSIM, LPIPS-alex,
LPIPS-vgg and DISTS: training optimises LPIPS-alex only, and perceptual mode's gamma fit one
metric of the three, so a gain that only the fitted metric sees shows up as one
(docs/models.md). DISTS, which compares feature statistics rather than features position by
position, is scored on the matched-rate rows only, not on the curves: one more VGG pass per
curve point would add about half again to an evaluation of large photos. The rate is the
whole record's bits per pixel. Each classic codec is run on the same image at the quality
whose file is closest to that record's size (``corrdiff.baselines.match_bpp``) and, to place
the CorrDiff points against its whole curve, at a fixed grid of qualities.

Averages are means of the per-image values (PSNR too: a mean of dB, not the PSNR of the mean
MSE); MS-SSIM is averaged over the images where it is defined (> 160 px a side). Win counts
say on how many images the corrdiff decode beats each other method: a mean over a handful of
photos can be carried by one of them, a count cannot.

Plain computation on pixels: reading the images and writing the report is
``pipeline.evaluate``'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from corrdiff.baselines import decode_classic, encode_classic, match_bpp
from corrdiff.codec import CorrDiffCodec
from corrdiff.metrics import DISTS, LPIPS, FeatureMetric, bits_per_pixel, ms_ssim, psnr


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


@dataclass(frozen=True)
class Scorer:
    """Every quality measure of one reconstruction; the networks are loaded once."""

    alex: LPIPS
    vgg: LPIPS
    dists: DISTS

    @classmethod
    def load(cls, device: str) -> Scorer:
        return cls(LPIPS("alex", device=device), LPIPS("vgg", device=device), DISTS(device=device))

    @property
    def min_side(self) -> int:
        """The smallest image side every network scores."""
        return max(self.alex.min_side, self.vgg.min_side)

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


def evaluate_image(image: np.ndarray, codec: CorrDiffCodec, score: Scorer, modes: Sequence[str],
                   baselines: Sequence[str], curve_qualities: Sequence[int]) -> tuple[dict, dict[str, list[dict]]]:
    """The image's report entry (size, record bytes, each method's rate and scores), and each
    classic codec's rate and scores at the curve qualities (averaged over images by the
    caller). One image at a time, so that only one original's deep features are held, and
    computed once for every score of it."""
    height, width = image.shape[:2]
    [record] = codec.encode([image])
    bpp = bits_per_pixel(len(record), height, width)
    methods = {}
    scores = score.against(image)
    for mode in modes:
        [reconstruction] = codec.decode([record], mode=mode)
        methods[mode] = {"bpp": bpp, **scores(reconstruction)}
    for name in baselines:
        result = match_bpp(image, name, bpp, tolerance=BPP_TOLERANCE)
        methods[name] = {"bpp": result.bpp, **scores(result.reconstruction),
                         "quality": result.quality, "within_tolerance": result.within_tolerance}
    curve_points = {name: [_classic_point(image, name, quality, scores) for quality in curve_qualities]
                    for name in baselines}
    return {"height": height, "width": width, "record_bytes": len(record), "methods": methods}, curve_points


def average(results: list[dict], metrics: Sequence[str]) -> dict:
    """Mean of each metric over the images where it is defined, and how many those were."""
    means: dict = {}
    for metric in metrics:
        values = [r[metric] for r in results if r[metric] is not None]
        means[metric] = float(np.mean(values)) if values else None
    means["images"] = len(results)
    means["ms_ssim_images"] = sum(r["ms_ssim"] is not None for r in results)
    if "within_tolerance" in results[0]:
        means["within_tolerance"] = sum(r["within_tolerance"] for r in results)
    return means


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
            pairs = [(ours, theirs) for ours, theirs in pairs if finite(ours) and finite(theirs)]
            better = sum((ours > theirs) if measure.higher_is_better else (ours < theirs) for ours, theirs in pairs)
            counts[measure.key] = {"better": better, "of": len(pairs)}
        result[method] = counts
    return result


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _classic_point(image: np.ndarray, codec: str, quality: int, scores: Callable[..., dict]) -> dict:
    data = encode_classic(image, codec, quality)
    return {"bpp": bits_per_pixel(len(data), *image.shape[:2]), **scores(decode_classic(data), on_curve=True)}
