"""A per-image quality floor, and the standard codecs that store an image which CorrDiff
would store below it.

A generative decoder can produce an image that looks right and means something else; an
archive owner must be able to say what quality *every* stored image has. The encoder knows
the exact pixels each decoder will produce, so each image is measured against its original
before it is stored (:class:`Floor`, :class:`FloorMeter`), and one that misses the floor is
stored instead by a standard codec at the smallest size that meets it
(:func:`smallest_meeting`), or losslessly when none does. Nothing is stored below the floor.

The standard records are plain files (AVIF, JPEG XL or PNG), so any image tool reads them.
Each is written from 8-bit sRGB pixels with no ICC profile, no EXIF and no alpha, and read
back by :func:`decode_standard` as the decoder library's 8-bit RGB output with any profile
ignored: the pixels measured against the floor are exactly those that a restore returns
(with the same library versions; docs/format.md).

- ``avif``: :func:`corrdiff.baselines.encode_classic` (Pillow's libavif, 4:2:0, speed 6),
  quality 0-100 bisected.
- ``jxl``: pillow-jxl-plugin (libjxl), lossy, effort 7, one thread (the bytes must not
  depend on the machine), quality 0-99 bisected.
- ``png``: lossless (zlib level 9): meets every floor, at whatever size it takes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from corrdiff.baselines import encode_classic
from corrdiff.metrics import LPIPS, psnr
from corrdiff.record import MAX_PADDED_PIXELS

CORRDIFF = "corrdiff"
STANDARD_CODECS: tuple[str, ...] = ("avif", "jxl", "png")
CODECS: tuple[str, ...] = (CORRDIFF, *STANDARD_CODECS)  # every value of the archive's codec column

_FORMATS = {"avif": "AVIF", "jxl": "JXL", "png": "PNG"}
_QUALITY_RANGE = {"avif": (0, 100), "jxl": (0, 99)}  # jxl 100 is its lossless mode: png covers that


class StandardRecordError(ValueError):
    """Bytes that do not decode as the standard codec's image they claim to be."""


@dataclass(frozen=True)
class Quality:
    """An image's measured quality against its original: PSNR (dB) and, when measured, LPIPS-alex."""

    psnr: float
    lpips: float | None = None


@dataclass(frozen=True)
class Floor:
    """The least quality any stored image may have: PSNR at least ``psnr`` dB, LPIPS-alex at
    most ``lpips`` (either may be None: not part of the floor)."""

    psnr: float | None = None
    lpips: float | None = None

    def __post_init__(self) -> None:
        if self.psnr is None and self.lpips is None:
            raise ValueError("a floor needs a psnr or an lpips bound (or both)")
        if self.psnr is not None and not 0 < self.psnr < math.inf:
            raise ValueError(f"floor psnr must be a positive number of dB, got {self.psnr}")
        if self.lpips is not None and not 0 <= self.lpips < math.inf:
            raise ValueError(f"floor lpips must be >= 0, got {self.lpips}")

    def met_by(self, quality: Quality) -> bool:
        """Whether ``quality`` meets every bound. An LPIPS bound on an image too small for
        LPIPS (no value) is not met: only a lossless record can then vouch for the image."""
        if self.psnr is not None and quality.psnr < self.psnr:
            return False
        return self.lpips is None or (quality.lpips is not None and quality.lpips <= self.lpips)


class FloorMeter:
    """Measures reconstructions of one original (its LPIPS features computed once)."""

    def __init__(self, original: np.ndarray, lpips: LPIPS | None) -> None:
        self.original = original
        self._lpips = lpips.reference(original) if lpips is not None and min(original.shape[:2]) >= lpips.min_side \
            else None

    def __call__(self, reconstruction: np.ndarray) -> Quality:
        return Quality(psnr(self.original, reconstruction),
                       self._lpips(reconstruction) if self._lpips is not None else None)


@dataclass(frozen=True)
class StoredImage:
    """What is stored of an image: a CorrDiff record or a standard codec's file, the quality
    setting that made a lossy standard file (else None), the pixels it decodes to and their
    measured quality."""

    codec: str
    data: bytes
    setting: int | None
    pixels: np.ndarray
    quality: Quality


def encode_standard(image: np.ndarray, codec: str, setting: int | None = None) -> bytes:
    """An HxWx3 uint8 image as a ``codec`` file (:data:`STANDARD_CODECS`); ``setting`` is the
    lossy codecs' quality (:data:`_QUALITY_RANGE`), None for png."""
    if codec == "avif":
        return encode_classic(image, "avif", _in_range(codec, setting))
    buffer = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if codec == "jxl":
        _register_jxl()
        pil.save(buffer, format="JXL", quality=_in_range(codec, setting), effort=7, num_threads=1)
    elif codec == "png":
        if setting is not None:
            raise ValueError("png is lossless: it takes no quality setting")
        pil.save(buffer, format="PNG", compress_level=9)
    else:
        raise ValueError(f"unknown standard codec {codec!r}; choose one of {', '.join(STANDARD_CODECS)}")
    return buffer.getvalue()


