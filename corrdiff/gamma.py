"""Fitting the per-step correction factor gamma_t at the encoder, which sees the original.

At each sampler step the corrected estimate is x0_tilde(g) = x0_theta + g (x_e - x0_theta).
For M = MSE the best g has a closed form (a 1-D least-squares projection). A perceptual
term, if given, is then minimised by a few Adam steps on the scalar, starting from the
closed form and keeping the best value seen, so it can only improve the objective.
The chosen g is rounded to float16, the value that is transmitted, and the encoder goes on
with that rounded value so that its trajectory is exactly the decoder's.

The perceptual term is any :class:`corrdiff.metrics.FeatureMetric` (LPIPS-alex, LPIPS-vgg,
DISTS). The original does not change while its sampler runs, so its features are computed
once per image (:meth:`GammaFitter.bind`), not at each Adam step of each sampler step:
that halves the backbone passes of the fit.

An image with a side below the metric's :attr:`~corrdiff.metrics.FeatureMetric.min_side`
(LPIPS-alex: 31 px) cannot be seen by it: the backbone's kernels and pools are larger than
the image. Such an image keeps the closed-form MSE gamma at every step, as in the default
mode; scoring its padded tensor instead would steer gamma by pixels the decoder crops away.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from corrdiff.metrics import FeatureMetric

FLOAT16_MAX = 65504.0

# (x0_tilde, x) -> per-image loss (B,); both images in [-1, 1] (phase-2 training's loss).
PerceptualLoss = Callable[[Tensor, Tensor], Tensor]


def correct(x0_theta: Tensor, x_e: Tensor, gamma: Tensor) -> Tensor:
    """x0_tilde = x0_theta + gamma (x_e - x0_theta), one gamma per image."""
    return x0_theta + gamma.view(-1, 1, 1, 1).to(x0_theta.dtype) * (x_e - x0_theta)


def closed_form_gamma(x: Tensor, x0_theta: Tensor, x_e: Tensor, mask: Tensor) -> Tensor:
    """argmin_g of the masked MSE of x0_tilde(g) against x, per image, in float64.

    g* = <x - x0_theta, x_e - x0_theta> / ||x_e - x0_theta||^2 over the valid pixels.
    Where x_e and x0_theta coincide every g gives the same result; we take g = 1 (x_e).
    """
    direction = ((x_e - x0_theta) * mask).double()
    residual = ((x - x0_theta) * mask).double()
    num = (residual * direction).flatten(1).sum(1)
    den = (direction * direction).flatten(1).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(den))


def quantize_gamma(gamma: Tensor) -> Tensor:
    """Round to the transmitted float16 value (finite, saturating), returned as float32."""
    gamma = torch.nan_to_num(gamma.double(), nan=1.0).clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return gamma.to(torch.float16).to(torch.float32)


def masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """Per-image mean squared error over the valid (unpadded) pixels."""
    squared = ((a - b) ** 2 * mask).flatten(1).sum(1)
    return squared / (mask.flatten(1).sum(1) * a.shape[1])


@dataclass(frozen=True)
class GammaFitter:
    """How gamma_t is chosen per image: closed-form MSE, optionally refined for a perceptual term."""

    perceptual: FeatureMetric | None = None
    perceptual_weight: float = 0.0
    refine_steps: int = 10
    learning_rate: float = 0.1

    @property
    def refines(self) -> bool:
        return self.perceptual is not None and self.perceptual_weight > 0 and self.refine_steps > 0

    def bind(self, x: Tensor, mask: Tensor) -> OriginalFit:
        """The fit against these originals (B, 3, H, W) in [-1, 1], for every step of their sampler."""
        return OriginalFit(self, x.detach(), mask)


class OriginalFit:
    """:meth:`GammaFitter.bind`: (x0_theta, x_e) -> the transmitted gamma per image (B,).

    The perceptual term sees each image's own pixels only: like the MSE term, it must not
    be steered by the replicated padding (which is bottom/right). An image smaller than the
    metric's ``min_side`` is not refined (module docstring): its gamma is the closed form."""

    def __init__(self, fitter: GammaFitter, x: Tensor, mask: Tensor) -> None:
        self.fitter, self.x, self.mask = fitter, x, mask
        valid = mask[:, 0] > 0
        self.sizes = [(int(v.any(1).sum()), int(v.any(0).sum())) for v in valid]
        min_side = fitter.perceptual.min_side if fitter.refines else None
        # Per image: whether the perceptual metric can see it (and so whether it is refined).
        self.visible = [min_side is not None and min(h, w) >= min_side for h, w in self.sizes]
        self.references: dict[int, list[Tensor]] = {}
        if any(self.visible):
            with torch.no_grad():
                self.references = {i: fitter.perceptual.features(x[i:i + 1, :, :h, :w])
                                   for i, (h, w) in enumerate(self.sizes) if self.visible[i]}

    def __call__(self, x0_theta: Tensor, x_e: Tensor) -> Tensor:
        gamma = closed_form_gamma(self.x, x0_theta, x_e, self.mask).float()
        if any(self.visible):
            refined = self._refine(gamma, x0_theta.detach(), x_e.detach())
            visible = torch.tensor(self.visible, device=gamma.device)
            gamma = torch.where(visible, refined, gamma)  # the unseen keep the closed form exactly
        return quantize_gamma(gamma)

    def objective(self, gamma: Tensor, x0_theta: Tensor, x_e: Tensor) -> Tensor:
        """M(gamma) per image: masked MSE plus the weighted perceptual term (zero for an
        image the metric cannot see)."""
        x0 = correct(x0_theta, x_e, gamma)
        loss = masked_mse(x0, self.x, self.mask)
        if self.references:
            metric = self.fitter.perceptual
            perceptual = torch.cat([
                metric.distance(metric.features(x0[i:i + 1, :, :h, :w]), self.references[i]) if i in self.references
                else torch.zeros(1, dtype=loss.dtype, device=loss.device)
                for i, (h, w) in enumerate(self.sizes)])
            loss = loss + self.fitter.perceptual_weight * perceptual
        return loss

    def _refine(self, gamma: Tensor, x0_theta: Tensor, x_e: Tensor) -> Tensor:
        """Adam on the scalars from the closed form; the best value seen wins. Each step's
        loss is the objective at the value before that step, so each value is scored once."""
        param = gamma.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([param], lr=self.fitter.learning_rate)
        best, best_loss = gamma.clone(), torch.full_like(gamma, float("inf"))
        with torch.enable_grad():
            for _ in range(self.fitter.refine_steps):
                optimizer.zero_grad()
                loss = self.objective(param, x0_theta, x_e)
                best, best_loss = _keep_better(param.detach(), loss.detach(), best, best_loss)
                loss.sum().backward()  # images are independent: the sum's gradient is per image
                optimizer.step()
        with torch.no_grad():
            final = param.detach()
            best, _ = _keep_better(final, self.objective(final, x0_theta, x_e), best, best_loss)
        return best


def _keep_better(value: Tensor, loss: Tensor, best: Tensor, best_loss: Tensor) -> tuple[Tensor, Tensor]:
    better = loss < best_loss
    return torch.where(better, value, best), torch.where(better, loss, best_loss)


def perceptual_loss(metric: FeatureMetric) -> PerceptualLoss:
    """A feature metric as a training loss: (B,3,H,W) tensors in [-1, 1] -> per-image loss (B,)."""
    return lambda x0_tilde, x: metric.distance(metric.features(x0_tilde), metric.features(x))


def perceptual_fitter(metric: FeatureMetric, refine_steps: int, learning_rate: float,
                      weight: float = 1.0) -> GammaFitter:
    """The encoder's perceptual fit: closed form, then ``refine_steps`` Adam steps on
    MSE + ``weight`` * ``metric``. The weight barely matters (Adam's step ignores the gradient's
    scale and the MSE gradient is zero at the closed form); steps and rate set how far gamma
    may move (docs/method.md)."""
    return GammaFitter(perceptual=metric, perceptual_weight=weight, refine_steps=refine_steps,
                       learning_rate=learning_rate)
