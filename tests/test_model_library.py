"""Weights files as untrusted input, and finding a record's model by id across sources.

A record decodes only with the exact weights that wrote it; an archive keeps them beside
its records, where anyone with write access could replace them. So a weights file must be
refused, loudly and before it is used, when it is not the model it is asked to be, and
bounded before anything is allocated for it.
"""

from __future__ import annotations

import json
import logging
import struct
import time

import numpy as np
import pytest

from corrdiff import BundledModels, CorrDiffCodec, ModelLibrary, ModelNotFoundError, WeightsError, tiny_config
from corrdiff import weights

from conftest import smooth_image


class MemorySource:
    """A WeightsSource holding files in a dict (model id -> bytes)."""

    def __init__(self, name: str, files: dict[str, bytes]) -> None:
        self.location, self.files, self.reads = name, files, 0

    def read(self, model_id: str) -> bytes | None:
        self.reads += 1
        return self.files.get(model_id)


def _file(codec: CorrDiffCodec) -> bytes:
    return weights.weights_bytes(codec.model)


def _with_metadata(data: bytes, **changes: str) -> bytes:
    """The same tensors under a header whose CorrDiff metadata is changed."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    header["__metadata__"] |= changes
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length:]


def test_a_weights_file_round_trips_through_bytes(codec):
    model = weights.model_from_bytes(_file(codec), "memory", expected_id=codec.model_id_hex)
    assert weights.model_id(model) == codec.model_id


def test_a_flipped_tensor_byte_is_refused(codec):
    data = bytearray(_file(codec))
    data[-3] ^= 0x01
    with pytest.raises(WeightsError, match="corrupt: its tensors hash to model"):
        weights.model_from_bytes(bytes(data), "memory")


def test_another_model_than_the_one_asked_for_is_refused(codec, other_codec):
    with pytest.raises(WeightsError, match=f"holds model {other_codec.model_id_hex}, not model {codec.model_id_hex}"):
        weights.model_from_bytes(_file(other_codec), "memory", expected_id=codec.model_id_hex)


def test_a_file_that_claims_another_id_is_refused(codec, other_codec):
    forged = _with_metadata(_file(other_codec), model_id=codec.model_id_hex)
    with pytest.raises(WeightsError, match="corrupt"):
        weights.model_from_bytes(forged, "memory", expected_id=codec.model_id_hex)


def test_a_config_asking_for_terabytes_is_refused_before_allocating(codec):
    config = json.loads(codec.model.config.to_json())
    config["decoder_channels"] = 200_000  # D alone would be ~4 TB of weights
    started = time.perf_counter()
    with pytest.raises(WeightsError, match="its config needs .* bytes of tensors"):
        weights.model_from_bytes(_with_metadata(_file(codec), config=json.dumps(config)), "memory")
    assert time.perf_counter() - started < 30  # shapes only: no allocation, no OOM


@pytest.mark.parametrize("damage", ["truncated", "empty", "huge header", "not json", "no metadata", "bad config"])
def test_malformed_files_are_weights_errors(codec, damage):
    data = _file(codec)
    bad = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "huge header": struct.pack("<Q", 2**40) + data[8:],
        "not json": struct.pack("<Q", 8) + b"{{{{{{{{" + data[16:],
        "no metadata": _with_metadata(data, format="something-else"),
        "bad config": _with_metadata(data, config='{"latent": {"no_such_field": 1}}'),
    }[damage]
    with pytest.raises(WeightsError):
        weights.model_from_bytes(bad, "memory")


def test_library_searches_in_order_and_loads_each_model_once(codec, other_codec):
    first = MemorySource("first", {codec.model_id_hex: _file(codec)})
    second = MemorySource("second", {codec.model_id_hex: _file(codec), other_codec.model_id_hex: _file(other_codec)})
    library = ModelLibrary([first, second], device="cpu")
    assert library.find(codec.model_id_hex).location == "first"
    assert library.find(other_codec.model_id_hex).location == "second"
    library.find(codec.model_id_hex)
    assert (first.reads, second.reads) == (2, 1)


def test_a_refused_copy_is_never_used_and_is_said_out_loud(codec, caplog):
    tampered = bytearray(_file(codec))
    tampered[-3] ^= 0x01
    library = ModelLibrary([MemorySource("archive", {codec.model_id_hex: bytes(tampered)}),
                            MemorySource("store", {codec.model_id_hex: _file(codec)})], device="cpu")
    with caplog.at_level(logging.WARNING, logger="corrdiff.library"):
        found = library.find(codec.model_id_hex)
    assert found.location == "store" and "archive" in found.refused[0]
    assert "refused a copy of model" in caplog.text
    assert found.codec.model_id == codec.model_id


def test_a_model_found_nowhere_names_the_places_and_the_refusals(codec):
    tampered = bytearray(_file(codec))
    tampered[-3] ^= 0x01
    library = ModelLibrary([MemorySource("archive", {codec.model_id_hex: bytes(tampered)}), BundledModels()])
    with pytest.raises(ModelNotFoundError) as raised:
        library.find(codec.model_id_hex)
    message = str(raised.value)
    assert codec.model_id_hex in message and "archive; the corrdiff package" in message and "corrupt" in message
    with pytest.raises(ModelNotFoundError):  # the miss is remembered, not searched again
        library.find(codec.model_id_hex)


def test_library_decodes_records_of_several_models(codec, other_codec):
    image = smooth_image(40, 56, seed=3)
    [a] = codec.encode_detailed([image])
    [b] = other_codec.encode_detailed([image])
    library = ModelLibrary([MemorySource("m", {c.model_id_hex: _file(c) for c in (codec, other_codec)})], device="cpu")
    restored = library.decode([a.record, b.record])
    assert np.array_equal(restored[0], a.reconstruction) and np.array_equal(restored[1], b.reconstruction)


def test_the_package_finds_its_bundled_models_by_id():
    default = weights.resolve(None)
    model_id = weights.declared_model_id(default)
    assert weights.bundled_model(model_id) == default
    assert weights.bundled_model("0" * 32) is None
    assert ModelLibrary([BundledModels()], device="cpu").find(model_id).location == "the corrdiff package"


def test_a_tiny_config_model_is_not_bundled():
    tiny = CorrDiffCodec.from_config(tiny_config(), seed=0, device="cpu")
    assert weights.bundled_model(tiny.model_id_hex) is None