def decode_standard(codec: str, data: bytes, max_pixels: int = MAX_PADDED_PIXELS) -> np.ndarray:
    """A standard record's pixels: HxWx3 uint8, as the decoder library gives them, any
    colour profile ignored (the encoder wrote none that means anything but sRGB).

    Only the codec's own format is opened, and an AVIF or PNG declaring more than
    ``max_pixels`` (the CorrDiff record's bound) is refused before its pixels are decoded.
    The JPEG XL plugin decodes every pixel while opening: bytes from an archive (untrusted)
    have their declared size checked first (``pipeline.restore.decode_standard_record``).
    Raises :class:`StandardRecordError`."""
    if codec not in _FORMATS:
        raise StandardRecordError(f"unknown standard codec {codec!r}")
    if codec == "jxl":
        _register_jxl()
    try:
        with Image.open(io.BytesIO(data), formats=[_FORMATS[codec]]) as image:
            check_declared_size(image.size, max_pixels, codec)
            if image.mode not in ("RGB", "L", "RGBA", "LA"):
                raise StandardRecordError(f"{codec} record holds a {image.mode} image, not 8-bit RGB")
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except StandardRecordError:
        raise
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds; all mean "not this image"
        raise StandardRecordError(f"{codec} record does not decode: {type(error).__name__}: {error}") from error


def smallest_meeting(image: np.ndarray, codec: str, meter: FloorMeter, floor: Floor) -> StoredImage:
    """The smallest ``codec`` record of ``image`` that meets ``floor``, measured on the pixels
    its bytes decode to; a lossless PNG when no quality setting meets it (or ``codec`` is png).

    The quality setting is bisected for the lowest that meets the floor (file size and
    quality both grow with it, nearly monotonically): about seven encodes and decodes. Only
    a setting actually measured to meet the floor is ever returned.
    """
    def trial(setting: int | None, target: str) -> StoredImage:
        data = encode_standard(image, target, setting)
        pixels = decode_standard(target, data)
        return StoredImage(target, data, setting, pixels, meter(pixels))

    if codec != "png":
        low, high = _QUALITY_RANGE[codec]
        best = trial(high, codec)
        if floor.met_by(best.quality):
            while low < high:
                middle = (low + high) // 2
                tried = trial(middle, codec)
                if floor.met_by(tried.quality):
                    best, high = tried, middle
                else:
                    low = middle + 1
            return best
    return trial(None, "png")


def _in_range(codec: str, setting: int | None) -> int:
    low, high = _QUALITY_RANGE[codec]
    if setting is None or not low <= setting <= high:
        raise ValueError(f"{codec} quality must be in [{low}, {high}], got {setting}")
    return setting


def check_declared_size(size: tuple[int, int], max_pixels: int, codec: str) -> None:
    """Refuse (:class:`StandardRecordError`) a ``(width, height)`` a record declares beyond ``max_pixels``."""
    width, height = size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise StandardRecordError(f"{codec} record declares a {width}x{height} image (at most {max_pixels} px)")


def _register_jxl() -> None:
    """pillow-jxl-plugin registers its format with Pillow when imported."""
    from pillow_jxl import JpegXLImagePlugin  # noqa: F401


def store_meeting(image: np.ndarray, corrdiff: StoredImage, floor: Floor, fallback: str, meter: FloorMeter,
                  smaller: bool = False) -> StoredImage:
    """What to store of ``image``, given its CorrDiff record (``corrdiff``, measured): that
    record if it meets ``floor``, else the smallest ``fallback`` record that does
    (:func:`smallest_meeting`). With ``smaller``, the fallback is tried in any case and the
    smaller of the two records that meet the floor is stored, so that no image takes more
    bytes than its fallback alone would (on a tie, CorrDiff's)."""
    meets = floor.met_by(corrdiff.quality)
    if meets and not smaller:
        return corrdiff
    standard = smallest_meeting(image, fallback, meter, floor)
    return corrdiff if meets and len(corrdiff.data) <= len(standard.data) else standard


def fallback_share(codecs: Mapping[str, int]) -> float | None:
    """The share of records (``codecs``: count per codec) held by a standard codec rather than
    CorrDiff, i.e. of images that met the floor only so; None when there is no record."""
    records = sum(codecs.values())
    return (records - codecs.get(CORRDIFF, 0)) / records if records else None
