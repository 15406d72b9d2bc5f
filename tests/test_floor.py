"""The quality guarantee of every archived image: each record is checked against what its
encoder coded before it is committed, and an image that CorrDiff stores below the floor
goes to a standard codec at the smallest size that meets it (corrdiff/floor.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from corrdiff import RecordError
from corrdiff.record import Record

from conftest import smooth_image


def tampered(record: bytes) -> bytes:
    """The record with one byte of its hyper-latent string changed and its checksum made
    valid again: what no parser can tell from a real record, only a decode can."""
    parsed = Record.from_bytes(record)
    z = bytearray(parsed.z_string)
    z[len(z) // 2] ^= 0x5A
    return dataclasses.replace(parsed, z_string=bytes(z)).to_bytes()  # with a valid checksum


def test_a_record_verifies_against_what_its_encoder_coded(codec, encoded):
    for image in encoded:
        codec.verify(image, image.record)


def test_a_tampered_record_with_a_valid_checksum_fails_verification(codec, encoded):
    image = encoded[2]
    with pytest.raises(RecordError, match="latent decodes differently"):
        codec.verify(image, tampered(image.record))
    other = encoded[3]
    with pytest.raises(RecordError, match="describes a"):
        codec.verify(image, other.record)
    with pytest.raises(RecordError, match="checksum"):
        codec.verify(image, image.record[:-1] + bytes([image.record[-1] ^ 1]))


@pytest.fixture(scope="module")
def encode_stage(tiny_model, tmp_path_factory):
    """An EncodeImages stage as an actor runs it, in this process (no Ray): the model from an
    archive's _models/."""
    from corrdiff import weights
    from pipeline.models import ModelSources, store_model
    from pipeline.compress_stages import EncodeImages
    from pipeline.storage import StorageConfig

    archive = str(tmp_path_factory.mktemp("archive"))
    data = tiny_model.read_bytes()
    model_id = weights.model_id(weights.model_from_bytes(data, str(tiny_model))).hex()
    store_model(archive, StorageConfig(), model_id, data)
    return EncodeImages(ModelSources(archive, StorageConfig()), model_id, "cpu", 0, None, 0, 0.1, "lpips-alex", 1,
                       "job-test")


