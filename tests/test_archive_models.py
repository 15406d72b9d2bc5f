"""An archive carries the model that wrote it: it restores, audits and verifies from its own
``_models/`` after the weights file it was written with is gone, locally and on S3; a
tampered copy there is refused and reported, never used.

The model is a tiny random one saved to a temporary file: not bundled with the package, so
nothing but the archive itself (or a model store the test names) can supply it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corrdiff import CorrDiffCodec, tiny_config
from corrdiff.metrics import lpips_backbone_path
from corrdiff.weights import WEIGHTS_SUFFIX, bundled_model
from pipeline.archive import read_columns
from pipeline.cli import main as cli
from pipeline.compress import CodecSettings, CompressConfig, run_compress
from pipeline.models import MODELS_DIR, PRESENT, REPLACED, WRITTEN, archive_models, store_model
from pipeline.resources import ResourceSettings
from pipeline.restore_archive import RestoreConfig, run_restore
from pipeline.sources import SourceConfig
from pipeline.storage import StorageConfig

from archives import EXAMPLES

pytestmark = pytest.mark.skipif(not lpips_backbone_path("alex").exists(),
                                reason="LPIPS weights not installed (scripts/setup.sh)")
PHOTOS = sorted(EXAMPLES.glob("*.jpg"))[:2]
AUDIT_CONFIG = "device: cpu\nworst: 1\ncrop: 64\nthresholds: {psnr.p5: {min: 0}, integrity_failures: {max: 0}}\n"


def _private_model(path: Path) -> CorrDiffCodec:
    """A model only this file has: saved to ``path``, which the test deletes after compressing."""
    codec = CorrDiffCodec.from_config(tiny_config(), seed=23, device="cpu")
    codec.save_pretrained(path)
    assert bundled_model(codec.model_id_hex) is None
    return codec


def _compress(source: str, archive: str, model: Path, storage: StorageConfig) -> dict:
    return run_compress(CompressConfig(input=SourceConfig(url=source), output=archive, storage=storage,
                                       codec=CodecSettings(model=str(model), device="cpu"),
                                       resources=ResourceSettings(rows_per_file=4)))


def _audit(archive: str, report: Path, config: str, *args: str) -> tuple[int, dict]:
    config_file = report.parent / f"{report.name}.yaml"
    config_file.write_text(config)
    code = cli(["audit", "--archive", archive, "--report", str(report), "--config", str(config_file), *args])
    return code, json.loads((report / "latest.json").read_text())


def _tamper(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[-5] ^= 0x01  # one bit inside the last tensor
    return bytes(damaged)


def test_a_local_archive_restores_audits_and_verifies_from_its_own_models(ray_local, tmp_path):
    model_path = tmp_path / "private.safetensors"
    codec = _private_model(model_path)
    weights_file = model_path.read_bytes()
    for photo in PHOTOS:
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / photo.name).write_bytes(photo.read_bytes())
    archive = tmp_path / "archive"
    stored = archive / MODELS_DIR / f"{codec.model_id_hex}{WEIGHTS_SUFFIX}"

    summary = _compress(str(tmp_path / "in"), str(archive), model_path, StorageConfig())
    assert stored.read_bytes() == weights_file  # the file as written, under its id
    assert summary["models"] == {codec.model_id_hex: {"records": 2, "file": str(stored)}}
    assert not list((archive / MODELS_DIR).glob(".tmp-*"))
    model_path.unlink()  # from now on only the archive has the model

    decoded = run_restore(RestoreConfig(archive=str(archive), output=str(tmp_path / "out"), device="cpu", run_id="r"))
    assert decoded["statuses"] == {"ok": 2}
    table = pq.read_table(archive).to_pylist()
    for row in table:  # the archive's copy is the model that wrote the records: the same pixels
        restored = np.asarray(Image.open(tmp_path / "out" / f"{row['key']}.png"))
        assert np.array_equal(restored, codec.decode([row["record"]])[0])
    assert archive_models(str(archive), device="cpu").decode([table[0]["record"]])[0].shape[2] == 3  # Python API

    code, audited = _audit(str(archive), tmp_path / "audit", AUDIT_CONFIG, "--sample", "2")
    assert code == 0 and audited["measures"]["scored"] == 2
    assert audited["models"] == {codec.model_id_hex: str(archive / MODELS_DIR)}
    code, verified = _audit(str(archive), tmp_path / "verify", AUDIT_CONFIG, "--verify-all")
    assert code == 0 and verified["record_statuses"] == {"ok": 2}
    assert verified["stored_models"] == {str(stored): "ok"} and verified["measures"]["damaged_model_files"] == 0

    # A tampered copy is refused: the records cannot be restored, and verify says why.
    stored.write_bytes(_tamper(weights_file))
    refused = run_restore(RestoreConfig(archive=str(archive), output=str(tmp_path / "out2"), device="cpu", run_id="r"))
    assert refused["statuses"] == {"model_missing": 2}
    manifest = pq.read_table(tmp_path / "out2" / "_restore" / "r.parquet").to_pylist()
    error = manifest[0]["error"]
    assert codec.model_id_hex in error and str(archive / MODELS_DIR) in error and "the corrdiff package" in error
    assert "refused" in error and "corrupt" in error
    code, verified = _audit(str(archive), tmp_path / "verify2", AUDIT_CONFIG, "--verify-all")
    assert code == 1 and verified["measures"]["damaged_model_files"] == 1
    assert verified["record_statuses"] == {"model_missing": 2} and "corrupt" in verified["stored_models"][str(stored)]

    # A model store the operator names supplies the genuine weights; the damaged copy stays unused.
    store = tmp_path / "store"
    store.mkdir()
    (store / f"{codec.model_id_hex}{WEIGHTS_SUFFIX}").write_bytes(weights_file)
    from_store = run_restore(RestoreConfig(archive=str(archive), output=str(tmp_path / "out3"), device="cpu",
                                         model_stores=(str(store),)))
    assert from_store["statuses"] == {"ok": 2}

    # The next compress run repairs the archive's copy; the one after finds it intact.
    assert store_model(str(archive), StorageConfig(), codec.model_id_hex, weights_file) == REPLACED
    assert store_model(str(archive), StorageConfig(), codec.model_id_hex, weights_file) == PRESENT
    assert stored.read_bytes() == weights_file


def test_an_s3_archive_restores_audits_and_verifies_from_its_own_models(s3_server, ray_local, tmp_path):
    model_path = tmp_path / "private.safetensors"
    codec = _private_model(model_path)
    weights_file = model_path.read_bytes()
    bucket = s3_server.make_bucket({f"in/{p.name}": p.read_bytes() for p in PHOTOS})
    archive = f"{bucket}/archive"
    stored_key = f"archive/{MODELS_DIR}/{codec.model_id_hex}{WEIGHTS_SUFFIX}"
    bucket_name = bucket.removeprefix("s3://")

    summary = _compress(f"{bucket}/in", archive, model_path, s3_server.storage)
    assert s3_server.client.get_object(Bucket=bucket_name, Key=stored_key)["Body"].read() == weights_file
    assert summary["models"][codec.model_id_hex]["file"] == f"{bucket}/{stored_key}"
    assert store_model(archive, s3_server.storage, codec.model_id_hex, weights_file) == PRESENT
    model_path.unlink()

    decoded = run_restore(RestoreConfig(archive=archive, output=f"{bucket}/restored", device="cpu",
                                      storage=s3_server.storage, run_id="r"))
    assert decoded["statuses"] == {"ok": 2}
    png = s3_server.client.get_object(Bucket=bucket_name, Key=f"restored/{PHOTOS[0].name}.png")["Body"].read()
    records = dict(zip(*read_columns(archive, s3_server.storage, ["key", "record"]).to_pydict().values()))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), codec.decode([records[PHOTOS[0].name]])[0])

    endpoint = f"storage: {{endpoint_url: '{s3_server.endpoint_url}'}}\n"
    code, audited = _audit(archive, tmp_path / "audit", AUDIT_CONFIG + endpoint, "--sample", "2")
    assert code == 0 and audited["measures"]["scored"] == 2
    assert audited["models"] == {codec.model_id_hex: f"{archive}/{MODELS_DIR}"}
    code, verified = _audit(archive, tmp_path / "verify", AUDIT_CONFIG + endpoint, "--verify-all")
    assert code == 0 and verified["measures"]["damaged_model_files"] == 0

    s3_server.client.put_object(Bucket=bucket_name, Key=stored_key, Body=_tamper(weights_file))
    code, verified = _audit(archive, tmp_path / "verify2", AUDIT_CONFIG + endpoint, "--verify-all")
    assert code == 1 and verified["record_statuses"] == {"model_missing": 2}
    assert verified["measures"]["damaged_model_files"] == 1


def test_a_store_without_the_model_and_a_malformed_id_are_clean_misses(tmp_path):
    codec = CorrDiffCodec.from_config(tiny_config(), seed=29, device="cpu")
    library = archive_models(str(tmp_path / "no-archive"), stores=[str(tmp_path / "empty-store")], device="cpu")
    with pytest.raises(LookupError, match=f"model {codec.model_id_hex} was found nowhere; searched: "):
        library.find(codec.model_id_hex)
    with pytest.raises(LookupError, match="is not a model id"):
        library.find("../../etc/passwd")


def test_store_model_writes_once(tmp_path):
    codec = CorrDiffCodec.from_config(tiny_config(), seed=31, device="cpu")
    path = tmp_path / "m.safetensors"
    codec.save_pretrained(path)
    data = path.read_bytes()
    assert store_model(str(tmp_path / "archive"), StorageConfig(), codec.model_id_hex, data) == WRITTEN
    assert store_model(str(tmp_path / "archive"), StorageConfig(), codec.model_id_hex, data) == PRESENT
    assert [p.name for p in (tmp_path / "archive" / MODELS_DIR).iterdir()] == [f"{codec.model_id_hex}{WEIGHTS_SUFFIX}"]
