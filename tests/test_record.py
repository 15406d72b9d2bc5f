"""The record format: round trips, and every corruption or truncation is caught."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corrdiff.record import MAX_PADDED_PIXELS, MIN_RECORD_BYTES, Record, RecordError
from corrdiff.tiling import Tiling, max_batch

float16s = st.floats(width=16, allow_nan=False, allow_infinity=False)


@st.composite
def records(draw) -> Record:
    """Records of every version: version 1 (one y string), 2 (one per tile block), 3 (and a tile batch)."""
    height, width = draw(st.integers(1, 5000)), draw(st.integers(1, 5000))
    version = draw(st.sampled_from([1, 2, 3]))
    tile = 64 * draw(st.integers(8, 32)) if version > 1 else 0
    overlap = 16 * draw(st.integers(0, tile // 32)) if version > 1 else 0
    tile_batch = {1: 0, 2: 1, 3: draw(st.integers(1, max_batch(max(tile, 64))))}[version]
    header = Record(
        model_id=draw(st.binary(min_size=16, max_size=16)),
        height=height, width=width, pad_bottom=(-height) % 64, pad_right=(-width) % 64,
        seed=draw(st.integers(0, 2**32 - 1)),
        gammas=tuple(draw(st.lists(float16s, min_size=1, max_size=40))),
        z_string=draw(st.binary(max_size=64)), y_strings=(), version=version, tile=tile, overlap=overlap,
        tile_batch=tile_batch,
    )
    strings = tuple(draw(st.binary(max_size=32)) for _ in range(header.block_count))
    return Record(**{**header.__dict__, "y_strings": strings})


@settings(max_examples=200, deadline=None)
@given(records())
def test_round_trip(record):
    assert Record.from_bytes(record.to_bytes()) == record


@settings(max_examples=50, deadline=None)
@given(records(), st.data())
def test_any_single_bit_flip_is_detected(record, data):
    raw = bytearray(record.to_bytes())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(RecordError):
        Record.from_bytes(bytes(raw))


@settings(max_examples=50, deadline=None)
@given(records(), st.data())
def test_any_truncation_is_detected(record, data):
    raw = record.to_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(RecordError):
        Record.from_bytes(raw[:cut])


def test_minimum_size_is_the_empty_record():
    record = Record(model_id=bytes(16), height=1, width=1, pad_bottom=63, pad_right=63, seed=0,
                    gammas=(0.5,), z_string=b"", y_strings=(b"",), version=1)
    assert len(record.to_bytes()) == MIN_RECORD_BYTES


@pytest.mark.parametrize("change, message", [
    ({"pad_bottom": 3}, "padding"),
    ({"gammas": ()}, "steps"),
    ({"gammas": (float("inf"),)}, "non-finite"),
    ({"model_id": b"short"}, "model id"),
])
def test_invalid_fields_are_refused(change, message):
    fields = dict(model_id=bytes(16), height=10, width=10, pad_bottom=54, pad_right=54, seed=0,
                  gammas=(0.5,), z_string=b"z", y_strings=(b"y",), version=1)
    with pytest.raises(RecordError, match=message):
        Record(**{**fields, **change}).to_bytes()


@pytest.mark.parametrize("tile, overlap, tile_batch", [(0, 0, 1), (96, 0, 1), (4096, 0, 1), (512, 40, 1),
                                                      (512, 272, 1), (512, 64, 0), (512, 64, 17), (2048, 0, 2),
                                                      (64, 0, 1025)])
def test_a_tiling_a_decoder_cannot_use_is_refused(tile, overlap, tile_batch):
    """The tile and the batch set a decoder's memory: a forged record may not ask for more
    than one 2048 px tile's worth of pixels in a network call."""
    with pytest.raises(RecordError, match="invalid tile"):
        Record(model_id=bytes(16), height=10, width=10, pad_bottom=54, pad_right=54, seed=0, gammas=(0.5,),
               z_string=b"z", y_strings=(b"y",), version=3, tile=tile, overlap=overlap,
               tile_batch=tile_batch).to_bytes()


