"""The shared metrics: PSNR and rate by their formulas, MS-SSIM's size limit, LPIPS's behaviour.

Why: evaluation, audit and the archive's quality columns all report these numbers, so a
wrong peak, a silently padded small image or a backbone with the wrong weights would make
every report wrong at once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image

from conftest import smooth_image
from corrdiff.baselines import decode_classic, encode_classic
from corrdiff.metrics import (
    DISTS, LPIPS, PERCEPTUAL_METRICS, bits_per_pixel, lpips_backbone_path, ms_ssim, perceptual_metric, psnr,
)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 256x256 crop (the face) of the real photograph that matplotlib ships."""
    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        image = np.asarray(Image.open(handle).convert("RGB"))
    return np.ascontiguousarray(image[100:356, 128:384])


def test_psnr_of_identical_images_is_infinite() -> None:
    image = smooth_image(40, 30)
    assert psnr(image, image.copy()) == math.inf


def test_psnr_of_a_uniform_shift_matches_the_formula() -> None:
    image = np.clip(smooth_image(40, 30), 0, 250).astype(np.uint8)
    shifted = image + np.uint8(5)  # every RGB value off by 5: MSE = 25
    assert psnr(image, shifted) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-12)


def test_metrics_refuse_mismatched_or_non_rgb_inputs() -> None:
    with pytest.raises(ValueError, match="shape"):
        psnr(smooth_image(8, 8), smooth_image(8, 9))
    with pytest.raises(ValueError, match="uint8"):
        psnr(smooth_image(8, 8).astype(np.float32), smooth_image(8, 8))


def test_ms_ssim_is_undefined_up_to_160_pixels_a_side() -> None:
    small = smooth_image(160, 300)
    assert ms_ssim(small, small) is None
    large = smooth_image(161, 300)
    assert ms_ssim(large, large) == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_drops_with_damage(photo: np.ndarray) -> None:
    damaged = decode_classic(encode_classic(photo, "jpeg", 10))
    assert 0.0 < ms_ssim(photo, damaged) < 0.99


def test_bits_per_pixel_counts_every_byte() -> None:
    assert bits_per_pixel(1000, 100, 80) == 1.0
    with pytest.raises(ValueError):
        bits_per_pixel(10, 0, 5)


lpips_weights = pytest.mark.skipif(
    not lpips_backbone_path("alex").is_file(),
    reason="ImageNet AlexNet weights not installed; run scripts/install_lpips_weights.py",
)


@pytest.fixture(scope="module")
def lpips_alex() -> LPIPS:
    return LPIPS("alex")


@lpips_weights
def test_lpips_of_identical_images_is_zero(lpips_alex: LPIPS, photo: np.ndarray) -> None:
    assert lpips_alex(photo, photo.copy()) == 0.0


@lpips_weights
def test_lpips_grows_with_jpeg_damage(lpips_alex: LPIPS, photo: np.ndarray) -> None:
    distances = [lpips_alex(photo, decode_classic(encode_classic(photo, "jpeg", q))) for q in (90, 50, 10)]
    assert distances[0] < distances[1] < distances[2], distances
    assert distances[2] > 0.1, distances  # heavy blocking is far above noise for the real backbone


@lpips_weights
def test_lpips_refuses_images_below_its_minimum(lpips_alex: LPIPS) -> None:
    assert lpips_alex.min_side == 31
    image = smooth_image(lpips_alex.min_side, 64)
    assert lpips_alex(image, image) == 0.0
    with pytest.raises(ValueError, match="31 px"):
        lpips_alex(image[:30], image[:30])


