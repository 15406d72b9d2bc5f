"""What one archive data file holds, in a few KB, so that an archive's summary adds up
footers instead of rereading every row.

The writer (``pipeline.archive.data_file_bytes``) computes a :class:`FileSummary` from the
rows it writes and stores it as JSON under :data:`SUMMARY_KEY` in the Parquet footer's
key-value metadata: readers that do not know it read plain Parquet. ``pipeline.summary``
merges the files' summaries. Everything here is a count or a sum, which merges exactly,
except two bounded figures:

- error reasons: at most :data:`MAX_REASONS` kinds per summary (the most common), the
  other error rows counted together in ``other_reasons``, so that a file of a million
  distinct error texts without a colon cannot blow up a footer;
- per-image bpp: a fixed log-spaced histogram (:class:`BppHistogram`), from which the
  summary's percentiles are read within one bin (1.1 %), with the exact minimum and maximum.

``keys`` counts the distinct keys of the rows summarized together (one file's): a key in
two files is two keys to a merge, because telling would mean reading every key.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import is_retryable

SUMMARY_KEY = "corrdiff.summary"  # the footer key-value metadata entry
SUMMARY_VERSION = 1  # of the JSON under SUMMARY_KEY; another version is not trusted, the rows are read instead
# The columns a summary is computed from: all a file written before footers held summaries is read for.
SUMMARY_COLUMNS = ["key", "error", "source_bytes", "bpp", "record_bytes", "width", "height", "model_id", "codec",
                   "job_id"]
MAX_REASONS = 64  # error kinds kept per summary; the project writes fewer than 30 kinds
MAX_REASON_CHARS = 200  # a kind longer than this (an error text without a colon) is cut here
# Histogram bins: 32 per octave (each bin 2.2 % wide, a value read from it within 1.1 %), from
# 2^-20 bpp (a blank gigapixel image) to 2^20 (far above a 1x1 image's 130 bpp); values
# outside go into the end bins.
BINS_PER_OCTAVE = 32
LOWEST_BIN, HIGHEST_BIN = -20 * BINS_PER_OCTAVE, 20 * BINS_PER_OCTAVE


def error_reason(error: str) -> str:
    """Group errors by their kind (the text before the first colon), not by file-specific detail."""
    return error.split(":", 1)[0][:MAX_REASON_CHARS]


@dataclass(frozen=True)
class BppHistogram:
    """Per-image rates in fixed log-spaced bins (``bins``: bin index -> count, nonzero bins only)
    and their exact extremes: mergeable, and bounded whatever the number of images (at most
    1281 bins; the rates of a file of photos fill some dozens)."""

    bins: Mapping[int, int] = field(default_factory=dict)
    low: float | None = None
    high: float | None = None

    @classmethod
    def of(cls, values: pa.Array | pa.ChunkedArray) -> BppHistogram:
        """The histogram of ``values`` (nulls and NaNs left out)."""
        array = pc.drop_null(values).to_numpy(zero_copy_only=False).astype(np.float64)
        array = array[~np.isnan(array)]
        if not len(array):
            return cls()
        with np.errstate(divide="ignore"):  # a rate of 0 goes into the lowest bin
            index = np.clip(np.floor(np.log2(array) * BINS_PER_OCTAVE), LOWEST_BIN, HIGHEST_BIN).astype(np.int64)
        found, counts = np.unique(index, return_counts=True)
        return cls({int(b): int(c) for b, c in zip(found, counts)}, float(array.min()), float(array.max()))

    @property
    def count(self) -> int:
        return sum(self.bins.values())

    def merge(self, other: BppHistogram) -> BppHistogram:
        bins = Counter(self.bins)
        bins.update(other.bins)
        lows = [v for v in (self.low, other.low) if v is not None]
        highs = [v for v in (self.high, other.high) if v is not None]
        return BppHistogram(dict(bins), min(lows) if lows else None, max(highs) if highs else None)

    def quantile(self, q: float) -> float | None:
        """The value of rank ``round(q * (n - 1))`` (the nearest rank, as
        ``pyarrow.compute.quantile(interpolation="nearest")``): exact for the lowest and
        highest rank, else its bin's geometric centre, within 1.1 % of the true value."""
        n = self.count
        if n == 0:
            return None
        rank = round(q * (n - 1))
        if rank <= 0:
            return self.low
        if rank >= n - 1:
            return self.high
        seen = 0
        for index in sorted(self.bins):
            seen += self.bins[index]
            if seen > rank:
                centre = 2.0 ** ((index + 0.5) / BINS_PER_OCTAVE)
                return min(max(centre, self.low), self.high)
        raise AssertionError("unreachable: the rank is below the count")

    def to_dict(self) -> dict:
        return {"bins": {str(b): c for b, c in sorted(self.bins.items())}, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: Mapping) -> BppHistogram:
        bins = {int(b): _count(c) for b, c in data["bins"].items()}
        low, high = (None if data[k] is None else float(data[k]) for k in ("low", "high"))
        if bool(bins) != (low is not None) or bool(bins) != (high is not None) or (bins and not low <= high):
            raise ValueError("a bpp histogram's extremes do not match its bins")
        return cls(bins, low, high)