def test_the_largest_tile_batches_are_allowed():
    for tile, tile_batch in ((64, 1024), (512, 16), (2048, 1)):
        record = Record(model_id=bytes(16), height=10, width=10, pad_bottom=54, pad_right=54, seed=0, gammas=(0.5,),
                        z_string=b"z", y_strings=(b"y",), version=3, tile=tile, overlap=0, tile_batch=tile_batch)
        assert Record.from_bytes(record.to_bytes()).tiling == Tiling(tile, 0, tile_batch)


def test_a_version_2_record_ran_its_tiles_one_at_a_time():
    fields = dict(model_id=bytes(16), height=10, width=10, pad_bottom=54, pad_right=54, seed=0, gammas=(0.5,),
                  z_string=b"z", y_strings=(b"y",), version=2, tile=512, overlap=64)
    raw = Record(**fields, tile_batch=1).to_bytes()
    assert Record.from_bytes(raw).tiling == Tiling(512, 64, 1)
    assert len(raw) == len(Record(**{**fields, "version": 3}, tile_batch=1).to_bytes()) - 2  # no batch field
    with pytest.raises(RecordError, match="one at a time"):
        Record(**fields, tile_batch=2).to_bytes()


def test_a_tiled_record_holds_one_y_string_per_block():
    fields = dict(model_id=bytes(16), height=1000, width=300, pad_bottom=24, pad_right=20, seed=0, gammas=(0.5,),
                  z_string=b"z", tile=512, overlap=64, tile_batch=1)
    record = Record(**fields, y_strings=(b"a", b"b", b"c", b"d"))  # 1024 x 320 px: 2 x 1 blocks of 512
    with pytest.raises(RecordError, match="4 y strings, its tile grid has 2 blocks"):
        record.to_bytes()
    assert Record.from_bytes(Record(**fields, y_strings=(b"a", b"b")).to_bytes()).y_strings == (b"a", b"b")


def test_unknown_version_is_named():
    raw = bytearray(Record(model_id=bytes(16), height=1, width=1, pad_bottom=63, pad_right=63, seed=0,
                           gammas=(0.5,), z_string=b"", y_strings=(b"",), version=1).to_bytes())
    raw[4] = 9
    import zlib
    raw[-4:] = zlib.crc32(bytes(raw[:-4])).to_bytes(4, "little")
    with pytest.raises(RecordError, match="version 9"):
        Record.from_bytes(bytes(raw))


def _forged(height: int, width: int, z_length: int | None = None, z_string: bytes = b"",
            y_string: bytes = b"") -> bytes:
    """Record bytes with any header and a valid checksum: what a forger (not a bit flip) writes."""
    import struct
    import zlib

    body = struct.pack("<4sB16sIIBBBI", b"CDAR", 1, bytes(16), height, width, (-height) % 64, (-width) % 64, 1, 0)
    body += struct.pack("<e", 0.5)
    body += struct.pack("<I", len(z_string) if z_length is None else z_length) + z_string
    body += struct.pack("<I", len(y_string)) + y_string
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("height, width", [(100_000, 100_000), (1, 100_000_000), (2**32 - 1, 2**32 - 1),
                                           (11_586, 11_586)])
def test_a_header_claiming_a_huge_image_is_refused_before_any_allocation(height, width):
    import time

    started = time.perf_counter()
    with pytest.raises(RecordError, match="exceeds the record limit"):
        Record.from_bytes(_forged(height, width))
    assert time.perf_counter() - started < 0.1


def test_the_largest_allowed_image_parses():
    side = int(MAX_PADDED_PIXELS**0.5) // 64 * 64  # 11584 x 11584, padded to itself
    assert Record.from_bytes(_forged(side, side)).padded_size == (side, side)


def test_a_string_length_beyond_the_record_is_refused():
    with pytest.raises(RecordError, match="truncated"):
        Record.from_bytes(_forged(64, 64, z_length=2**32 - 1))