@lpips_weights
def test_lpips_against_a_kept_reference_is_the_lpips_package_value(lpips_alex: LPIPS, photo: np.ndarray) -> None:
    """The cached-features path (what evaluation uses to score many reconstructions of one
    photo) must give the ``lpips`` package's own number, not an approximation of it."""
    import torch

    reference = lpips_alex.reference(photo)
    for quality in (80, 20, 5):
        damaged = decode_classic(encode_classic(photo, "jpeg", quality))
        scaled = [torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1.0 for x in (photo, damaged)]
        with torch.no_grad():
            expected = float(lpips_alex.model(*scaled).item())
        assert reference(damaged) == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert lpips_alex(photo, damaged) == reference(damaged)
    with pytest.raises(ValueError, match="shape"):
        reference(photo[:100])


@lpips_weights
def test_lpips_runs_on_the_real_imagenet_backbone(lpips_alex: LPIPS, photo: np.ndarray) -> None:
    """lpips depends silently on torchvision's pretrained AlexNet: with a random or
    mis-ported backbone it still returns numbers, only meaningless ones. Same linear heads,
    a random backbone: ImageNet features respond far more strongly to JPEG blocking (about
    0.22 against 0.005 on this crop)."""
    import lpips
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        random_backbone = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)
    damaged = decode_classic(encode_classic(photo, "jpeg", 10))
    scaled = [torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1.0 for x in (photo, damaged)]
    with torch.no_grad():
        random = float(random_backbone(*scaled).item())
    assert abs(lpips_alex(photo, damaged) - random) > 0.05, (lpips_alex(photo, damaged), random)


vgg_weights = pytest.mark.skipif(
    not lpips_backbone_path("vgg").is_file(),
    reason="ImageNet VGG16 weights not installed; run scripts/install_lpips_weights.py",
)


@pytest.fixture(scope="module")
def dists() -> DISTS:
    return DISTS()


@vgg_weights
def test_dists_is_zero_for_identical_images_and_grows_with_jpeg_damage(dists: DISTS, photo: np.ndarray) -> None:
    assert dists(photo, photo.copy()) == pytest.approx(0.0, abs=1e-6)
    distances = [dists(photo, decode_classic(encode_classic(photo, "jpeg", q))) for q in (90, 50, 10)]
    assert 0.0 < distances[0] < distances[1] < distances[2], distances


@vgg_weights
def test_dists_is_the_dists_package_value_with_its_learned_weights(dists: DISTS, photo: np.ndarray) -> None:
    """The split into kept features and a distance must give the package's own number, with
    the weights the package itself loads; random alpha/beta (the package's initialisation
    before loading) give a different value, so the learned ones are what counts."""
    import torch
    from DISTS_pytorch import DISTS as DistsNetwork

    damaged = decode_classic(encode_classic(photo, "jpeg", 10))
    tensors = [torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0 for x in (photo, damaged)]
    expected = float(DistsNetwork()(*tensors).item())
    assert dists.reference(photo)(damaged) == pytest.approx(expected, rel=1e-5)
    assert abs(float(DistsNetwork(load_weights=False)(*tensors).item()) - expected) > 0.01


@vgg_weights
@pytest.mark.parametrize("name", PERCEPTUAL_METRICS)
def test_tensor_face_scores_like_the_array_face_and_passes_gradients_to_the_image(name: str, photo: np.ndarray) -> None:
    """What the encoder's gamma fit differentiates is the metric that scores: same value
    from tensors in [-1, 1] as from uint8 arrays, a gradient on the image, none on the network."""
    import torch

    metric = perceptual_metric(name)
    assert metric.name.lower() == name  # how corrdiff.evaluation.Scorer finds its loaded copy
    crop = photo[:96, :128]
    damaged = decode_classic(encode_classic(crop, "jpeg", 10))
    a, b = (torch.tensor(x, dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1.0 for x in (crop, damaged))
    b.requires_grad_(True)
    value = metric.distance(metric.features(a), metric.features(b))
    assert value.shape == (1,)
    assert value.item() == pytest.approx(metric(crop, damaged), rel=1e-5)
    value.sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert all(p.grad is None for p in metric.model.parameters())


def test_perceptual_metric_names_the_choices_for_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="lpips-alex, lpips-vgg, dists"):
        perceptual_metric("ssim")
