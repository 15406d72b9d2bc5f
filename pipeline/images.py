"""Turning stored image bytes into the codec's input: HxWx3 uint8 sRGB, or a clear reason why not.

The policy (docs/archive.md, "What is archived of an image"): an archive of photos keeps
what a colour-managed viewer shows on a white page. EXIF orientation is applied; an
embedded ICC profile (Display P3 from phones, Adobe RGB, a gray gamma) is converted to
sRGB, the space of the restored files, which carry no profile (a wide-gamut colour outside
sRGB is clipped to its edge); grayscale is replicated to three channels; palette images
are expanded; alpha is composited onto white; CMYK goes through its profile if it has one,
else through Pillow's conversion; 16-bit and 32-bit integer images are scaled to 8 bits by
their type's range, float images are clipped to [0, 1]; of an animation only the first
frame is kept. An image with more pixels than the limit is refused before its pixels are
decoded (decompression bombs).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# File name endings read as images (case-insensitive). Here, not in pipeline.sources, so that
# training's image folder (pipeline.image_folder) imports neither Ray nor pyarrow.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 100_000_000  # 100 Mpx: above any camera photo, far below a bomb
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# The image modes whose pixels an ICC profile of each colour space describes.
PROFILE_MODES = {"RGB": ("RGB", "RGBA"), "GRAY": ("L", "LA"), "CMYK": ("CMYK",)}


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
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image too large: {width}x{height} exceeds the limit of {max_pixels} pixels")
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(_to_srgb(_expand_palette(image)))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image format") from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image too large: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from None


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


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return _gray_to_rgb(np.asarray(image, dtype=np.uint16).astype(np.float64) / 65535.0)
    if mode == "I":
        return _gray_to_rgb(np.asarray(image, dtype=np.int64).astype(np.float64) / 65535.0)
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
