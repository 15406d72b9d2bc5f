"""Quality gates: bounds on an audit's measures, and the verdict a scheduler acts on.

A config names measures and bounds::

    thresholds:
      lpips.median: {max: 0.35}     # half the sampled images at most this far (perceptually)
      psnr.p5: {min: 22.0}          # 95% of sampled images at least this PSNR
      error_rate: {max: 0.01}       # at most 1% of sampled rows not restorable
      integrity_failures: {max: 0}  # no corrupt record, missing model, unreadable file or damaged _models/ file
      fallback_share: {max: 0.05}   # at most 5% of records stored by the floor's fallback codec, not CorrDiff

Measures are ``<metric>.<statistic>`` (metrics: psnr, ms_ssim, lpips, dists, bpp; statistics:
mean, median, p5, p95, min, max) or the counts and rates in :data:`COUNT_MEASURES`.
A measure without a value (no image could be scored) fails its check: an audit that
cannot show the quality must not pass. A check on a measure this kind of run does not
compute (e.g. LPIPS in ``--verify-all``) is listed as not applicable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

METRICS = ("psnr", "ms_ssim", "lpips", "dists", "bpp")
STATISTICS = ("mean", "median", "p5", "p95", "min", "max")
COUNT_MEASURES = (
    "sampled", "scored", "error_rate", "compress_errors", "corrupt_records", "decode_failures", "model_missing",
    "worker_deaths", "unreadable_files", "unreadable_rows", "integrity_failures", "missing_originals",
    "changed_originals", "unreadable_originals",
    "originals_without_checksum", "damaged_model_files", "fallback_share",
)
MEASURES = tuple(f"{m}.{s}" for m in METRICS for s in STATISTICS) + COUNT_MEASURES


@dataclass(frozen=True)
class Threshold:
    measure: str
    min: float | None = None
    max: float | None = None

    def describe(self) -> str:
        parts = ([f">= {self.min:g}"] if self.min is not None else []) + ([f"<= {self.max:g}"] if self.max is not None else [])
        return " and ".join(parts)


@dataclass(frozen=True)
class Check:
    threshold: Threshold
    value: float | None
    status: str  # "pass", "fail" or "n/a"

    def to_dict(self) -> dict[str, Any]:
        return {"measure": self.threshold.measure, "min": self.threshold.min, "max": self.threshold.max,
                "bound": self.threshold.describe(), "value": self.value, "status": self.status}


def parse_thresholds(raw: dict[str, Any] | None) -> list[Threshold]:
    """Thresholds from a config mapping; a typo or a bound-less entry fails before any work."""
    thresholds = []
    for measure, bounds in (raw or {}).items():
        if measure not in MEASURES:
            raise ValueError(f"unknown threshold measure {measure!r}; known: {', '.join(MEASURES)}")
        if not isinstance(bounds, dict) or not bounds or set(bounds) - {"min", "max"}:
            raise ValueError(f"threshold {measure!r} needs a mapping with 'min' and/or 'max', got {bounds!r}")
        values = {k: float(v) for k, v in bounds.items()}
        if "min" in values and "max" in values and values["min"] > values["max"]:
            raise ValueError(f"threshold {measure!r}: min {values['min']} > max {values['max']}")
        thresholds.append(Threshold(measure, values.get("min"), values.get("max")))
    return thresholds


def evaluate(thresholds: list[Threshold], measures: dict[str, float | None]) -> list[Check]:
    """One check per threshold against the measures this run computed."""
    checks = []
    for threshold in thresholds:
        if threshold.measure not in measures:
            checks.append(Check(threshold, None, "n/a"))
            continue
        value = measures[threshold.measure]
        ok = value is not None and not math.isnan(value) \
            and (threshold.min is None or value >= threshold.min) \
            and (threshold.max is None or value <= threshold.max)
        checks.append(Check(threshold, value, "pass" if ok else "fail"))
    return checks


def verdict(checks: list[Check]) -> str:
    return "FAIL" if any(c.status == "fail" for c in checks) else "PASS"
