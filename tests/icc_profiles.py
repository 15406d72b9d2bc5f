"""ICC v2 matrix/TRC profiles built byte by byte, so that colour-management tests need no
profile file: the layout is ICC.1:2001-04 (header, tag table, desc/cprt/wtpt/XYZ/curv tags).

Only the display profiles the decode policy meets in photos are needed: an RGB space given
by its D50-adapted primaries and one gamma, and a gray space given by its gamma.
"""

from __future__ import annotations

import struct

D50 = (0.9642, 1.0, 0.8249)
# Display P3 (the colour space of recent phone photos), colorants adapted to D50 as in
# Apple's profile; the real one has the sRGB tone curve, a 2.2 gamma stands in for it here.
DISPLAY_P3_D50 = ((0.515121, 0.241182, -0.001053), (0.291977, 0.692236, 0.041885), (0.157104, 0.066574, 0.784073))
# sRGB's colorants adapted to D50 (IEC 61966-2-1 primaries, Bradford).
SRGB_D50 = ((0.436066, 0.222488, 0.013916), (0.385147, 0.716873, 0.097076), (0.143066, 0.060608, 0.714096))


def rgb_profile(primaries: tuple[tuple[float, float, float], ...], gamma: float, description: str) -> bytes:
    """An RGB display profile: red, green, blue colorants (XYZ, D50) and one gamma for all three."""
    curve = _curve(gamma)
    tags = [(b"desc", _text_description(description)), (b"cprt", _text("No copyright, test profile")),
            (b"wtpt", _xyz(D50)), (b"rXYZ", _xyz(primaries[0])), (b"gXYZ", _xyz(primaries[1])),
            (b"bXYZ", _xyz(primaries[2])), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    return _profile(b"RGB ", tags)


def gray_profile(gamma: float, description: str) -> bytes:
    """A gray display profile with the given tone curve."""
    tags = [(b"desc", _text_description(description)), (b"cprt", _text("No copyright, test profile")),
            (b"wtpt", _xyz(D50)), (b"kTRC", _curve(gamma))]
    return _profile(b"GRAY", tags)


def _profile(colour_space: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    table_size = 4 + 12 * len(tags)
    offset, entries, data = 128 + table_size, b"", b""
    for signature, element in tags:
        element += b"\0" * (-len(element) % 4)  # every tag starts on a 4-byte boundary
        entries += struct.pack(">4sII", signature, offset, len(element))
        data += element
        offset += len(element)
    header = struct.pack(">I4sI4s4s4s6H4sI4sII8sI12s4s16s28s", offset, b"\0" * 4, 0x02100000, b"mntr", colour_space,
                         b"XYZ ", 2026, 1, 1, 0, 0, 0, b"acsp", 0, b"\0" * 4, 0, 0, b"\0" * 8, 0, _s15(D50), b"\0" * 4,
                         b"\0" * 16, b"\0" * 28)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + entries + data


def _s15(values: tuple[float, ...]) -> bytes:
    return b"".join(struct.pack(">i", round(v * 65536)) for v in values)


def _xyz(values: tuple[float, float, float]) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(values)


def _curve(gamma: float) -> bytes:
    return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256))


def _text(text: str) -> bytes:
    return b"text" + b"\0" * 4 + text.encode("ascii") + b"\0"


def _text_description(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return (b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_text)) + ascii_text
            + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67)
