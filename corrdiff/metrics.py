"""Image quality and rate metrics on HxWx3 uint8 arrays, shared by evaluation, audit and pipeline.

One definition of each metric for the whole project, so that a number in an evaluation
report, an audit and an archive's quality column means the same thing:

- :func:`psnr`: over all three RGB channels at once, peak 255 (8-bit). No colour
  conversion (many papers quote PSNR on Y only, which reads higher).
- :func:`ms_ssim`: pytorch-msssim's MS-SSIM (5 scales, 11-tap Gaussian window,
  data range 255, mean of the RGB channels). Its five scales need both sides > 160 px,
  so smaller images get ``None`` rather than an exception or a made-up number.
- :class:`LPIPS`: the ``lpips`` package with its real ImageNet backbone (installed
  offline by ``scripts/install_lpips_weights.py``). Lower is better; 0 for identical.
  :meth:`LPIPS.reference` keeps one original's features to score many reconstructions.
- :class:`DISTS`: the ``DISTS_pytorch`` package's network and learned weights on the same
  VGG16 backbone as LPIPS-vgg; a perceptual opinion that nothing here trains on. Lower is
  better; 0 for identical. Also has :meth:`DISTS.reference`.
- :func:`bits_per_pixel`: the rate of a stored object, over the image's own pixels.

Each function takes two arrays of the same shape, one image pair at a time. PSNR computes
in float64; MS-SSIM in float32 on the CPU (float64 agrees to about 1e-7 and is about nine
times slower); LPIPS and DISTS run their networks in float32 on the device they are given.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pytorch_msssim import ms_ssim as _ms_ssim

PEAK = 255.0
MS_SSIM_MIN_SIDE = 161  # pytorch-msssim asserts min(H, W) > (win_size - 1) * 2**4 = 160

LpipsNet = Literal["alex", "vgg"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two HxWx3 uint8 images over all RGB values; ``inf`` if they are identical."""
    _check_pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(PEAK**2 / mse)


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM of two HxWx3 uint8 images (1.0 for identical), or ``None`` if a side is <= 160 px.

    MS-SSIM downsamples four times and still needs a full 11-tap window at the coarsest
    scale, so it is undefined for images whose smaller side is 160 px or less; ``None``
    says "not measurable", which callers must not average as a number.
    """
    _check_pair(a, b)
    if min(a.shape[:2]) < MS_SSIM_MIN_SIDE:
        return None
    value = _ms_ssim(_to_nchw(a), _to_nchw(b), data_range=PEAK, size_average=True)
    return float(value)


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
    """Rate of ``num_bytes`` stored bytes (headers included) for a ``height`` x ``width`` image."""
    if height < 1 or width < 1:
        raise ValueError(f"empty image {height}x{width}")
    return 8.0 * num_bytes / (height * width)


def lpips_backbone_path(net: LpipsNet) -> Path:
    """Where torchvision looks for the ImageNet backbone that ``lpips.LPIPS(net=...)`` loads."""
    import torchvision

    weights = {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}[net]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.IMAGENET1K_V1.url).name


class FeatureMetric(ABC):
    """A distance computed from two images' deep features.

    Two faces over one computation: on uint8 arrays (scoring; the original's features can
    be kept with :meth:`reference` to score many reconstructions for one network pass
    each), and on tensors in [-1, 1] (:meth:`features`, :meth:`distance`), differentiable
    in the image, which the encoder's perceptual gamma fit and phase-2 training use. The
    networks' own parameters are frozen: gradients reach the image only.
    """

    name: str
    min_side: int
    device: torch.device

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        """The distance >= 0, lower is more similar; raises ``ValueError`` below :attr:`min_side`."""
        _check_pair(a, b)
        return self.reference(a)(b)

    def reference(self, original: np.ndarray) -> "MetricReference":
        """The distance to ``original``, whose features are computed once: scoring many
        reconstructions of one image (an evaluation's decode modes, baselines and curve
        points) then costs one backbone pass each instead of two, which on a 3 Mpx photo
        and VGG is about 40 s saved per score on a CPU core."""
        _check_image("original", original)
        if min(original.shape[:2]) < self.min_side:
            raise ValueError(f"{self.name} needs both sides >= {self.min_side} px, "
                             f"got {original.shape[1]}x{original.shape[0]}")
        return MetricReference(self, original, self._image_features(original))

    @torch.no_grad()
    def _image_features(self, image: np.ndarray) -> list[torch.Tensor]:
        return self.features((_to_nchw(image) / 127.5 - 1.0).to(self.device))

    @abstractmethod
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What the distance needs of (B, 3, H, W) images in [-1, 1]."""

    @abstractmethod
    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """The distance per image (B,) between two batches' features."""


class MetricReference:
    """:meth:`FeatureMetric.reference`: the metric of any same-shape image against one original."""

    def __init__(self, metric: FeatureMetric, original: np.ndarray, features: list[torch.Tensor]) -> None:
        self._metric, self._original, self._features = metric, original, features

    def __call__(self, reconstruction: np.ndarray) -> float:
        _check_pair(self._original, reconstruction)
        with torch.no_grad():
            return float(self._metric.distance(self._features, self._metric._image_features(reconstruction)).item())


