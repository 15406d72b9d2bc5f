#!/usr/bin/env python3
"""Write a small held-out set of real photographs for evaluation, from installed packages.

Why: an evaluation set must be photographs the model never trained on, and must be
available offline on any machine with the project's dependencies. None of these is in the
training data (docs/training-data.md: Debian wallpaper packages).

- ``grace_hopper.jpg`` from matplotlib's sample data (512x600, US Navy photo, public
  domain), copied byte for byte. It is a JPEG already, so JPEG baselines re-encoding it
  near its original quality have an easy time; read JPEG's numbers on it with that in mind.
- With scikit-image installed (a pinned dependency): ``skimage.data``'s astronaut
  (512x512, NASA, public domain), chelsea (451x300, CC0), coffee (600x400, CC0), rocket
  (640x427, SpaceX, public domain; stored as JPEG inside scikit-image) and
  motorcycle_left (741x500, Middlebury 2014 stereo benchmark, downsampled), as PNG.

Usage::

    python scripts/heldout_photos.py --output DIR
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import cbook
from PIL import Image


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


def write_heldout_photos(output: Path) -> list[Path]:
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
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="directory to write the photos into")
    args = parser.parse_args(argv)
    for path in write_heldout_photos(args.output):
        print(path)


if __name__ == "__main__":
    main()
