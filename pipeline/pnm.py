"""The PNM family as Pillow lacks it: PAM files (P7), and one fast decoder for every maxval.

Pillow reads PBM, PGM and PPM (P1-P6) but not PAM (P7, what netpbm, ImageMagick and
scientific tools write for gray+alpha, RGBA and 16-bit data). ``PamImageFile`` opens PAM
with the same conventions as Pillow's PGM/PPM: 8-bit samples at maxval 255 are read as they
are; any other maxval is scaled to 8 bits (16 bits for single-channel images, mode "I", as
Pillow's PGM does) by the maxval, rounded. ``MaxvalDecoder`` does that scaling with numpy
and replaces Pillow's "ppm" decoder, a per-sample Python loop (about 3 s per megapixel of
16-bit RGB), so that 16-bit PPM, PGM and PAM files decode at the speed of the others.

The header is untrusted: it is read within :data:`MAX_HEADER_BYTES`, every field is checked
(sizes positive, maxval 1..65535, depth 1..4, a known tuple type), and the pixel data must
be complete. Registered by importing this module (pipeline.images does).
"""

from __future__ import annotations

from typing import IO

import numpy as np
from PIL import Image, ImageFile, PpmImagePlugin  # noqa: F401  (PpmImagePlugin first: it registers "ppm")

MAX_HEADER_BYTES = 4096  # a PAM header is a few short lines; comments cannot make it unbounded
_MAGIC = b"P7\n"
# DEPTH -> image mode, and the TUPLTYPE values that may name it (netpbm's list).
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_TUPLE_TYPES = {
    1: ("GRAYSCALE", "BLACKANDWHITE"),
    2: ("GRAYSCALE_ALPHA", "BLACKANDWHITE_ALPHA"),
    3: ("RGB",),
    4: ("RGB_ALPHA",),
}


def _accept(prefix: bytes) -> bool:
    return prefix.startswith(_MAGIC)


class PamImageFile(ImageFile.ImageFile):
    """A PAM (P7) image: gray, gray+alpha, RGB or RGBA, 1 to 16 bits per sample."""

    format = "PAM"
    format_description = "Portable Arbitrary Map"

    def _open(self) -> None:
        assert self.fp is not None
        fields = _read_header(self.fp)
        width, height, depth, maxval = (_positive(fields, name) for name in ("WIDTH", "HEIGHT", "DEPTH", "MAXVAL"))
        if depth not in _MODES:
            raise ValueError(f"PAM depth {depth} is not 1 to 4")
        if maxval > 65535:
            raise ValueError(f"PAM maxval {maxval} is above 65535")
        tuple_type = fields.get("TUPLTYPE")
        if tuple_type is not None and tuple_type not in _TUPLE_TYPES[depth]:
            raise ValueError(f"PAM tuple type {tuple_type!r} with depth {depth} is not supported")
        mode = _MODES[depth]
        self._mode = "I" if mode == "L" and maxval > 255 else mode
        self._size = (width, height)
        if maxval == 255:
            tile = ImageFile._Tile("raw", (0, 0, width, height), self.fp.tell(), mode)
        else:
            tile = ImageFile._Tile("ppm", (0, 0, width, height), self.fp.tell(), (self.mode, maxval))
        self.tile = [tile]


def _read_header(fp: IO[bytes]) -> dict[str, str]:
    """The header's fields up to ENDHDR (TUPLTYPE lines joined by spaces), within the bound."""
    if fp.read(len(_MAGIC)) != _MAGIC:
        raise SyntaxError("not a PAM file")
    fields: dict[str, str] = {}
    read = len(_MAGIC)
    while True:
        line = fp.readline(MAX_HEADER_BYTES - read + 1)
        read += len(line)
        if read > MAX_HEADER_BYTES or not line.endswith(b"\n"):
            raise ValueError(f"PAM header has no ENDHDR within {MAX_HEADER_BYTES} bytes")
        words = line.decode("ascii", errors="replace").split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        name, value = words[0], words[1].strip() if len(words) > 1 else ""
        if name == "ENDHDR":
            return fields
        if name == "TUPLTYPE" and "TUPLTYPE" in fields:
            fields[name] += " " + value
        else:
            fields[name] = value


def _positive(fields: dict[str, str], name: str) -> int:
    value = fields.get(name, "")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"PAM header field {name} is {value!r}, not a positive integer")
    return int(value)


class MaxvalDecoder(ImageFile.PyDecoder):
    """Samples of 1 or 2 bytes (big-endian) scaled from [0, maxval] to the mode's range.

    Pillow's PpmDecoder's contract (args ``(rawmode, maxval)``, mode "I" scaled to 65535,
    every other mode to 255, values above maxval clipped, rounding half to even), in numpy.
    """

    _pulls_fd = True

    def decode(self, buffer: Image.DecoderInput) -> tuple[int, int]:
        assert self.fd is not None and self.im is not None
        maxval = int(self.args[-1])
        out_max = 65535 if self.mode == "I" else 255
        count = self.state.xsize * self.state.ysize * Image.getmodebands(self.mode)
        sample = np.dtype(">u2") if maxval > 255 else np.dtype(np.uint8)
        data = self.fd.read(count * sample.itemsize)
        if len(data) < count * sample.itemsize:
            raise OSError(f"image file is truncated ({len(data)} of {count * sample.itemsize} bytes of pixel data)")
        values = np.frombuffer(data, dtype=sample).astype(np.float64)
        scaled = np.minimum(np.rint(values / maxval * out_max), out_max)
        if self.mode == "I":
            self.set_as_raw(scaled.astype("<u4").tobytes(), "I;32")
        else:
            self.set_as_raw(scaled.astype(np.uint8).tobytes(), self.mode)
        return -1, 0


Image.register_decoder("ppm", MaxvalDecoder)
Image.register_open(PamImageFile.format, PamImageFile, _accept)
Image.register_extension(PamImageFile.format, ".pam")
Image.register_mime(PamImageFile.format, "image/x-portable-arbitrarymap")