class LPIPS(FeatureMetric):
    """LPIPS distance between two HxWx3 uint8 images: the model is loaded once, reused per call.

    Without its ImageNet backbone in torch's cache, ``lpips`` would try to download it
    (impossible on our machines) or, worse, run on the wrong weights; the constructor
    therefore checks for the file first and names the script that installs it.
    Images need both sides >= :attr:`min_side` (the backbone's pooling stack; measured).
    """

    _MIN_SIDE: dict[str, int] = {"alex": 31, "vgg": 16}

    def __init__(self, net: LpipsNet = "alex", device: str | torch.device = "cpu") -> None:
        import lpips

        _require_backbone(net, f"LPIPS-{net}")
        self.net = net
        self.name = f"LPIPS-{net}"
        self.min_side = self._MIN_SIDE[net]
        self.device = torch.device(device)
        with warnings.catch_warnings():
            # lpips 0.1.4 passes torchvision the deprecated `pretrained=` argument.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
            self.model = lpips.LPIPS(net=net, verbose=False).to(self.device).eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's unit-normalised activations at each LPIPS layer (``lpips.LPIPS.forward``'s
        first half: its scaling layer, the backbone, ``normalize_tensor``)."""
        import lpips

        return [lpips.normalize_tensor(out) for out in self.model.net(self.model.scaling_layer(x))]

    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """``lpips.LPIPS.forward``'s second half: learned per-channel weights on the squared
        feature differences, averaged over space, summed over layers."""
        import lpips

        layers = zip(self.model.lins, a, b, strict=True)
        return sum(lpips.spatial_average(lin((fa - fb) ** 2), keepdim=True) for lin, fa, fb in layers).flatten()


class DISTS(FeatureMetric):
    """DISTS (Ding et al., *Image Quality Assessment: Unifying Structure and Texture
    Similarity*, TPAMI 2020) between two HxWx3 uint8 images, at full resolution.

    Why a third perceptual metric: LPIPS-alex and LPIPS-vgg disagree on CorrDiff against
    JPEG (docs/models.md), and LPIPS-alex is also what training and perceptual mode
    optimise. DISTS compares VGG16 feature *statistics* (means for texture, correlations
    for structure) after L2 pooling, so it is tolerant of resampled texture and is not a
    per-position feature difference like either LPIPS; nothing in this project trains on it.

    The network is the ``DISTS_pytorch`` package's (its VGG16 with L2 pooling, the same
    ImageNet VGG16 backbone that LPIPS-vgg loads from torch's cache); its learned weights
    alpha and beta are read from the package's own ``weights.pt``. The package's
    ``DISTS.forward`` is split here into features and distance, as for LPIPS, so an
    original's features are kept; a test checks the value against the package's.
    The package resizes nothing by default and neither does this class.
    """

    min_side = 1
    name = "DISTS"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        from importlib.resources import files

        from DISTS_pytorch import DISTS as DistsNetwork

        _require_backbone("vgg", "DISTS")
        self.device = torch.device(device)
        with warnings.catch_warnings(), torch.random.fork_rng():  # its alpha/beta init draws from torch's RNG
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
            self.model = DistsNetwork(load_weights=False)
        learned = torch.load(files("DISTS_pytorch") / "weights.pt", map_location="cpu", weights_only=True)
        self.model.alpha.data, self.model.beta.data = learned["alpha"], learned["beta"]
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        total = self.model.alpha.sum() + self.model.beta.sum()
        channels = self.model.chns
        self._alpha = torch.split(self.model.alpha.detach() / total, channels, dim=1)
        self._beta = torch.split(self.model.beta.detach() / total, channels, dim=1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The images in [0, 1] and the five VGG stages' activations (``DISTS.forward_once``)."""
        return self.model.forward_once((x + 1.0) / 2.0)

    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """``DISTS.forward``'s second half: per channel, a texture term from the two feature
        maps' spatial means and a structure term from their covariance, weighted by alpha
        and beta (normalised to sum to 1) and subtracted from 1."""
        c1 = c2 = 1e-6
        similarity = torch.zeros(a[0].shape[0], device=a[0].device)
        for alpha, beta, fa, fb in zip(self._alpha, self._beta, a, b, strict=True):
            mean_a, mean_b = fa.mean([2, 3], keepdim=True), fb.mean([2, 3], keepdim=True)
            texture = (2 * mean_a * mean_b + c1) / (mean_a**2 + mean_b**2 + c1)
            var_a = ((fa - mean_a) ** 2).mean([2, 3], keepdim=True)
            var_b = ((fb - mean_b) ** 2).mean([2, 3], keepdim=True)
            covariance = (fa * fb).mean([2, 3], keepdim=True) - mean_a * mean_b
            structure = (2 * covariance + c2) / (var_a + var_b + c2)
            similarity = similarity + (alpha * texture).sum([1, 2, 3]) + (beta * structure).sum([1, 2, 3])
        return 1.0 - similarity


PERCEPTUAL_METRICS: tuple[str, ...] = ("lpips-alex", "lpips-vgg", "dists")


def perceptual_metric(name: str, device: str | torch.device = "cpu") -> FeatureMetric:
    """A feature metric by its name in :data:`PERCEPTUAL_METRICS` (configs and flags use these)."""
    if name == "dists":
        return DISTS(device=device)
    if name in ("lpips-alex", "lpips-vgg"):
        return LPIPS(name.removeprefix("lpips-"), device=device)  # type: ignore[arg-type]
    raise ValueError(f"unknown perceptual metric {name!r}; choose one of {', '.join(PERCEPTUAL_METRICS)}")


def _require_backbone(net: LpipsNet, metric: str) -> None:
    """Fail with the fix, not with a download attempt or random weights, when the ImageNet
    backbone is missing from torch's cache."""
    backbone = lpips_backbone_path(net)
    if not backbone.is_file():
        raise FileNotFoundError(f"{metric} needs its ImageNet backbone at {backbone}; run scripts/install_lpips_weights.py")


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    _check_image("a", a)
    _check_image("b", b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")


def _check_image(name: str, x: np.ndarray) -> None:
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"{name}: expected an HxWx3 uint8 array, got {x.dtype} {x.shape}")


def _to_nchw(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float32 in [0, 255]."""
    return torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]  # a copy: inputs may be read-only
