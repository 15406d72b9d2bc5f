"""LPIPS runs on the real ImageNet AlexNet backbone installed by scripts/install_lpips_weights.py.

Why: lpips silently depends on torchvision's pretrained backbone. With the wrong weights
(a random init, a mis-transposed port) the metric still returns numbers, only meaningless
ones, so these tests check behaviour that only the real backbone has.

The weights live in torch's hub cache, outside the repository; CI installs them during
setup. Without them the tests are skipped rather than letting torchvision try to download.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from matplotlib import cbook
from PIL import Image

ALEXNET_CHECKPOINT = (
    Path(torch.hub.get_dir())
    / "checkpoints"
    / Path(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url).name
)

pytestmark = [
    pytest.mark.skipif(
        not ALEXNET_CHECKPOINT.exists(),
        reason=f"ImageNet AlexNet weights not installed at {ALEXNET_CHECKPOINT}; "
        "run scripts/install_lpips_weights.py",
    ),
    # lpips 0.1.4 calls torchvision with the deprecated `pretrained=` argument.
    pytest.mark.filterwarnings("ignore::UserWarning:torchvision.models._utils"),
]

CROP = 256


def _to_lpips_input(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float in [-1, 1], the range lpips expects."""
    return torch.tensor(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip an image through JPEG at the given quality."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 256x256 crop (the face) of a real photograph shipped with matplotlib.

    matplotlib is installed as a dependency of compressai, so the photo is always there.
    """
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        image = np.asarray(Image.open(handle).convert("RGB"))
    return np.ascontiguousarray(image[100 : 100 + CROP, 128 : 128 + CROP])


@pytest.fixture(scope="module")
def lpips_alex() -> torch.nn.Module:
    import lpips

    return lpips.LPIPS(net="alex", verbose=False)


def _distance(metric: torch.nn.Module, a: np.ndarray, b: np.ndarray) -> float:
    with torch.no_grad():
        return metric(_to_lpips_input(a), _to_lpips_input(b)).item()


def test_identical_images_have_zero_distance(lpips_alex: torch.nn.Module) -> None:
    image = torch.rand(1, 3, CROP, CROP, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert lpips_alex(image, image).item() == 0.0


def test_distance_grows_as_jpeg_quality_drops(
    lpips_alex: torch.nn.Module, photo: np.ndarray
) -> None:
    distances = [_distance(lpips_alex, photo, _jpeg(photo, q)) for q in (90, 50, 10)]
    assert distances[0] < distances[1] < distances[2], distances
    # Heavy JPEG blocking is clearly visible: the real metric scores it well above noise
    # level (about 0.22 here), which a broken backbone does not.
    assert distances[2] > 0.1, distances


def test_pretrained_backbone_differs_from_random_one(
    lpips_alex: torch.nn.Module, photo: np.ndarray
) -> None:
    import lpips

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_backbone = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)
    degraded = _jpeg(photo, 10)
    real = _distance(lpips_alex, photo, degraded)
    random = _distance(random_backbone, photo, degraded)
    # Same linear heads, different backbone: ImageNet features respond far more strongly to
    # blocking artefacts than random ones (about 0.22 against 0.005 on this crop).
    assert abs(real - random) > 0.05, (real, random)
