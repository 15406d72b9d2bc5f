#!/usr/bin/env python3
"""Write the held-out set of real photographs for evaluation.

Why: an evaluation set must be photographs the model never trained on. None of these is in
the training data (docs/training-data.md: Debian wallpaper packages, and for the training
pack six more packages; its build refuses a photo that looks like one of the six below), and
docs/heldout-data.md lists each one with its source and licence.

From the project's own dependencies, available offline on any machine:

- ``grace_hopper.jpg`` from matplotlib's sample data (512x600, US Navy photo, public
  domain), copied byte for byte. It is a JPEG already, so JPEG baselines re-encoding it
  near its original quality have an easy time; read JPEG's numbers on it with that in mind.
- With scikit-image installed (a pinned dependency): ``skimage.data``'s astronaut
  (512x512, NASA, public domain), chelsea (451x300, CC0), coffee (600x400, CC0), rocket
  (640x427, SpaceX, public domain; stored as JPEG inside scikit-image) and
  motorcycle_left (741x500, Middlebury 2014 stereo benchmark, downsampled), as PNG.

With ``--debian`` (needs apt-get and dpkg-deb, like scripts/build_photo_dataset.py, whose
machinery it uses): four more from the Debian package ``libjxl-testdata`` (the JPEG XL
conformance images), copied byte for byte with a MANIFEST.csv of their licences — a flower
close-up (2268x1512, sRGB) by the JPEG XL Project Authors (BSD-3-clause) and three
500x500 sRGB photos from wesaturate (CC0). Six photos are too few to say which of two
close codecs wins; ten, from three sources and of 0.25 to 3.4 Mpx, are still few, but
more evidence.

Usage::

    python scripts/heldout_photos.py --output DIR [--debian]
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image

from build_photo_dataset import Package, build

# Each file was viewed and is a real photograph in sRGB. Left out: jxl/hdr_room.png (a
# photograph, but its pixels are HLG-encoded Rec. 2020, per its ICC profile), and the
# package's synthetic test patterns, 64 px crops and other colour encodings of these.
DEBIAN_PACKAGES = (
    Package(
        name="libjxl-testdata",
        install_root="usr/share/libjxl-testdata/",
        source_root="",
        photos=(
            "jxl/flower/flower.png",
            "external/wesaturate/500px/cvo9xd_keong_macan_srgb8.png",
            "external/wesaturate/500px/tmshre_riaphotographs_srgb8.png",
            "external/wesaturate/500px/u76c0g_bliznaca_srgb8.png",
        ),
    ),
)


def skimage_photos() -> dict[str, Callable[[], np.ndarray]]:
    """Name -> loader for scikit-image's bundled colour photographs; empty without scikit-image."""
    try:
        from skimage import data
    except ImportError:
        return {}
    return {
        "astronaut": data.astronaut,
        "chelsea": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "motorcycle_left": lambda: data.stereo_motorcycle()[0],
    }


def write_heldout_photos(output: Path, debian: bool = False) -> list[Path]:
    """Write every available held-out photo into ``output``; return the files written."""
    output.mkdir(parents=True, exist_ok=True)
    written = [output / "grace_hopper.jpg"]
    with cbook.get_sample_data("grace_hopper.jpg") as source, open(written[0], "wb") as target:
        shutil.copyfileobj(source, target)
    photos = skimage_photos()
    if not photos:
        print("scikit-image is not installed: only grace_hopper.jpg written")
    for name, load in photos.items():
        path = output / f"{name}.png"
        Image.fromarray(load()).save(path)
        written.append(path)
    if debian:
        build(output, DEBIAN_PACKAGES)
        written += [output / package.stored_name(photo) for package in DEBIAN_PACKAGES for photo in package.photos]
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="directory to write the photos into")
    parser.add_argument("--debian", action="store_true",
                        help="also the photos from Debian packages (needs apt-get and dpkg-deb)")
    args = parser.parse_args(argv)
    for path in write_heldout_photos(args.output, args.debian):
        print(path)


if __name__ == "__main__":
    main()
