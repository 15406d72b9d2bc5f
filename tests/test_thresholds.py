"""Threshold parsing and checks, and the archive sample's stratification."""

from __future__ import annotations

import pytest

from pipeline.selection import ArchiveFile, describe_sample, sample_rows, sample_size
from pipeline.thresholds import Threshold, evaluate, parse_thresholds, verdict


def test_parse_and_evaluate():
    thresholds = parse_thresholds({"lpips.median": {"max": 0.3}, "psnr.p5": {"min": 25}, "error_rate": {"max": 0}})
    assert thresholds[0] == Threshold("lpips.median", max=0.3)
    checks = evaluate(thresholds, {"lpips.median": 0.29, "psnr.p5": 24.9, "error_rate": 0.0})
    assert [c.status for c in checks] == ["pass", "fail", "pass"] and verdict(checks) == "FAIL"
    assert verdict(evaluate(thresholds[:1], {"lpips.median": 0.3})) == "PASS"  # bounds are inclusive


def test_missing_values_fail_and_absent_measures_are_not_applicable():
    checks = evaluate(parse_thresholds({"lpips.median": {"max": 1}, "psnr.p5": {"min": 0}}), {"lpips.median": None})
    assert [c.status for c in checks] == ["fail", "n/a"]


@pytest.mark.parametrize("raw, message", [
    ({"lpips.mediam": {"max": 1}}, "unknown threshold measure"),
    ({"psnr.p5": 25}, "needs a mapping"),
    ({"psnr.p5": {"above": 25}}, "needs a mapping"),
    ({"psnr.p5": {"min": 30, "max": 20}}, "min 30.0 > max 20.0"),
])
def test_bad_thresholds_are_rejected(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_thresholds(raw)


def test_sample_size_is_a_count_or_a_percentage():
    assert sample_size(200, 1000) == 200 and sample_size("200", 1000) == 200 and sample_size(5000, 1000) == 1000
    assert sample_size("1%", 1000) == 10 and sample_size("0.01%", 1000) == 1 and sample_size("100%", 1000) == 1000
    assert sample_size("1", 1000) == 1  # one row, never "all of them"
    assert describe_sample("10%") == "asked for 10% of the rows" and describe_sample(1000) == "asked for 1,000 rows"


@pytest.mark.parametrize("bad, message", [
    (1.0, "count of rows .* or a percentage"), (0.5, "did you mean 50%"), (0, "at least 1"), (-1, "at least 1"),
    ("0%", "percentage must be"), ("101%", "percentage must be"), ("ten%", "percentage must be"), ("1.5", "got '1.5'"),
    (True, "count of rows"),
])
def test_ambiguous_or_invalid_samples_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        sample_size(bad, 10)


def test_sample_is_stratified_seeded_and_skips_unreadable_files():
    files = [ArchiveFile("a", 1000), ArchiveFile("b", 3000), ArchiveFile("c", 0), ArchiveFile("d", 50, "broken")]
    sample = sample_rows(files, 100, seed=7)
    assert {s.path: len(s.rows) for s in sample} == {"a": 25, "b": 75}
    assert all(list(s.rows) == sorted(set(s.rows)) for s in sample)
    assert sample == sample_rows(files, 100, seed=7) and sample != sample_rows(files, 100, seed=8)
    assert sum(len(s.rows) for s in sample_rows(files, "50%", seed=0)) == 2000
    small = sample_rows([ArchiveFile("x", 3), ArchiveFile("y", 3), ArchiveFile("z", 3)], 2, seed=0)
    assert sum(len(s.rows) for s in small) == 2  # largest remainders: exact total
