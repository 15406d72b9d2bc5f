"""The decode policy: every odd input becomes RGB uint8 or a clear reason."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import EpsImagePlugin, Image
from pillow_jxl import JpegXLImagePlugin

from icc_profiles import DISPLAY_P3_D50, SRGB_D50, gray_profile, rgb_profile
from pipeline.images import FORMATS, IMAGE_EXTENSIONS, SRGB, ImageDecodeError, decode_image
from pipeline.jxl import declared_size

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


# The formats people have -------------------------------------------------------------------


def _pattern(width: int = 12, height: int = 8) -> Image.Image:
    """A small deterministic RGB image whose corners differ, so that a flip or a transpose shows."""
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), np.full_like(xx, 90)], axis=2)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@pytest.mark.parametrize("fmt, options, mean_error", [
    ("HEIF", {"quality": 95, "chroma": 444}, 4),  # lossy; 4:2:0 chroma would smear this tiny pattern
    ("AVIF", {"quality": 95}, 4),
    ("JXL", {"lossless": True}, 0),
    ("JXL", {"quality": 95, "use_container": True}, 4),
    ("WEBP", {"lossless": True}, 0),
    ("JPEG2000", {"irreversible": False}, 0),
    ("GIF", {}, 4),  # a 256-colour palette
    ("PPM", {}, 0),
    ("TIFF", {"compression": "tiff_lzw"}, 0),
])
def test_the_formats_people_have_decode(fmt, options, mean_error):
    image = _pattern()
    pixels = decode_image(_encode(image, fmt, **options))
    assert pixels.shape == (8, 12, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - np.asarray(image, dtype=int)).mean() <= mean_error


@pytest.mark.parametrize("mode, expected", [("L", 77), ("1", 255)])
def test_pgm_and_pbm_decode(mode, expected):
    """PGM (P5) and PBM (P4), Pillow's PPM plugin under another name each."""
    pixels = decode_image(_encode(Image.new(mode, (5, 3), 77 if mode == "L" else 1), "PPM"))
    assert pixels.shape == (3, 5, 3) and np.all(pixels == expected)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_formats_go_through_the_colour_policy(fmt):
    """HEIC and AVIF photos carry Display P3 more often than any other format."""
    red = decode_image(_encode(Image.new("RGB", (8, 8), (220, 40, 40)), fmt, quality=95, icc_profile=P3))
    assert red[0, 0, 0] > 230 and red[0, 0, 1] < 30


def test_every_image_extension_is_an_allowed_format():
    registered = Image.registered_extensions()
    assert {extension: registered.get(extension) in FORMATS for extension in IMAGE_EXTENSIONS} == dict.fromkeys(
        IMAGE_EXTENSIONS, True)


def test_an_animated_gif_of_three_frames_keeps_the_first():
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((0, 200, 0), (255, 0, 0), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert np.all(decode_image(data) == (0, 200, 0))


# PNM: PAM and maxvals other than 255 -------------------------------------------------------


def _pam(width: int, height: int, depth: int, maxval: int, samples: np.ndarray, tuple_type: str) -> bytes:
    """A PAM file as netpbm's spec lays it out (Pillow has no PAM writer)."""
    dtype = ">u2" if maxval > 255 else "u1"
    header = (f"P7\n# written by the tests\nWIDTH {width}\nHEIGHT {height}\nDEPTH {depth}\nMAXVAL {maxval}\n"
              f"TUPLTYPE {tuple_type}\nENDHDR\n")
    return header.encode() + np.asarray(samples, dtype=dtype).tobytes()


def test_pam_rgb_alpha_is_composited_on_white():
    samples = np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [0, 0, 255, 128]]])
    pixels = decode_image(_pam(3, 1, 4, 255, samples, "RGB_ALPHA"))
    assert pixels[0].tolist() == [[255, 0, 0], [255, 255, 255], [127, 127, 255]]


def test_pam_sixteen_bit_gray_is_scaled_by_its_range():
    samples = np.array([[0, 32768, 65535]])
    pixels = decode_image(_pam(3, 1, 1, 65535, samples, "GRAYSCALE"))
    assert pixels[0, :, 0].tolist() == [0, 128, 255] and np.all(pixels[..., 0:1] == pixels)


def test_pam_gray_alpha_with_a_ten_bit_maxval():
    samples = np.array([[[1023, 1023], [0, 1023], [0, 0], [512, 1023]]])
    pixels = decode_image(_pam(4, 1, 2, 1023, samples, "GRAYSCALE_ALPHA"))
    assert pixels[0, :, 0].tolist() == [255, 0, 255, 128]


def test_pam_black_and_white():
    pixels = decode_image(_pam(2, 1, 1, 1, np.array([[0, 1]]), "BLACKANDWHITE"))
    assert pixels[0, :, 0].tolist() == [0, 255]


def test_sixteen_bit_ppm_and_pgm_are_scaled_by_their_maxval():
    rgb = np.array([[[65535, 0, 32768], [1000, 2000, 3000]]])
    header = b"P6\n2 1\n65535\n"
    pixels = decode_image(header + rgb.astype(">u2").tobytes())
    assert pixels.tolist() == [[[255, 0, 128], [4, 8, 12]]]
    gray = decode_image(b"P5\n3 1\n1000\n" + np.array([0, 500, 1000]).astype(">u2").tobytes())
    assert gray[0, :, 0].tolist() == [0, 128, 255]


