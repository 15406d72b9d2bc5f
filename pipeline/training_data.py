"""Training images from any fsspec URL (a folder of photos) and random crops of them."""

from __future__ import annotations

import fsspec
import numpy as np
import torch

from pipeline.images import decode_image
from pipeline.sources import IMAGE_EXTENSIONS


def list_images(url: str, storage_options: dict | None = None) -> list[str]:
    """Every image file under a folder or prefix, recursively, as full URLs, sorted."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    paths = [p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {url}")
    return sorted(fs.unstrip_protocol(p) for p in paths)


def load_images(urls: list[str], min_side: int, storage_options: dict | None = None) -> list[np.ndarray]:
    """Decode every image; those smaller than a crop are skipped with a message."""
    images = []
    for url in urls:
        with fsspec.open(url, "rb", **(storage_options or {})) as handle:
            image = decode_image(handle.read())
        if min(image.shape[:2]) < min_side:
            print(f"skipping {url}: {image.shape[1]}x{image.shape[0]} is smaller than a {min_side}px crop")
            continue
        images.append(image)
    return images


class RandomCrops:
    """Batches of random square crops (with random horizontal flips), images drawn by area."""

    def __init__(self, images: list[np.ndarray], crop: int, seed: int) -> None:
        if not images:
            raise ValueError("no training images")
        self.images, self.crop = images, crop
        areas = np.array([im.shape[0] * im.shape[1] for im in images], dtype=np.float64)
        self.weights = areas / areas.sum()
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> torch.Tensor:
        crops = []
        for index in self.rng.choice(len(self.images), size=size, p=self.weights):
            image = self.images[index]
            top = self.rng.integers(0, image.shape[0] - self.crop + 1)
            left = self.rng.integers(0, image.shape[1] - self.crop + 1)
            crop = image[top:top + self.crop, left:left + self.crop]
            crops.append(crop[:, ::-1] if self.rng.random() < 0.5 else crop)
        array = np.ascontiguousarray(np.stack(crops))
        return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0
