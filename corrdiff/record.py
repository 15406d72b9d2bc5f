"""The self-describing binary record: one compressed image, specified in docs/format.md.

Layout (little-endian), format version 3 (version 2, read but no longer written, has no
tile batch field: its score tiles ran one at a time, cut as docs/format.md says; version 1
has no tile fields and one y string for the whole image):

    offset  size  field
    0       4     magic b"CDAR"
    4       1     format version (3)
    5       16    model id (first 16 bytes of the SHA-256 of the model, see weights.py)
    21      4     image height (u32, >= 1)
    25      4     image width (u32, >= 1)
    29      1     rows of bottom padding (u8, < 64; height + pad is a multiple of 64)
    30      1     columns of right padding (u8, < 64)
    31      1     sampler steps S (u8, >= 1)
    32      4     noise seed of x_T (u32)
    36      2     tile side (u16, px; versions 2 and 3)
    38      2     tile overlap (u16, px; versions 2 and 3)
    40      2     tile batch (u16, score tiles per network call; version 3)
    .       2*S   gamma_1 .. gamma_S (IEEE float16)
    .       4     length of the z string (u32), then the z string (rANS)
    .       4+n   per block of the tile grid, in raster order: length (u32), then its y string
    end-4   4     CRC-32 (zlib) of every byte before it

Parsing checks, in order: length, magic, checksum, version, then every field's range and
the exact total length, so a truncated or corrupted record is reported, never decoded. A
checksum proves only that the bytes are as written, not who wrote them: the image size is
also bounded (:data:`MAX_PADDED_PIXELS`), because the decoder allocates buffers from it
before it reads a single coded symbol.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from corrdiff.tiling import Tiling, blocks, check_tiling

MAGIC = b"CDAR"
FORMAT_VERSION = 3  # what the encoder writes
READABLE_VERSIONS = (1, 2, 3)
MODEL_ID_BYTES = 16
PAD_MULTIPLE = 64
_HEADER = struct.Struct("<4sB16sIIBBBI")
# The tiling fields after the header, by version: none; tile side, overlap; and the batch.
_TILING = {1: struct.Struct(""), 2: struct.Struct("<HH"), 3: struct.Struct("<HHH")}
_LENGTH = struct.Struct("<I")
_CRC = struct.Struct("<I")
MIN_RECORD_BYTES = _HEADER.size + 2 + 2 * _LENGTH.size + _CRC.size
# The largest padded image (height + pad) * (width + pad) a record may describe: 2**27 px.
# Every image within the pipeline's 100 Mpx decode limit (pipeline.images.DEFAULT_MAX_PIXELS)
# fits unless it is a strip under ~190 px on a side, whose padding to 64 multiplies its area;
# the encoder refuses larger images, so no record beyond it was ever written. Decoding one
# takes a few GB; a forged 100000 x 100000 header would ask for hundreds.
MAX_PADDED_PIXELS = 2**27


class RecordError(ValueError):
    """A record that cannot be decoded: corrupt, truncated, or of an unknown format."""


class ModelMismatchError(RecordError):
    """A valid record written by a different model than the one asked to decode it."""

    def __init__(self, record_model: str, codec_model: str) -> None:
        super().__init__(
            f"record was written by model {record_model}, but this codec is model {codec_model}; "
            f"load model {record_model} to decode it"
        )
        self.record_model = record_model
        self.codec_model = codec_model


@dataclass(frozen=True)
class Record:
    model_id: bytes
    height: int
    width: int
    pad_bottom: int
    pad_right: int
    seed: int
    gammas: tuple[float, ...]  # float16 values, one per sampler step
    z_string: bytes
    y_strings: tuple[bytes, ...]  # one per block of the tile grid (version 1: one, the whole image)
    version: int = FORMAT_VERSION
    tile: int = 0  # versions 2 and 3: tile side and overlap in px (corrdiff.tiling); version 1: 0
    overlap: int = 0
    tile_batch: int = 0  # score tiles per network call: version 3 stores it, version 2 ran 1, version 1: 0

    @property
    def tiling(self) -> Tiling | None:
        """How the networks ran on this record's image; None: on the whole image (version 1)."""
        return None if self.version == 1 else Tiling(self.tile, self.overlap, self.tile_batch)

    @property
    def steps(self) -> int:
        return len(self.gammas)

    @property
    def block_count(self) -> int:
        """How many y strings the record holds: the blocks of its tile grid (version 1: one)."""
        if self.version == 1:
            return 1
        height, width = self.padded_size
        return len(blocks(height, self.tile)) * len(blocks(width, self.tile))

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.height + self.pad_bottom, self.width + self.pad_right

    def to_bytes(self) -> bytes:
        _validate_fields(self)
        body = b"".join([
            _HEADER.pack(
                MAGIC, self.version, self.model_id, self.height, self.width,
                self.pad_bottom, self.pad_right, self.steps, self.seed,
            ),
            _TILING[self.version].pack(*_tiling_fields(self)),
            np.asarray(self.gammas, dtype="<f2").tobytes(),
            *(part for string in (self.z_string, *self.y_strings) for part in (_LENGTH.pack(len(string)), string)),
        ])
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> Record:
        data = bytes(data)
        if len(data) < MIN_RECORD_BYTES:
            raise RecordError(f"record is truncated: {len(data)} bytes, a record has at least {MIN_RECORD_BYTES}")
        if data[:4] != MAGIC:
            raise RecordError(f"not a CorrDiff record: magic is {data[:4]!r}, expected {MAGIC!r}")
        body, (stored_crc,) = data[:-_CRC.size], _CRC.unpack(data[-_CRC.size:])
        if zlib.crc32(body) != stored_crc:
            raise RecordError("record checksum mismatch: the record is corrupt or truncated")
        magic, version, model_id, height, width, pad_bottom, pad_right, steps, seed = _HEADER.unpack_from(body)
        if version not in READABLE_VERSIONS:
            raise RecordError(f"record format version {version} is not supported (this library reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))})")
        layout = _TILING[version]
        offset = _HEADER.size + layout.size
        if offset > len(body):
            raise RecordError("record is truncated inside its header")
        fields = layout.unpack_from(body, _HEADER.size)
        if version == 1:
            tile = overlap = tile_batch = 0
        elif version == 2:
            (tile, overlap), tile_batch = fields, 1  # its tiles ran one at a time
        else:
            tile, overlap, tile_batch = fields
        gammas = body[offset:offset + 2 * steps]
        if len(gammas) != 2 * steps:
            raise RecordError("record is truncated inside its gammas")
        # The fields that size the tile grid are checked before the grid is counted.
        _check_size(height, width, pad_bottom, pad_right)
        if version > 1:
            check_tiling(tile, overlap, tile_batch, RecordError)
        header = cls(model_id=model_id, height=height, width=width, pad_bottom=pad_bottom, pad_right=pad_right,
                     seed=seed, gammas=tuple(float(g) for g in np.frombuffer(gammas, dtype="<f2")),
                     z_string=b"", y_strings=(), version=version, tile=tile, overlap=overlap, tile_batch=tile_batch)
        z_string, offset = _read_string(body, offset + 2 * steps)
        y_strings = []
        for _ in range(header.block_count):
            string, offset = _read_string(body, offset)
            y_strings.append(string)
        if offset != len(body):
            raise RecordError(f"record has {len(body) - offset} unexpected trailing bytes")
        record = dataclasses.replace(header, z_string=z_string, y_strings=tuple(y_strings))
        _validate_fields(record)
        return record