def test_a_large_sixteen_bit_ppm_decodes_in_reasonable_time():
    """Pillow's own decoder for maxval != 255 is a per-sample Python loop: about 3 s per
    megapixel of 16-bit RGB, minutes for one camera-sized file."""
    width, height = 1000, 1000
    samples = np.random.default_rng(0).integers(0, 65536, (height, width, 3)).astype(">u2")
    data = b"P6\n%d %d\n65535\n" % (width, height) + samples.tobytes()
    started = time.perf_counter()
    pixels = decode_image(data)
    assert time.perf_counter() - started < 1.5
    expected = np.rint(samples.astype(np.float64) / 65535 * 255).astype(np.uint8)
    assert np.array_equal(pixels, expected)


@pytest.mark.parametrize("data, reason", [
    (b"P7\nWIDTH 2\nHEIGHT 1\nDEPTH 5\nMAXVAL 255\nENDHDR\n" + bytes(10), "depth 5"),
    (b"P7\nWIDTH 2\nHEIGHT 1\nDEPTH 4\nMAXVAL 255\nTUPLTYPE CMYK\nENDHDR\n" + bytes(8), "tuple type 'CMYK'"),
    (b"P7\nWIDTH 0\nHEIGHT 1\nDEPTH 1\nMAXVAL 255\nENDHDR\n", "WIDTH is '0'"),
    (b"P7\nWIDTH 2\nHEIGHT 1\nDEPTH 1\nMAXVAL 70000\nENDHDR\n" + bytes(4), "maxval 70000"),
    (b"P7\nWIDTH 2\n" + b"# a comment\n" * 400, "no ENDHDR within 4096 bytes"),
    (b"P7\nWIDTH 4\nHEIGHT 4\nDEPTH 3\nMAXVAL 255\nENDHDR\n" + bytes(20), "truncated"),
    (b"P7\nWIDTH 4\nHEIGHT 4\nDEPTH 3\nMAXVAL 4095\nENDHDR\n" + bytes(20), "truncated"),
])
def test_bad_pam_files_are_refused_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=f"corrupt or truncated image: .*{reason}"):
        decode_image(data)


# Integer depths --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, values, expected", [
    (np.uint32, [0, 2**31, 2**32 - 1, 2**24], [0, 128, 255, 1]),
    (np.int32, [-(2**31), 0, 2**30, 2**31 - 1], [0, 0, 128, 255]),
    (np.int16, [-32768, 0, 16384, 32767], [0, 0, 128, 255]),
    (np.uint16, [0, 256, 32768, 65535], [0, 1, 128, 255]),
])
def test_integer_tiffs_are_scaled_by_their_declared_type(dtype, values, expected):
    """Pillow opens 16-bit signed and 32-bit TIFFs alike as mode "I"; the file's
    BitsPerSample and SampleFormat say which range the values span."""
    data = io.BytesIO()
    tifffile.imwrite(data, np.array([values], dtype=dtype))
    assert decode_image(data.getvalue())[0, :, 0].tolist() == expected


def test_sixteen_bit_png_and_pgm_are_still_scaled_by_65535():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    png = _encode(Image.fromarray(values), "PNG")
    pgm = b"P5\n4 1\n65535\n" + values.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"  # the mode 32-bit TIFFs have too
    for data in (png, pgm):
        assert decode_image(data)[0, :, 0].tolist() == [0, 1, 128, 255]


# Only raster formats, and bombs refused before decoding ------------------------------------------


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PCX", "SGI", "TGA", "DDS", "QOI"])
def test_formats_outside_the_allowlist_are_refused_whatever_the_name(fmt, monkeypatch):
    """A PostScript file named photo.jpg must never reach Ghostscript (an interpreter of
    untrusted programs); other formats Pillow knows are not what an archive of photos takes."""
    used: list[str] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: used.append("Ghostscript"))
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: used.append("EpsImageFile"))
    data = _encode(Image.new("RGB", (8, 8), (10, 20, 30)), fmt)
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode_image(data)
    assert used == []


def test_jpeg_xl_size_is_read_from_its_header():
    for size in [(1, 1), (37, 5), (64, 48), (40, 30), (8, 800), (3000, 2), (4097, 33)]:
        for container in (False, True):
            data = _encode(Image.new("RGB", size, (1, 2, 3)), "JXL", use_container=container, effort=1)
            assert declared_size(data) == size == Image.open(io.BytesIO(data)).size


def test_a_jpeg_xl_bomb_is_refused_before_its_pixels_are_decoded(monkeypatch):
    """The plugin decodes every pixel while opening; the header's size is checked first."""
    data = _encode(Image.new("RGB", (1200, 1000), (5, 5, 5)), "JXL", effort=1)
    assert len(data) < 1000

    def decoder(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(JpegXLImagePlugin, "Decoder", decoder)
    with pytest.raises(ImageDecodeError, match="too large: 1200x1000"):
        decode_image(data, max_pixels=1_000_000)


def test_a_truncated_jpeg_xl_header_is_refused():
    data = _encode(Image.new("RGB", (30, 20)), "JXL", use_container=True)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated image: JPEG XL"):
        decode_image(data[:40])