@dataclass(frozen=True)
class FileSummary:
    """Counts and sums of some archive rows (one data file's, or merged): what
    ``pipeline.summary`` reports, without the rows."""

    rows: int = 0
    keys: int = 0  # distinct keys, counted per file (see the module)
    ok: int = 0
    errors: int = 0
    retryable_errors: int = 0
    error_reasons: Mapping[str, int] = field(default_factory=dict)  # kind -> rows, the most common MAX_REASONS
    other_reasons: int = 0  # error rows of the kinds left out of error_reasons
    input_bytes: int = 0  # source_bytes of every row
    record_bytes: int = 0  # of the ok rows
    pixels: int = 0  # of the ok rows
    codecs: Mapping[str, int] = field(default_factory=dict)  # rows per codec (error rows have none)
    models: Mapping[str, int] = field(default_factory=dict)  # rows per model id
    jobs: Mapping[str, int] = field(default_factory=dict)  # rows per job id
    bpp: BppHistogram = field(default_factory=BppHistogram)  # per-image rates of the ok rows

    @classmethod
    def of_rows(cls, table: pa.Table) -> FileSummary:
        """The summary of ``table``'s rows (it must hold :data:`SUMMARY_COLUMNS`, as the current schema)."""
        errors = table["error"]
        ok = pc.is_null(errors)
        records = table.filter(ok)
        texts = [e for e in errors.to_pylist() if e is not None]
        reasons, other = _bounded(Counter(error_reason(e) for e in texts))
        pixels = pc.sum(pc.multiply(records["width"].cast(pa.int64()), records["height"].cast(pa.int64())))
        return cls(
            rows=table.num_rows,
            keys=pc.count_distinct(table["key"]).as_py(),
            ok=records.num_rows,
            errors=len(texts),
            retryable_errors=sum(is_retryable(e) for e in texts),
            error_reasons=reasons,
            other_reasons=other,
            input_bytes=int(pc.sum(table["source_bytes"]).as_py() or 0),
            record_bytes=int(pc.sum(records["record_bytes"]).as_py() or 0),
            pixels=int(pixels.as_py() or 0),
            codecs=_counts(table["codec"]),
            models=_counts(table["model_id"]),
            jobs=_counts(table["job_id"]),
            bpp=BppHistogram.of(records["bpp"]),
        )

    def merge(self, other: FileSummary) -> FileSummary:
        reasons, dropped = _bounded(Counter(self.error_reasons) + Counter(other.error_reasons))
        return FileSummary(
            rows=self.rows + other.rows,
            keys=self.keys + other.keys,
            ok=self.ok + other.ok,
            errors=self.errors + other.errors,
            retryable_errors=self.retryable_errors + other.retryable_errors,
            error_reasons=reasons,
            other_reasons=self.other_reasons + other.other_reasons + dropped,
            input_bytes=self.input_bytes + other.input_bytes,
            record_bytes=self.record_bytes + other.record_bytes,
            pixels=self.pixels + other.pixels,
            codecs=_sum(self.codecs, other.codecs),
            models=_sum(self.models, other.models),
            jobs=_sum(self.jobs, other.jobs),
            bpp=self.bpp.merge(other.bpp),
        )

    def to_json(self) -> str:
        return json.dumps({"version": SUMMARY_VERSION, "rows": self.rows, "keys": self.keys, "ok": self.ok,
                           "errors": self.errors, "retryable_errors": self.retryable_errors,
                           "error_reasons": dict(self.error_reasons), "other_reasons": self.other_reasons,
                           "input_bytes": self.input_bytes, "record_bytes": self.record_bytes, "pixels": self.pixels,
                           "codecs": dict(self.codecs), "models": dict(self.models), "jobs": dict(self.jobs),
                           "bpp": self.bpp.to_dict()}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> FileSummary:
        """A summary read back from a footer; ``ValueError`` if it is not one this version
        wrote or does not add up (the caller then summarizes the file's rows instead)."""
        try:
            data = json.loads(text)
            if data.get("version") != SUMMARY_VERSION:
                raise ValueError(f"summary version {data.get('version')!r}, this version reads {SUMMARY_VERSION}")
            summary = cls(**{name: _count(data[name]) for name in (
                "rows", "keys", "ok", "errors", "retryable_errors", "other_reasons", "input_bytes", "record_bytes",
                "pixels")},
                **{name: {str(k): _count(v) for k, v in data[name].items()} for name in (
                    "error_reasons", "codecs", "models", "jobs")},
                bpp=BppHistogram.from_dict(data["bpp"]))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as error:
            raise ValueError(f"not a file summary: {type(error).__name__}: {error}") from error
        if not (summary.ok + summary.errors == summary.rows >= summary.keys
                and summary.errors == sum(summary.error_reasons.values()) + summary.other_reasons
                and summary.retryable_errors <= summary.errors and summary.bpp.count <= summary.ok
                and sum(summary.jobs.values()) == summary.rows):
            raise ValueError("a file summary whose counts do not add up")
        return summary


def _bounded(reasons: Counter[str]) -> tuple[dict[str, int], int]:
    """The :data:`MAX_REASONS` most common kinds (ties by name, so that a merge's result does
    not depend on its order when nothing is left out) and the count of the rows of the rest."""
    ranked = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    return dict(ranked[:MAX_REASONS]), sum(count for _, count in ranked[MAX_REASONS:])


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    """Rows per non-null value of a column."""
    return dict(sorted(Counter(v for v in column.to_pylist() if v is not None).items()))


def _sum(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    return dict(sorted((Counter(a) + Counter(b)).items()))


def _count(value: object) -> int:
    """A count read back from JSON: a non-negative int (a float, a bool, a string is refused)."""
    if type(value) is not int or value < 0:  # not isinstance: a bool is an int, and not a count
        raise ValueError(f"not a count: {value!r}")
    return value

