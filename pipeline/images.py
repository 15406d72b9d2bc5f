"""Turning stored image bytes into the codec's input: HxWx3 uint8 sRGB, or a clear reason why not.

The policy (docs/archive.md, "What is archived of an image"): an archive of photos keeps
what a colour-managed viewer shows on a white page. EXIF orientation is applied; an
embedded ICC profile (Display P3 from phones, Adobe RGB, a gray gamma) is converted to
sRGB, the space of the restored files, which carry no profile (a wide-gamut colour outside
sRGB is clipped to its edge); grayscale is replicated to three channels; palette images
are expanded; alpha is composited onto white; CMYK goes through its profile if it has one,
else through Pillow's conversion; integer images of more than 8 bits are scaled to 8 bits
by the range of the type their file declares (16-bit by 65535, 32-bit unsigned by
2**32 - 1; signed types by their maximum, negative values clipped to 0), float images are
clipped to [0, 1]; of an animation or a multi-image file only the first (primary) image is
kept. An image with more pixels than the limit is refused before its pixels are decoded
(decompression bombs).

Only the raster formats in :data:`FORMATS` are ever opened: Pillow otherwise identifies
content by its bytes, whatever the file is called, and would hand a PostScript file named
``photo.jpg`` to Ghostscript. The plugins for HEIF (pillow-heif), JPEG XL
(pillow-jxl-plugin) and PAM (pipeline.pnm) are registered when this module is imported,
which is how every process that decodes (Ray workers included) gets them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from pillow_jxl import JpegXLImagePlugin

from pipeline import pnm  # noqa: F401  (registers PAM and the fast PNM maxval decoder)
from pipeline.jxl import declared_size

pillow_heif.register_heif_opener()

# Pillow's names of the formats decode_image opens; anything else is "not a recognised image
# format", whatever its name. "PPM" is Pillow's plugin for PBM, PGM and PPM (P1-P6).
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "PAM", "AVIF", "HEIF", "JXL", "JPEG2000")
# File name endings read as images (case-insensitive): the usual endings of FORMATS. Here,
# not in pipeline.sources, so that training's image folder (pipeline.image_folder) imports
# neither Ray nor pyarrow.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm", ".pam", ".avif", ".heic", ".heif", ".hif", ".jxl", ".jp2", ".j2k",
)
DEFAULT_MAX_PIXELS = 100_000_000  # 100 Mpx: above any camera photo, far below a bomb
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# The image modes whose pixels an ICC profile of each colour space describes.
PROFILE_MODES = {"RGB": ("RGB", "RGBA"), "GRAY": ("L", "LA"), "CMYK": ("CMYK",)}
# TIFF tags that say what a mode "I" image's samples were in the file.
_BITS_PER_SAMPLE, _SAMPLE_FORMAT, _SIGNED = 258, 339, 2


class ImageDecodeError(ValueError):
    """An input that cannot become an image; the message is the reason recorded for it."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array, applying the documented policy."""
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # Our own limit governs; Pillow's warning threshold (89 Mpx) would only add noise.
            # Pillow still refuses anything above 2x its threshold, a hard cap we keep.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if JpegXLImagePlugin._accept(data):  # its plugin decodes every pixel while opening
                _check_pixels(*declared_size(data), max_pixels)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_pixels(*image.size, max_pixels)
            integers = _integer_type(image)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(_to_srgb(_expand_palette(image)), integers)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image too large: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(f"image too large: {width}x{height} exceeds the limit of {max_pixels} pixels")


def _integer_type(image: Image.Image) -> np.dtype:
    """The integer type whose range scales a mode "I" image (Pillow's 32-bit signed mode).

    Read before decoding, while the opened file's tags are at hand. TIFF declares its
    samples (BitsPerSample, SampleFormat): int16, int32 or uint32 (which Pillow stores
    wrapped into int32). Every other allowed format that Pillow opens as "I" (PGM and PAM
    with maxval above 255) holds values already scaled to 16 bits.
    """
    if image.mode != "I" or image.format != "TIFF":
        return np.dtype(np.uint16)
    bits = _tag(image, _BITS_PER_SAMPLE, 8)
    signed = _tag(image, _SAMPLE_FORMAT, 1) == _SIGNED
    if bits not in (16, 32):
        raise ImageDecodeError(f"unsupported {bits}-bit integer TIFF samples")
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


def _tag(image: Image.Image, tag: int, default: int) -> int:
    """A TIFF tag's first value (tags with one value per channel repeat it)."""
    value = image.tag_v2.get(tag, default)
    return int(value[0] if isinstance(value, tuple) else value)


def _expand_palette(image: Image.Image) -> Image.Image:
    """A palette image as RGB, or RGBA where the palette has a transparent entry (its ICC
    profile, if any, describes the palette's colours and stays in ``info``)."""
    if image.mode != "P":
        return image
    return image.convert("RGBA" if "transparency" in image.info else "RGB")


def _to_srgb(image: Image.Image) -> Image.Image:
    """The image's colours in sRGB (RGB or RGBA, alpha kept) if it embeds a usable ICC
    profile; otherwise the image unchanged, its values taken as sRGB.

    Perceptual intent, littlecms's default and what viewers use for photos; an sRGB
    profile converts to the very same pixels (checked on every tagged photo in
    data/photos and the held-out set). A profile that does not parse, or that describes
    another colour space than the pixels' (a broken file, a profile on 16-bit or float
    gray), is ignored, as viewers ignore it: the image is archived as it displays.
    """
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image
    if image.mode not in PROFILE_MODES.get(source.profile.xcolor_space.strip(), ()):
        return image
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    colour = image.convert(image.mode.removesuffix("A")) if alpha is not None else image
    try:
        converted = ImageCms.profileToProfile(colour, source, SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def _to_rgb(image: Image.Image, integers: np.dtype) -> np.ndarray:
    """RGB uint8 pixels; a mode "I" image's values are read as ``integers`` and scaled by its maximum."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return _gray_to_rgb(np.asarray(image, dtype=np.uint16).astype(np.float64) / 65535.0)
    if mode == "I":
        values = np.asarray(image, dtype=np.int32).astype(integers)  # uint32: undoes Pillow's wrap
        return _gray_to_rgb(values.astype(np.float64) / np.iinfo(integers).max)
    if mode == "F":
        return _gray_to_rgb(np.asarray(image, dtype=np.float64))
    if mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageDecodeError(f"unsupported image layout {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _gray_to_rgb(values: np.ndarray) -> np.ndarray:
    """Gray levels in [0, 1] (clipped) -> three equal uint8 channels."""
    gray = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
