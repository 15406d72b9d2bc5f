"""Sizing restore actors from footers and model headers (pipeline/worker_memory.py)."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corrdiff import weights
from corrdiff.memory import coding_bytes
from corrdiff.tiling import Tiling
from pipeline.archive import largest_image
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.models import ModelSources, store_model
from pipeline.resources import model_worker_bytes
from pipeline.selection import ArchiveFile, archive_files
from pipeline.storage import StorageConfig
from pipeline.worker_memory import (DISTS_BYTES_PER_PIXEL, SCORING_BYTES_PER_PIXEL, audit_worker_bytes,
                                     restore_worker_bytes)



def _write(path, widths, heights, **options) -> pq.FileMetaData:
    table = pa.table({"width": pa.array(widths, pa.int32()), "height": pa.array(heights, pa.int32())})
    pq.write_table(table, path, row_group_size=2, **options)
    return pq.read_metadata(path)


def test_the_largest_image_is_bounded_by_the_footer_statistics(tmp_path):
    # Row groups of two rows: (640x480, error row), (100x900, 300x20): the largest width and height
    # come from different images, so the bound (640 x 900) is above any one image, never below.
    metadata = _write(tmp_path / "a.parquet", [640, None, 100, 300], [480, None, 900, 20])
    assert largest_image(metadata) == 640 * 900
    assert largest_image(_write(tmp_path / "errors.parquet", [None, None, None], [None, None, None])) == 0
    assert largest_image(_write(tmp_path / "bare.parquet", [640], [480], write_statistics=False)) is None


def test_a_restore_actor_holds_every_model_the_largest_image_and_its_batch(tmp_path, tiny_model):
    archive, storage = str(tmp_path / "archive"), StorageConfig()
    data = tiny_model.read_bytes()
    model = weights.model_from_bytes(data, str(tiny_model))
    tiny_id = weights.model_id(model).hex()
    store_model(archive, storage, tiny_id, data)
    sources = ModelSources(archive, storage)
    tiled = ArchiveFile("a", 10, largest_image=2_000_000, model_id=tiny_id, tile=256, tile_batch=1)
    assert restore_worker_bytes([tiled], sources, None, 4) == model_worker_bytes(
        len(data), coding_bytes(model.config, Tiling(256, 0), 2_000_000), 4, 2_000_000)

    # A file of format 1 records (no tile in its job's config) runs the networks on the whole image.
    whole = ArchiveFile("b", 10, largest_image=1_000_000, model_id=tiny_id)
    assert restore_worker_bytes([tiled, whole], sources, None, 4) == model_worker_bytes(
        len(data), max(coding_bytes(model.config, Tiling(256, 0), 2_000_000),
                       coding_bytes(model.config, None, 2_000_000)), 4, 2_000_000)

    # A model found nowhere counts as the default model, beside the tiny one (an actor keeps both);
    # a file without statistics as an image of the pixel limit; unreadable files not at all.
    default = weights.resolve(None)
    default_config = weights.load_model(default).config
    unknown = ArchiveFile("c", 10, model_id="0" * 32, tile=512, tile_batch=1)
    broken = ArchiveFile("d", 0, error="unreadable", largest_image=10**9)
    assert restore_worker_bytes([tiled, unknown, broken], sources, None, 2) == model_worker_bytes(
        len(data) + default.stat().st_size,
        max(coding_bytes(model.config, Tiling(256, 0), DEFAULT_MAX_PIXELS),
            coding_bytes(default_config, Tiling(512, 0), DEFAULT_MAX_PIXELS)), 2, DEFAULT_MAX_PIXELS)

    # A file coded in batches of tiles holds that many tiles' working sets at once.
    batched = ArchiveFile("f", 10, largest_image=2_000_000, model_id=tiny_id, tile=256, tile_batch=8)
    assert restore_worker_bytes([tiled, batched], sources, None, 4) == model_worker_bytes(
        len(data), coding_bytes(model.config, Tiling(256, 0, 8), 2_000_000), 4, 2_000_000)
    assert coding_bytes(model.config, Tiling(256, 0, 8), 2_000_000) > coding_bytes(model.config, Tiling(256, 0), 2_000_000)
    # A batch no writer writes (over 2048 x 2048 px a call) is sized as whole-image networks, the most there is.
    forged = ArchiveFile("g", 10, largest_image=2_000_000, model_id=tiny_id, tile=2048, tile_batch=64)
    assert restore_worker_bytes([forged], sources, None, 4) == model_worker_bytes(
        len(data), coding_bytes(model.config, None, 2_000_000), 4, 2_000_000)

    # A job that fixes the model sizes for it alone, whatever the files name.
    elsewhere = ArchiveFile("e", 10, largest_image=500, model_id="0" * 32, tile=512, tile_batch=1)
    assert restore_worker_bytes([tiled, elsewhere], sources, str(tiny_model), 4) == model_worker_bytes(
        len(data), coding_bytes(model.config, Tiling(512, 0), 2_000_000), 4, 2_000_000)


def test_footers_say_what_restoring_a_file_takes(tmp_path):
    """archive_files reads the largest image, model id, tile and tile batch from each footer
    (a job from before tile batches ran its tiles one at a time); values no writer writes are
    kept as they are and refused where they are used."""
    table = pa.table({"key": ["a"], "width": pa.array([64], pa.int32()), "height": pa.array([48], pa.int32())})
    for name, model_id, config in (("0", "ab" * 16, b'{"codec": {"tile": 384}}'),
                                   ("1", "../../x", b'{"codec": 3}'),
                                   ("2", "cd" * 16, b'{"codec": {"tile": 256, "tile_batch": 4}}'),
                                   ("3", "cd" * 16, b'{"codec": {"tile": 2048, "tile_batch": 64}}')):
        pq.write_table(table.replace_schema_metadata({"corrdiff.model_id": model_id, "corrdiff.config": config}),
                       tmp_path / f"part-{name}.parquet")
    old, forged, batched, too_many = archive_files(str(tmp_path), StorageConfig())
    assert (old.largest_image, old.model_id, old.tile, old.tile_batch) == (64 * 48, "ab" * 16, 384, 1)
    assert (forged.model_id, forged.tile, forged.tile_batch) == ("../../x", None, None)
    assert (batched.tile, batched.tile_batch) == (256, 4)
    assert (too_many.tile, too_many.tile_batch) == (2048, 64)


def test_an_audit_actor_also_holds_its_originals_and_the_scoring_of_its_largest_image(tmp_path, tiny_model):
    archive, storage = str(tmp_path / "archive"), StorageConfig()
    data = tiny_model.read_bytes()
    tiny_id = weights.model_id(weights.model_from_bytes(data, str(tiny_model))).hex()
    store_model(archive, storage, tiny_id, data)
    sources = ModelSources(archive, storage)
    files = [ArchiveFile("a", 10, largest_image=1_000_000, model_id=tiny_id, tile=256, tile_batch=1)]
    restore = restore_worker_bytes(files, sources, None, 4)
    assert audit_worker_bytes(files, sources, None, 4, dists=False) == restore + (4 * 3 + 300) * 1_000_000
    assert audit_worker_bytes(files, sources, None, 4, dists=True) == restore + (4 * 3 + 2_000) * 1_000_000


SCORING_PEAK = """
import numpy as np
import torch
from corrdiff.metrics import DISTS, LPIPS, ms_ssim, psnr

def peak() -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))

torch.set_num_threads(4)  # the most a CPU actor runs
rng = np.random.default_rng(0)
a, b = (rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8) for _ in range(2))
networks = {"lpips": LPIPS("alex", device="cpu"), "dists": DISTS(device="cpu")}
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on: scoring, not loading
start = peak()
psnr(a, b), ms_ssim(a, b), networks["lpips"](a, b)
scored = peak()
networks["dists"](a, b)
print(scored - start, peak() - start)
"""


@pytest.mark.slow  # loads VGG16 and AlexNet in a process of its own
def test_scoring_memory_stays_within_what_an_audit_actor_is_sized_for():
    """ScoreRecords' metrics on a 0.79 Mpx image, measured as the kernel counts it (the peak
    resident memory beyond the loaded networks): within the per-pixel bounds the audit pool
    is sized by. A metric that came to hold more would make audits of large photos die."""
    completed = subprocess.run([sys.executable, "-c", SCORING_PEAK], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    scored, with_dists = (int(v) for v in completed.stdout.split())
    pixels = 768 * 1024
    assert scored <= SCORING_BYTES_PER_PIXEL * pixels, scored / pixels
    assert with_dists <= DISTS_BYTES_PER_PIXEL * pixels, with_dists / pixels
