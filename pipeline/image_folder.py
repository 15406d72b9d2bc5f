"""A folder of photos at any fsspec URL: listing and decoding.

Training (pipeline/train.py), evaluation (pipeline/evaluate.py) and the benchmarks all read their
photos through :func:`load_images`, so they skip the same files for the same reasons.
"""

from __future__ import annotations

import logging

import fsspec
import numpy as np

from pipeline.images import IMAGE_EXTENSIONS, decode_image

log = logging.getLogger(__name__)


def list_images(url: str, storage_options: dict | None = None) -> list[str]:
    """Every image file under a folder or prefix, recursively, as full URLs, sorted."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    paths = [p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {url}")
    return sorted(fs.unstrip_protocol(p) for p in paths)


def load_images(url: str, min_side: int, storage_options: dict | None = None) -> list[tuple[str, np.ndarray]]:
    """(URL, HxWx3 uint8) of every image under ``url``, sorted by URL.

    Images with a side below ``min_side`` (a training crop, LPIPS's smallest input) are
    skipped with a message naming them; callers decide whether an empty list is an error.
    """
    images = []
    for image_url in list_images(url, storage_options):
        with fsspec.open(image_url, "rb", **(storage_options or {})) as handle:
            image = decode_image(handle.read())
        if min(image.shape[:2]) < min_side:
            log.warning(f"skipping {image_url}: {image.shape[1]}x{image.shape[0]} is below the {min_side} px minimum")
            continue
        images.append((image_url, image))
    return images
