"""The compress pipeline end to end on a real local Ray cluster, with real photos."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corrdiff import CorrDiffCodec, tiny_config
from corrdiff.metrics import psnr
from pipeline.archive import SCHEMA, file_metadata, list_data_files
from pipeline.compress import CodecSettings, CompressConfig, ResourceSettings, plan_resources, run_compress
from pipeline.images import decode_image
from pipeline.sources import SourceConfig
from pipeline.storage import StorageConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "photos"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    CorrDiffCodec.from_config(tiny_config(), seed=0, device="cpu").save_pretrained(path)
    return path


def _photo_folder(root: Path, broken: bool = True) -> dict[str, str | None]:
    """Real photos plus, optionally, bad inputs; returns key -> expected error prefix (None = ok)."""
    expected: dict[str, str | None] = {}
    for photo in sorted(EXAMPLES.glob("*.jpg")):
        (root / "photos").mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, root / "photos" / photo.name)
        expected[f"photos/{photo.name}"] = None
    if broken:
        (root / "bad").mkdir(parents=True, exist_ok=True)
        data = (EXAMPLES / "life.jpg").read_bytes()
        (root / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 3])
        (root / "bad" / "not-an-image.jpg").write_bytes(b"just some text, certainly not an image " * 10)
        (root / "bad" / "empty.png").write_bytes(b"")
        Image.new("RGB", (700, 500), (10, 20, 30)).save(root / "bad" / "too-large.png")
        (root / "notes.txt").write_text("not an image extension: not an input")
        expected |= {
            "bad/truncated.jpg": "corrupt or truncated image",
            "bad/not-an-image.jpg": "not a recognised image format",
            "bad/empty.png": "empty file",
            "bad/too-large.png": "image too large",
        }
    return expected


def _config(source: str, output: str, model: Path, **kwargs) -> CompressConfig:
    return CompressConfig(
        input=SourceConfig(url=source, **kwargs.pop("input", {})), output=output,
        codec=CodecSettings(model=str(model), device="cpu"),
        resources=ResourceSettings(rows_per_file=kwargs.pop("rows_per_file", 4)),
        max_pixels=300_000, **kwargs,
    )


def _archive(url: str) -> "pa.Table":  # noqa: F821
    return pads.dataset(url, format="parquet").to_table()


def test_folder_to_archive_loses_nothing(ray_local, tiny_model, tmp_path):
    expected = _photo_folder(tmp_path / "in")
    summary = run_compress(_config(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model))

    table = _archive(str(tmp_path / "archive"))
    assert table.schema.remove_metadata() == SCHEMA.remove_metadata()
    rows = {r["key"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == len(expected)  # every key exactly once
    for key, error in expected.items():
        if error is None:
            assert rows[key]["error"] is None and rows[key]["record"] is not None
        else:
            assert rows[key]["error"].startswith(error) and rows[key]["record"] is None
    assert summary["rows"] == summary["unique_keys"] == len(expected)
    assert summary["ok"] == 6 and summary["errors"] == 4
    assert json.loads((tmp_path / "archive" / "_summary.json").read_text()) == summary


def test_archive_rows_are_honest(ray_local, tiny_model, tmp_path):
    """bpp, sizes, hashes and the encode-time PSNR all check out against the originals."""
    _photo_folder(tmp_path / "in", broken=False)
    run_compress(_config(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model))
    codec = CorrDiffCodec.from_pretrained(tiny_model, device="cpu")
    import hashlib

    for row in _archive(str(tmp_path / "archive")).to_pylist()[:3]:
        original = Path(row["source_uri"]).read_bytes()
        assert row["source_bytes"] == len(original)
        assert row["source_sha256"] == hashlib.sha256(original).hexdigest()
        assert row["record_bytes"] == len(row["record"])
        assert row["bpp"] == 8 * len(row["record"]) / (row["width"] * row["height"])
        assert row["model_id"] == codec.model_id_hex and row["steps"] == len(row["gammas"])
        restored = codec.decode([row["record"]])[0]
        assert psnr(decode_image(original), restored) == row["psnr"]  # the decoder's exact pixels


def test_file_metadata_names_model_and_config(ray_local, tiny_model, tmp_path):
    _photo_folder(tmp_path / "in", broken=False)
    run_compress(_config(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model, job_id="job-7"))
    [first, *_] = list_data_files(str(tmp_path / "archive"), StorageConfig())
    metadata = file_metadata(first, StorageConfig())
    assert metadata["corrdiff.archive_schema"] == "1" and metadata["corrdiff.job_id"] == "job-7"
    assert metadata["corrdiff.model_id"] == CorrDiffCodec.from_pretrained(tiny_model, device="cpu").model_id_hex
    assert json.loads(metadata["corrdiff.config"])["input"]["url"] == str(tmp_path / "in")


def test_rerun_after_a_crash_writes_only_the_missing_keys(ray_local, tiny_model, tmp_path):
    expected = _photo_folder(tmp_path / "in")
    archive = tmp_path / "archive"
    # A first run saw part of the input, then died while writing a file.
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "in", partial)
    for key in list(expected)[3:]:
        (partial / key).unlink()
    run_compress(_config(str(partial), str(archive), tiny_model, job_id="first"))
    (archive / ".tmp-part-first-00009-deadbeef.parquet").write_bytes(b"PAR1 half a file")

    summary = run_compress(_config(str(tmp_path / "in"), str(archive), tiny_model, job_id="second"))

    table = _archive(str(archive))
    jobs = dict(zip(table.column("key").to_pylist(), table.column("job_id").to_pylist()))
    assert sorted(jobs) == sorted(expected) and table.num_rows == len(expected)
    assert [jobs[k] for k in list(expected)[:3]] == ["first"] * 3
    assert all(jobs[k] == "second" for k in list(expected)[3:])
    assert not list(archive.glob(".tmp-*"))
    assert summary["processed_this_job"] == len(expected) - 3


def test_plan_never_starves_the_readers():
    plan = plan_resources(ResourceSettings(), {"CPU": 2.0})
    assert plan.actors == 1 and plan.encode.num_cpus <= 1.0 and plan.torch_threads == 2
    big = plan_resources(ResourceSettings(), {"CPU": 16.0})
    assert big.actors * big.encode.num_cpus <= 15.0 and big.actors == 3
    gpu = plan_resources(ResourceSettings(), {"CPU": 16.0, "GPU": 2.0})
    assert gpu.actors == 4 and gpu.encode.num_gpus == 0.5
