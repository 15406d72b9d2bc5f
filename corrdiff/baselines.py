"""Classic codecs (JPEG, WebP, AVIF via Pillow) at a chosen rate, as baselines for CorrDiff.

A learned codec's rate is whatever its model and lambda give; to compare, each classic
codec is run on the same image at the integer quality whose file size lands closest to the
CorrDiff record's bits per pixel (:func:`match_bpp`). The rate counts the whole file, as
the CorrDiff rate counts the whole record: container and headers included (a few hundred
bytes, which matters on small images).

Settings, fixed so that a baseline means the same thing in every report:

- JPEG: Pillow's defaults (libjpeg-turbo, standard tables, no Huffman optimisation,
  baseline), with 4:2:0 chroma subsampling, which is Pillow's default and is passed
  explicitly. Quality 1-100.
- WebP: lossy, ``method=6`` (slowest, best compression), other settings Pillow's
  defaults. Quality 0-100.
- AVIF: Pillow 13 has AVIF built in (libavif 1.4.2 with the aom encoder and dav1d
  decoder in its wheel; ``PIL.features.check("avif")`` is True), so no plugin is needed.
  Pillow's defaults: 4:2:0, speed 6, full range. Quality 0-100.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from corrdiff.metrics import bits_per_pixel

ClassicCodec = Literal["jpeg", "webp", "avif"]
CLASSIC_CODECS: tuple[str, ...] = ("jpeg", "webp", "avif")

QUALITY_RANGE: dict[str, tuple[int, int]] = {"jpeg": (1, 100), "webp": (0, 100), "avif": (0, 100)}
_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "jpeg": {"format": "JPEG", "subsampling": "4:2:0"},
    "webp": {"format": "WEBP", "method": 6},
    "avif": {"format": "AVIF"},
}


@dataclass(frozen=True)
class ClassicResult:
    """A classic codec's encoding of one image, chosen to match a target rate."""

    quality: int
    data: bytes
    bpp: float
    reconstruction: np.ndarray
    within_tolerance: bool


def encode_classic(image: np.ndarray, codec: ClassicCodec, quality: int) -> bytes:
    """Encode an HxWx3 uint8 image with ``codec`` at integer ``quality`` (see QUALITY_RANGE)."""
    if codec not in _SAVE_OPTIONS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CLASSIC_CODECS)}")
    low, high = QUALITY_RANGE[codec]
    if not low <= quality <= high:
        raise ValueError(f"{codec} quality must be in [{low}, {high}], got {quality}")
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, quality=quality, **_SAVE_OPTIONS[codec])
    return buffer.getvalue()


def decode_classic(data: bytes) -> np.ndarray:
    """Decode a JPEG, WebP or AVIF file to a writable HxWx3 uint8 array (format from its bytes)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)


def match_bpp(image: np.ndarray, codec: ClassicCodec, target_bpp: float,
              tolerance: float = 0.05) -> ClassicResult:
    """Encode ``image`` at the quality whose rate is closest to ``target_bpp``.

    Bisects the integer quality for the lowest one reaching the target (rate grows with
    quality, nearly monotonically), then keeps the closest of every quality tried.
    ``within_tolerance`` says whether that rate is within ``tolerance`` (relative) of the
    target; it is False when the target lies outside the codec's range of rates on this
    image, or between two adjacent qualities' rates.
    """
    if target_bpp <= 0:
        raise ValueError(f"target_bpp must be positive, got {target_bpp}")
    height, width = image.shape[:2]
    tried: dict[int, tuple[bytes, float]] = {}

    def rate(quality: int) -> float:
        if quality not in tried:
            data = encode_classic(image, codec, quality)
            tried[quality] = (data, bits_per_pixel(len(data), height, width))
        return tried[quality][1]

    low, high = QUALITY_RANGE[codec]
    while low < high:
        middle = (low + high) // 2
        if rate(middle) < target_bpp:
            low = middle + 1
        else:
            high = middle
    rate(low)
    if low > QUALITY_RANGE[codec][0]:
        rate(low - 1)
    quality = min(tried, key=lambda q: abs(tried[q][1] - target_bpp))
    data, bpp = tried[quality]
    return ClassicResult(
        quality=quality, data=data, bpp=bpp, reconstruction=decode_classic(data),
        within_tolerance=abs(bpp - target_bpp) <= tolerance * target_bpp,
    )
