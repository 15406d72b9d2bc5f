"""Tiled coding's memory is set by the tile: encoding 1, 4 and 16 Mpx photos, the peak RSS
grows by no more than the sampler's whole-image state (benchmarks/memory.py, tiny model).

Whole-image networks grow by the networks' activations per pixel instead: about 550 bytes
per pixel for the default model (docs/benchmarks.md), an order of magnitude more."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# x_t, x_e and x0 (float32: 36 B/px), the uint8 image in and out (6 B/px), and the
# allocator's slack on a busy machine.
GROWTH_LIMIT_MB_PER_MPX = 56


def test_peak_memory_is_flat_beyond_the_tile(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--tiny", "--sizes", "1", "4", "16",
         "--ops", "encode", "--whole-at", "--threads", "1", "--json", str(tmp_path / "memory.json")],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {round(r["mpx"]): r for r in json.loads((tmp_path / "memory.json").read_text())["rows"]}
    growth = (rows[16]["peak_rss_mb"] - rows[1]["peak_rss_mb"]) / (rows[16]["mpx"] - rows[1]["mpx"])
    assert growth <= GROWTH_LIMIT_MB_PER_MPX, rows
    assert all(r["bpp"] > 0 for r in rows.values())
