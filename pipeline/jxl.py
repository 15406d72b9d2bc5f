"""The size a JPEG XL file declares, read from its header before any pixel is decoded.

pillow-jxl-plugin decodes the whole image as soon as Pillow opens it, before the caller can
look at the size; a few hundred bytes of JPEG XL can declare a billion pixels. So the
pixel limit is checked on the declared size first (pipeline.images). The size is the
codestream's SizeHeader (ISO/IEC 18181-1, A.2), found either at the start of a bare
codestream (``FF 0A``) or in the container's ``jxlc`` box / first ``jxlp`` boxes.
"""

from __future__ import annotations

CODESTREAM_SIGNATURE = b"\xff\x0a"
# SizeHeader: 1 + 2 + 30 bits (height) + 3 (ratio) + 2 + 30 (width) = 68 bits at most.
_SIZE_HEADER_BYTES = 9
# The ratio field's width/height fractions (1..7); 0 means the width is coded.
_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}
_U32_BITS = (9, 13, 18, 30)


class JxlHeaderError(ValueError):
    """The bytes are not a JPEG XL file whose size can be read."""


def declared_size(data: bytes) -> tuple[int, int]:
    """(width, height) that a JPEG XL file (bare codestream or container) declares."""
    codestream = _codestream_start(data)
    if not codestream.startswith(CODESTREAM_SIGNATURE):
        raise JxlHeaderError("JPEG XL codestream has no signature")
    head = codestream[len(CODESTREAM_SIGNATURE): len(CODESTREAM_SIGNATURE) + _SIZE_HEADER_BYTES]
    if len(head) < _SIZE_HEADER_BYTES:
        raise JxlHeaderError("JPEG XL header is truncated")
    bits = _Bits(head)
    small = bits.read(1)
    height = (bits.read(5) + 1) * 8 if small else bits.u32()
    ratio = bits.read(3)
    if ratio:
        numerator, denominator = _RATIOS[ratio]
        return height * numerator // denominator, height
    return ((bits.read(5) + 1) * 8 if small else bits.u32()), height


def _codestream_start(data: bytes) -> bytes:
    """The first bytes of the codestream: the data itself, or gathered from container boxes."""
    if data.startswith(CODESTREAM_SIGNATURE):
        return data
    gathered = b""
    position = 0
    while position + 8 <= len(data) and len(gathered) < len(CODESTREAM_SIGNATURE) + _SIZE_HEADER_BYTES:
        size, kind, header = int.from_bytes(data[position: position + 4], "big"), data[position + 4: position + 8], 8
        if size == 1:
            size, header = int.from_bytes(data[position + 8: position + 16], "big"), 16
        elif size == 0:
            size = len(data) - position
        if size < header:
            raise JxlHeaderError(f"JPEG XL box {kind!r} has an impossible size {size}")
        payload = data[position + header: position + size]
        if kind == b"jxlc":
            return payload
        if kind == b"jxlp":
            gathered += payload[4:]  # after the box's sequence number
        position += size
    return gathered


class _Bits:
    """Little-endian bit reader, as the JPEG XL codestream is packed."""

    def __init__(self, data: bytes) -> None:
        self._value, self._position = int.from_bytes(data, "little"), 0

    def read(self, count: int) -> int:
        value = (self._value >> self._position) & ((1 << count) - 1)
        self._position += count
        return value

    def u32(self) -> int:
        """A dimension coded as U32(1 + u(9), 1 + u(13), 1 + u(18), 1 + u(30))."""
        return self.read(_U32_BITS[self.read(2)]) + 1
