"""A folder of photos at any fsspec URL: listing, decoding, and random training crops.

Training (jobs/train.py), evaluation (jobs/evaluate.py) and the benchmarks all read their
photos through :func:`load_images`, so they skip the same files for the same reasons.
"""

from __future__ import annotations

import fsspec
import numpy as np
import torch
from PIL import Image

from pipeline.images import IMAGE_EXTENSIONS, decode_image


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
            print(f"skipping {image_url}: {image.shape[1]}x{image.shape[0]} is below the {min_side} px minimum")
            continue
        images.append((image_url, image))
    return images


class RandomCrops:
    """Batches of random square crops (with random horizontal flips), images drawn by area.

    With ``min_scale < 1`` each crop is taken at a random scale, log-uniform in
    ``[min_scale, 1]``: a square of ``crop / scale`` pixels is cut and resized down to
    ``crop`` (Lanczos). Camera photos of 2-6k pixels are much smoother per pixel than the
    sub-megapixel images archives hold, so training only at full resolution teaches a
    model the wrong statistics; downscaling restores the detail density of smaller images.
    """

    def __init__(self, images: list[np.ndarray], crop: int, seed: int, min_scale: float = 1.0) -> None:
        if not images:
            raise ValueError("no training images")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        self.images, self.crop, self.min_scale = images, crop, min_scale
        areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> torch.Tensor:
        crops = []
        for index in self.rng.choice(len(self.images), size=size, p=self.weights):
            image = self.images[index]
            crop = self._crop(image, self._side(image))
            crops.append(crop[:, ::-1] if self.rng.random() < 0.5 else crop)
        array = np.ascontiguousarray(np.stack(crops))
        return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0

    def _side(self, image: np.ndarray) -> int:
        """Side of the square to cut: ``crop / scale``, never larger than the image."""
        if self.min_scale == 1.0:
            return self.crop
        scale = float(np.exp(self.rng.uniform(np.log(self.min_scale), 0.0)))
        return min(round(self.crop / scale), *image.shape[:2])

    def _crop(self, image: np.ndarray, side: int) -> np.ndarray:
        top = self.rng.integers(0, image.shape[0] - side + 1)
        left = self.rng.integers(0, image.shape[1] - side + 1)
        region = image[top:top + side, left:left + side]
        if side == self.crop:
            return region
        return np.asarray(Image.fromarray(region).resize((self.crop, self.crop), Image.Resampling.LANCZOS))
