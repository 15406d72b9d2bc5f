"""The decode policy: every odd input becomes RGB uint8 or a clear reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icc_profiles import DISPLAY_P3_D50, SRGB_D50, gray_profile, rgb_profile
from pipeline.images import SRGB, ImageDecodeError, decode_image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "photos"


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_real_photo_decodes_to_rgb():
    data = (EXAMPLES / "sunset.jpg").read_bytes()
    pixels = decode_image(data)
    assert pixels.dtype == np.uint8 and pixels.shape == (320, 480, 3)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    pixels = decode_image(_encode(image, "JPEG", exif=exif))
    assert pixels.shape == (40, 20, 3)


def test_grayscale_is_replicated():
    pixels = decode_image(_encode(Image.new("L", (5, 4), 77), "PNG"))
    assert pixels.shape == (4, 5, 3) and np.all(pixels == 77)


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    pixels = decode_image(_encode(image, "PNG"))
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[2, 2]) == (255, 255, 255)


def test_palette_with_transparency():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((1, 1), 1)
    pixels = decode_image(_encode(image, "PNG", transparency=0))
    assert tuple(pixels[1, 1]) == (10, 200, 30) and tuple(pixels[0, 0]) == (255, 255, 255)


def test_cmyk_is_converted():
    pixels = decode_image(_encode(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), "JPEG"))
    assert pixels.shape == (6, 6, 3) and pixels[0, 0, 0] > 200 and pixels[0, 0, 1] < 60


P3 = rgb_profile(DISPLAY_P3_D50, 2.2, "Display P3, gamma 2.2")


def _p3_to_srgb(values: np.ndarray) -> np.ndarray:
    """The conversion by its formulas, independently of littlecms: decode the gamma, P3 ->
    XYZ (D50) -> linear sRGB through the colorant matrices, clip to the gamut, sRGB curve."""
    linear = (values.astype(np.float64) / 255.0) ** 2.2
    srgb = np.clip(linear @ np.array(DISPLAY_P3_D50) @ np.linalg.inv(np.array(SRGB_D50)), 0.0, 1.0)
    encoded = np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)
    return np.round(encoded * 255.0).astype(np.uint8)


def test_display_p3_photo_is_converted_to_srgb():
    """A phone photo's P3 values read as sRGB would look washed out; the archive keeps the
    colours a colour-managed viewer shows."""
    photo = Image.open(EXAMPLES / "sunset.jpg").convert("RGB")
    untagged = decode_image(_encode(photo, "PNG"))
    pixels = decode_image(_encode(photo, "PNG", icc_profile=P3))
    expected = _p3_to_srgb(np.asarray(photo))
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(pixels.astype(int) - untagged.astype(int)).max() > 20  # the conversion matters on this photo
    red = decode_image(_encode(Image.new("RGB", (2, 2), (220, 40, 40)), "JPEG", quality=100, icc_profile=P3))
    assert red[0, 0, 0] > 230 and red[0, 0, 1] < 30  # more saturated in sRGB numbers: P3 red lies outside sRGB


def test_srgb_profile_and_broken_profiles_leave_the_values_as_they_are():
    photo = Image.open(EXAMPLES / "sunset.jpg").convert("RGB")
    untagged = decode_image(_encode(photo, "PNG"))
    for profile in (SRGB.tobytes(), b"not an ICC profile", gray_profile(1.0, "gray on RGB pixels")):
        assert np.array_equal(decode_image(_encode(photo, "PNG", icc_profile=profile)), untagged)


def test_gray_profile_is_applied_to_gray_pixels():
    linear_gray = gray_profile(1.0, "linear gray")
    pixels = decode_image(_encode(Image.new("L", (3, 2), 128), "PNG", icc_profile=linear_gray))
    assert pixels.shape == (2, 3, 3) and np.all(pixels == pixels[0, 0, 0])
    assert abs(int(pixels[0, 0, 0]) - 188) <= 1  # linear 0.502 in the sRGB curve


def test_profile_with_alpha_converts_colour_then_composites_on_white():
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((0, 0), (220, 40, 40, 255))
    pixels = decode_image(_encode(image, "PNG", icc_profile=P3))
    expected = _p3_to_srgb(np.array([[220, 40, 40]], dtype=np.uint8))[0]
    assert np.abs(pixels[0, 0].astype(int) - expected.astype(int)).max() <= 2
    assert tuple(pixels[0, 1]) == (255, 255, 255)


def test_palette_colours_go_through_the_profile():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 220, 40, 40] + [0] * 762)
    image.putpixel((1, 1), 1)
    pixels = decode_image(_encode(image, "PNG", transparency=0, icc_profile=P3))
    expected = _p3_to_srgb(np.array([[220, 40, 40]], dtype=np.uint8))[0]
    assert np.abs(pixels[1, 1].astype(int) - expected.astype(int)).max() <= 2
    assert tuple(pixels[0, 0]) == (255, 255, 255)


def test_sixteen_bit_is_scaled_to_eight():
    image = Image.fromarray(np.full((3, 3), 128 * 257, dtype=np.uint16))  # 8-bit 128 in 16 bits
    pixels = decode_image(_encode(image, "PNG"))
    assert np.all(pixels == 128)


def test_animation_keeps_the_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert tuple(decode_image(data)[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is not an image", "not a recognised image format"),
])
def test_garbage_is_refused(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_photo_is_refused():
    data = (EXAMPLES / "life.jpg").read_bytes()
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 3])


def test_pixel_limit_refuses_before_decoding():
    data = _encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageDecodeError, match="too large: 300x200"):
        decode_image(data, max_pixels=50_000)
    assert decode_image(data, max_pixels=60_000).shape == (200, 300, 3)
