"""Shared fixtures: a tiny randomly initialised codec (fast on two CPU cores) and images."""

from __future__ import annotations

import numpy as np
import pytest

from corrdiff import CorrDiffCodec, tiny_config


@pytest.fixture(scope="session")
def codec() -> CorrDiffCodec:
    return CorrDiffCodec.from_config(tiny_config(), seed=0, device="cpu")


@pytest.fixture(scope="session")
def other_codec() -> CorrDiffCodec:
    return CorrDiffCodec.from_config(tiny_config(), seed=1, device="cpu")


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour field with some texture: more like a photo than white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.zeros((height, width, 3))
    for c in range(3):
        fy, fx, phase = rng.uniform(0.01, 0.08, 2).tolist() + [rng.uniform(0, 6.28)]
        image[..., c] = 128 + 80 * np.sin(fy * yy + fx * xx + phase)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    return [smooth_image(h, w, seed=i) for i, (h, w) in enumerate([(1, 1), (37, 5), (333, 500), (64, 64)])]


@pytest.fixture(scope="session")
def encoded(codec: CorrDiffCodec, images: list[np.ndarray]):
    return codec.encode_detailed(images)


# Modules whose every test trains or evaluates a model, or runs a job on a Ray cluster of its own.
SLOW_MODULES = {"test_train", "test_device_train", "test_evaluate", "test_job_submit"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark as ``slow`` every test that starts Ray work (it uses the ``ray_local`` cluster,
    directly or through a fixture) or trains or evaluates a model: ``pytest -m "not slow"``
    is then the fast suite for development; CI runs everything."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()) or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


from s3 import s3_server  # noqa: F401,E402
from ray_fixture import ray_local  # noqa: F401,E402
from archives import tiny_model  # noqa: F401,E402