def _batch(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    pixels = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
        pixels[i] = image
    n = len(images)
    return {"key": np.array([f"k{i}" for i in range(n)], dtype=object),
            "source_uri": np.array([f"u{i}" for i in range(n)], dtype=object),
            "source_bytes": np.full(n, 10), "source_sha256": np.array(["0" * 64] * n, dtype=object),
            "error": np.array([None] * n, dtype=object), "pixels": pixels}


def test_a_record_damaged_before_commit_becomes_a_retryable_error_row(encode_stage, monkeypatch):
    images = [smooth_image(70, 90, seed=5), smooth_image(64, 64, seed=6)]
    encode = encode_stage.codec.encode_detailed

    def faulty(batch, **kwargs):  # the fault: the first image's record is changed on its way out
        [image] = encode(batch, **kwargs)
        return [dataclasses.replace(image, record=tampered(image.record))] if batch[0].shape == images[0].shape else [image]

    monkeypatch.setattr(encode_stage.codec, "encode_detailed", faulty)
    rows = encode_stage(_batch(images)).to_pylist()
    assert rows[0]["record"] is None
    assert rows[0]["error"].startswith("record verification failed (retryable): RecordError: record's latent")
    assert rows[1]["error"] is None and rows[1]["record"] is not None


# The floor and the standard codecs, without Ray ---------------------------------------


def photo(name: str = "life.jpg", size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """A real photo, small: the floor's codecs are measured on what archives hold."""
    from pathlib import Path

    from PIL import Image

    from pipeline.images import decode_image

    data = (Path(__file__).resolve().parents[1] / "examples" / "photos" / name).read_bytes()
    return np.asarray(Image.fromarray(decode_image(data, 10**8)).resize(size, Image.LANCZOS))


@pytest.mark.parametrize("codec", ["avif", "jxl"])
def test_the_fallback_is_the_smallest_setting_that_meets_the_floor(codec):
    from corrdiff.floor import Floor, FloorMeter, decode_standard, encode_standard, smallest_meeting
    from corrdiff.metrics import psnr

    image, floor = photo(), Floor(psnr=33.0)
    stored = smallest_meeting(image, codec, FloorMeter(image, None), floor)
    assert stored.codec == codec and stored.setting is not None
    restored = decode_standard(codec, stored.data)
    assert np.array_equal(restored, stored.pixels) and psnr(image, restored) == stored.quality.psnr >= 33.0
    below = decode_standard(codec, encode_standard(image, codec, stored.setting - 1))
    assert psnr(image, below) < 33.0  # one setting less misses it: the bisection found the edge


def test_a_floor_no_lossy_setting_meets_is_met_losslessly():
    from corrdiff.floor import Floor, FloorMeter, decode_standard, smallest_meeting

    image = photo()
    stored = smallest_meeting(image, "avif", FloorMeter(image, None), Floor(psnr=90.0))
    assert stored.codec == "png" and stored.setting is None
    assert np.array_equal(decode_standard("png", stored.data), image)


def test_an_lpips_floor_on_an_image_too_small_to_measure_is_met_losslessly():
    from corrdiff.floor import Floor, FloorMeter, Quality

    assert not Floor(lpips=0.5).met_by(Quality(psnr=40.0, lpips=None))
    assert Floor(psnr=30.0).met_by(Quality(psnr=40.0, lpips=None))
    assert FloorMeter(photo(size=(20, 20)), None)(photo(size=(20, 20))).lpips is None


def test_standard_records_are_untrusted_bytes(monkeypatch):
    from corrdiff.floor import StandardRecordError, decode_standard, encode_standard

    image = photo()
    png, jxl = encode_standard(image, "png"), encode_standard(image, "jxl", 80)
    with pytest.raises(StandardRecordError, match="does not decode"):
        decode_standard("avif", png)  # only the codec's own format is opened
    with pytest.raises(StandardRecordError, match="declares a 96x64 image"):
        decode_standard("png", png, max_pixels=1000)
    import pipeline.restore

    monkeypatch.setattr(pipeline.restore, "MAX_PADDED_PIXELS", 1000)
    with pytest.raises(StandardRecordError, match="declares a 96x64 image"):  # from its header, before the plugin decodes it
        pipeline.restore.decode_standard_record("jxl", jxl)
    with pytest.raises(StandardRecordError, match="jxl record: "):
        pipeline.restore.decode_standard_record("jxl", png)
    with pytest.raises(StandardRecordError, match="does not decode"):
        decode_standard("png", png[: len(png) // 2])


@pytest.mark.parametrize("settings, message", [
    ({}, "needs a psnr or an lpips"), ({"psnr": -1}, "positive"), ({"psnr": 30, "fallback": "webp"}, "fallback"),
    ({"psnr": 30, "choose": "best"}, "choose"),
])
def test_bad_floor_settings_are_refused(settings, message):
    from corrdiff.typed_config import ConfigError, parse_config
    from pipeline.compress import CompressConfig

    with pytest.raises(ConfigError, match=message):
        parse_config(CompressConfig, {"input": {"url": "in"}, "output": "out", "floor": settings}, "compress.yaml")


def _stage(stage, floor) -> object:
    """The module's EncodeImages stage (its model loaded once) with another floor."""
    import copy

    other = copy.copy(stage)
    other.floor = floor
    other.lpips = None
    if floor is not None and floor.lpips is not None:
        from corrdiff.metrics import LPIPS

        other.lpips = LPIPS("alex")
    return other


def test_a_floor_the_model_cannot_meet_sends_every_image_to_the_fallback(encode_stage):
    from corrdiff.library import ModelLibrary
    from corrdiff.metrics import LPIPS, psnr
    from pipeline.compress import FloorSettings
    from pipeline.restore import restore_records

    images = [photo("life.jpg"), photo("sunset.jpg", (64, 80))]
    floor = FloorSettings(psnr=30.0, lpips=0.3, fallback="jxl")
    rows = _stage(encode_stage, floor)(_batch(images)).to_pylist()
    assert [r["codec"] for r in rows] == ["jxl", "jxl"]
    assert all(r["model_id"] is None and r["gammas"] is None and r["format_version"] is None for r in rows)
    library: ModelLibrary = encode_stage.models.library("cpu")
    restored = restore_records(library, [r["record"] for r in rows], [r["codec"] for r in rows])
    lpips = LPIPS("alex")
    for image, row, pixels in zip(images, rows, restored):
        assert psnr(image, pixels) == row["psnr"] >= 30.0
        assert lpips(image, pixels) == pytest.approx(row["lpips"], abs=1e-6) and row["lpips"] <= 0.3
        assert row["bpp"] == 8 * len(row["record"]) / (image.shape[0] * image.shape[1])


def test_a_floor_the_model_meets_keeps_corrdiff_and_smaller_never_exceeds_the_fallback(encode_stage):
    from corrdiff.floor import Floor, FloorMeter, smallest_meeting
    from pipeline.compress import FloorSettings

    images = [photo("life.jpg")]
    kept = _stage(encode_stage, FloorSettings(psnr=1.0))(_batch(images)).to_pylist()
    assert kept[0]["codec"] == "corrdiff" and kept[0]["model_id"] is not None and kept[0]["lpips"] is None
    unfloored = _stage(encode_stage, None)(_batch(images)).to_pylist()
    assert unfloored[0]["record"] == kept[0]["record"] and unfloored[0]["codec"] == "corrdiff"
    smaller = _stage(encode_stage, FloorSettings(psnr=1.0, fallback="avif", choose="smaller"))(_batch(images))
    [row] = smaller.to_pylist()
    fallback = smallest_meeting(images[0], "avif", FloorMeter(images[0], None), Floor(psnr=1.0))
    assert row["record_bytes"] == min(len(fallback.data), kept[0]["record_bytes"])
    assert row["codec"] == ("corrdiff" if kept[0]["record_bytes"] <= len(fallback.data) else "avif")


def test_files_of_schema_version_1_read_as_all_corrdiff(tmp_path):
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.archive import read_data_file, read_data_file_rows

    old = pa.table({"key": ["a", "b"], "record": [b"CDAR", None], "error": [None, "encode failed: x"]})
    pq.write_table(old.replace_schema_metadata({"corrdiff.archive_schema": "1"}), tmp_path / "part-old.parquet")
    fs = fsspec.filesystem("file")
    table = read_data_file(str(tmp_path / "part-old.parquet"), fs, ["key", "codec", "lpips", "codec_setting"])
    assert table.column_names == ["key", "codec", "lpips", "codec_setting"]
    assert table["codec"].to_pylist() == ["corrdiff", None] and table["lpips"].to_pylist() == [None, None]
    assert table.schema.metadata[b"corrdiff.archive_schema"] == b"1"
    assert read_data_file(str(tmp_path / "part-old.parquet"), fs, None).column_names == ["key", "record", "error"]
    rows, positions = read_data_file_rows(str(tmp_path / "part-old.parquet"), fs, ["key", "codec"], rows=[0])
    assert rows.to_pylist() == [{"key": "a", "codec": "corrdiff"}] and positions.to_pylist() == [0]


# One mixed archive, on a real Ray cluster: compressed once, then audited and verified ---

MIXED_FLOOR = 8.0  # dB: the tiny model's records of these photos land on both sides of it


@pytest.fixture(scope="module")
def mixed(ray_local, tiny_model, tmp_path_factory):
    """Four small real photos under a PSNR floor that CorrDiff (the tiny model) meets for some
    and misses for others (those go to AVIF), and one input that is not an image."""
    from PIL import Image

    from pipeline.compress import CodecSettings, CompressConfig, FloorSettings, run_compress
    from pipeline.resources import ResourceSettings
    from pipeline.sources import SourceConfig

    root = tmp_path_factory.mktemp("mixed")
    (root / "in").mkdir()
    images = {"life.png": photo("life.jpg"), "sunset.png": photo("sunset.jpg", (80, 64)),
              "seeding.png": photo("seeding.jpg", (64, 64)), "aitzgorri.png": photo("aitzgorri.jpg")}
    for name, image in images.items():
        Image.fromarray(image).save(root / "in" / name)
    (root / "in" / "not-an-image.png").write_bytes(b"plain text " * 20)
    config = CompressConfig(input=SourceConfig(url=str(root / "in")), output=str(root / "archive"),
                            codec=CodecSettings(model=str(tiny_model), device="cpu"),
                            resources=ResourceSettings(rows_per_file=8), max_pixels=300_000,
                            floor=FloorSettings(psnr=MIXED_FLOOR, fallback="avif"))
    summary = run_compress(config)
    return root, images, config, summary


def test_a_mixed_archive_says_which_codec_holds_each_image_and_restores_all(mixed, tiny_model):
    import pyarrow.dataset as pads

    from corrdiff import CorrDiffCodec
    from corrdiff.metrics import psnr
    from pipeline.archive import SCHEMA, file_metadata, list_data_files
    from pipeline.models import archive_models
    from pipeline.restore import restore_records
    from pipeline.storage import StorageConfig

    root, images, _, summary = mixed
    rows = {r["key"]: r for r in pads.dataset(str(root / "archive"), format="parquet").to_table().to_pylist()}
    codec = CorrDiffCodec.from_pretrained(tiny_model, device="cpu")
    for name, image in images.items():
        [encoded] = codec.encode_detailed([image])
        expected = "corrdiff" if psnr(image, encoded.reconstruction) >= MIXED_FLOOR else "avif"
        assert rows[name]["codec"] == expected, name
    codecs = [rows[name]["codec"] for name in images]
    assert set(codecs) == {"corrdiff", "avif"}  # the floor splits them: a mixed archive
    assert rows["not-an-image.png"]["codec"] is None and rows["not-an-image.png"]["error"]
    assert summary["codecs"] == {"avif": codecs.count("avif"), "corrdiff": codecs.count("corrdiff")}
    assert summary["fallback_share"] == codecs.count("avif") / 4

    # The Python API restores every codec; each restored image meets the floor.
    restored = restore_records(archive_models(str(root / "archive")), [rows[n]["record"] for n in images],
                              [rows[n]["codec"] for n in images])
    for (name, image), pixels in zip(images.items(), restored):
        assert psnr(image, pixels) == rows[name]["psnr"] >= MIXED_FLOOR
    metadata = file_metadata(list_data_files(str(root / "archive"), StorageConfig())[0], StorageConfig())
    assert metadata["corrdiff.archive_schema"] == "2" and len(metadata["corrdiff.fingerprint"]) == 16
    assert pads.dataset(str(root / "archive"), format="parquet").schema.remove_metadata() == SCHEMA.remove_metadata()


def test_a_mixed_archive_audits_and_verifies_by_codec(mixed, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.audit import AuditConfig, run_audit, run_verify

    root, images, _, _ = mixed
    config = AuditConfig(archive=str(root / "archive"), report=str(tmp_path / "report"), sample=5, device="cpu",
                         worst=0, thresholds={"fallback_share": {"max": 0.25}, "integrity_failures": {"max": 0}})
    summary = run_audit(config)
    share = summary["measures"]["fallback_share"]
    assert 0 < share < 1 and summary["verdict"] == ("FAIL" if share > 0.25 else "PASS")
    assert set(summary["by_codec"]) == {"corrdiff", "avif"}
    assert sum(c["records"] for c in summary["by_codec"].values()) == len(images)
    metrics = pq.read_table(tmp_path / "report" / summary["audit_id"] / "metrics.parquet").to_pylist()
    for row in metrics:
        if row["record_status"] == "ok":  # restored exactly as measured at compression, at or above the floor
            assert row["psnr"] == row["archived_psnr"] >= MIXED_FLOOR
    page = (tmp_path / "report" / summary["audit_id"] / "report.html").read_text()
    assert "By codec" in page and "fallback share" in page

    verify = run_verify(AuditConfig(archive=str(root / "archive"), report=str(tmp_path / "verify"), device="cpu"))
    assert verify["verdict"] == "PASS" and verify["record_statuses"] == {"compress_error": 1, "ok": len(images)}
    assert sum(c["records"] for c in verify["by_codec"].values()) == len(images)
    assert verify["measures"]["fallback_share"] == share


def test_a_rerun_with_another_floor_is_refused_unless_allowed(mixed):
    from dataclasses import replace

    from pipeline.compress import (ConfigChangeError, FloorSettings, check_config_change, content_fingerprint,
                                   run_compress)
    from pipeline.storage import StorageConfig

    root, _, config, _ = mixed
    changed = replace(config, floor=FloorSettings(psnr=MIXED_FLOOR + 1, fallback="avif"))
    before = sorted(p.name for p in (root / "archive").iterdir())
    with pytest.raises(ConfigChangeError, match=r"floor: .*--allow-config-change"):
        run_compress(changed)
    assert sorted(p.name for p in (root / "archive").iterdir()) == before  # refused before any work
    archive, storage = str(root / "archive"), StorageConfig()
    model_id = next(iter(mixed[3]["models"]))
    fingerprint = content_fingerprint(changed.to_dict(), model_id)
    check_config_change(archive, storage, fingerprint, allowed=True)  # told to continue: no refusal
    check_config_change(archive, storage, content_fingerprint(config.to_dict(), model_id), allowed=False)
    with pytest.raises(ConfigChangeError, match="model_id"):
        check_config_change(archive, storage, content_fingerprint(config.to_dict(), "0" * 32), allowed=False)
    retiled = replace(config, codec=replace(config.codec, tile=1024))  # other tiles, other record bytes
    with pytest.raises(ConfigChangeError, match="tile: 512 -> 1024"):
        check_config_change(archive, storage, content_fingerprint(retiled.to_dict(), model_id), allowed=False)