def _tiling_fields(record: Record) -> tuple[int, ...]:
    """The tiling fields a record of its version stores (:data:`_TILING`)."""
    return {1: (), 2: (record.tile, record.overlap), 3: (record.tile, record.overlap, record.tile_batch)}[record.version]


def _read_string(body: bytes, offset: int) -> tuple[bytes, int]:
    if offset + _LENGTH.size > len(body):
        raise RecordError("record is truncated inside its entropy-coded strings")
    (length,) = _LENGTH.unpack_from(body, offset)
    start = offset + _LENGTH.size
    if start + length > len(body):
        raise RecordError("record is truncated inside its entropy-coded strings")
    return body[start:start + length], start + length


def _check_size(height: int, width: int, pad_bottom: int, pad_right: int) -> None:
    if height < 1 or width < 1:
        raise RecordError(f"invalid image size {height}x{width}")
    for name, size, pad in (("height", height, pad_bottom), ("width", width, pad_right)):
        if not 0 <= pad < PAD_MULTIPLE or (size + pad) % PAD_MULTIPLE:
            raise RecordError(f"invalid padding {pad} for {name} {size}")
    check_padded_size(height + pad_bottom, width + pad_right)


def _validate_fields(record: Record) -> None:
    if len(record.model_id) != MODEL_ID_BYTES:
        raise RecordError(f"model id must be {MODEL_ID_BYTES} bytes")
    if record.version not in READABLE_VERSIONS:
        raise RecordError(f"invalid format version {record.version}")
    _check_size(record.height, record.width, record.pad_bottom, record.pad_right)
    if record.version == 1:
        if record.tile or record.overlap or record.tile_batch:
            raise RecordError("a version 1 record has no tiling")
    elif record.version == 2 and record.tile_batch != 1:
        raise RecordError("a version 2 record's tiles run one at a time (tile batch 1)")
    else:
        check_tiling(record.tile, record.overlap, record.tile_batch, RecordError)
    if len(record.y_strings) != record.block_count:
        raise RecordError(f"record has {len(record.y_strings)} y strings, its tile grid has {record.block_count} blocks")
    if not 1 <= record.steps <= 255:
        raise RecordError(f"invalid number of sampler steps {record.steps}")
    if not all(np.isfinite(record.gammas)):
        raise RecordError("record holds a non-finite gamma")
    if not 0 <= record.seed < 2**32:
        raise RecordError(f"invalid seed {record.seed}")


def check_padded_size(height: int, width: int) -> None:
    """Raise ``RecordError`` if a padded image of ``height x width`` exceeds :data:`MAX_PADDED_PIXELS`.

    One check for both sides of the format: the encoder (an image too large to record) and
    the parser (a header that would make the decoder allocate without bound).
    """
    if height * width > MAX_PADDED_PIXELS:
        raise RecordError(f"image of {height}x{width} px (padded to a multiple of {PAD_MULTIPLE}) exceeds the "
                          f"record limit of {MAX_PADDED_PIXELS} padded pixels")
