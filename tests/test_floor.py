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
    """An EncodeStage as an actor runs it, in this process (no Ray): the model from an
    archive's _models/."""
    from corrdiff import weights
    from pipeline.models import ModelSources, store_model
    from pipeline.stages import EncodeStage
    from pipeline.storage import StorageConfig

    archive = str(tmp_path_factory.mktemp("archive"))
    data = tiny_model.read_bytes()
    model_id = weights.model_id(weights.model_from_bytes(data, str(tiny_model))).hex()
    store_model(archive, StorageConfig(), model_id, data)
    return EncodeStage(ModelSources(archive, StorageConfig()), model_id, "cpu", 0, None, 0, 0.1, "lpips-alex", 1,
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
