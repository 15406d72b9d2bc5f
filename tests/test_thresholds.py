"""Threshold parsing and checks, and the archive sample's stratification."""

from __future__ import annotations

import pytest

from pipeline.selection import ArchiveFile, sample_rows, sample_size
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


def test_sample_size():
    assert sample_size(200, 1000) == 200 and sample_size(5000, 1000) == 1000
    assert sample_size(0.01, 1000) == 10 and sample_size(0.0001, 1000) == 1
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError):
            sample_size(bad, 10)


def test_sample_is_stratified_seeded_and_skips_unreadable_files():
    files = [ArchiveFile("a", 1000), ArchiveFile("b", 3000), ArchiveFile("c", 0), ArchiveFile("d", 50, "broken")]
    sample = sample_rows(files, 100, seed=7)
    assert {s.path: len(s.rows) for s in sample} == {"a": 25, "b": 75}
    assert all(list(s.rows) == sorted(set(s.rows)) for s in sample)
    assert sample == sample_rows(files, 100, seed=7) and sample != sample_rows(files, 100, seed=8)
    assert sum(len(s.rows) for s in sample_rows(files, 0.5, seed=0)) == 2000
    small = sample_rows([ArchiveFile("x", 3), ArchiveFile("y", 3), ArchiveFile("z", 3)], 2, seed=0)
    assert sum(len(s.rows) for s in small) == 2  # largest remainders: exact total
