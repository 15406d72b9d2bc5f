"""Fitting the per-step correction factor gamma_t at the encoder, which sees the original.

At each sampler step the corrected estimate is x0_tilde(g) = x0_theta + g (x_e - x0_theta).
For M = MSE the best g has a closed form (a 1-D least-squares projection). A perceptual
term, if given, is then minimised by a few Adam steps on the scalar, starting from the
closed form and keeping the best value seen, so it can only improve the objective.
The chosen g is rounded to float16, the value that is transmitted, and the encoder goes on
with that rounded value so that its trajectory is exactly the decoder's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from corrdiff.metrics import LPIPS

FLOAT16_MAX = 65504.0

# (x0_tilde, x) -> per-image loss (B,); both images in [-1, 1], as LPIPS expects.
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


@dataclass
class GammaFitter:
    """Chooses gamma_t per image: closed-form MSE, optionally refined for a perceptual term."""

    perceptual: PerceptualLoss | None = None
    perceptual_weight: float = 0.0
    refine_steps: int = 10
    learning_rate: float = 0.1

    def objective(self, gamma: Tensor, x: Tensor, x0_theta: Tensor, x_e: Tensor, mask: Tensor) -> Tensor:
        """M(gamma) per image: masked MSE plus the weighted perceptual term."""
        x0 = correct(x0_theta, x_e, gamma)
        loss = masked_mse(x0, x, mask)
        if self.perceptual is not None and self.perceptual_weight > 0:
            loss = loss + self.perceptual_weight * self._perceptual(x0, x, mask)
        return loss

    def _perceptual(self, x0: Tensor, x: Tensor, mask: Tensor) -> Tensor:
        """The perceptual term per image, on the image's own pixels: like the MSE term, it
        must not be steered by the replicated padding (which is bottom/right)."""
        losses = []
        for i in range(x.shape[0]):
            valid = mask[i, 0] > 0
            height, width = int(valid.any(1).sum()), int(valid.any(0).sum())
            losses.append(self.perceptual(x0[i:i + 1, :, :height, :width], x[i:i + 1, :, :height, :width]))
        return torch.cat(losses)

    def __call__(self, x: Tensor, x0_theta: Tensor, x_e: Tensor, mask: Tensor) -> Tensor:
        gamma = closed_form_gamma(x, x0_theta, x_e, mask).float()
        if self.perceptual is not None and self.perceptual_weight > 0 and self.refine_steps > 0:
            gamma = self._refine(gamma, x, x0_theta, x_e, mask)
        return quantize_gamma(gamma)

    def _refine(self, gamma: Tensor, x: Tensor, x0_theta: Tensor, x_e: Tensor, mask: Tensor) -> Tensor:
        x, x0_theta, x_e = x.detach(), x0_theta.detach(), x_e.detach()
        param = gamma.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([param], lr=self.learning_rate)
        with torch.enable_grad():
            best = gamma.clone()
            best_loss = self.objective(best, x, x0_theta, x_e, mask).detach()
            for _ in range(self.refine_steps):
                optimizer.zero_grad()
                loss = self.objective(param, x, x0_theta, x_e, mask)
                loss.sum().backward()  # images are independent: the sum's gradient is per image
                optimizer.step()
                current = self.objective(param.detach(), x, x0_theta, x_e, mask).detach()
                better = current < best_loss
                best = torch.where(better, param.detach(), best)
                best_loss = torch.where(better, current, best_loss)
        return best


def lpips_loss(lpips: LPIPS) -> PerceptualLoss:
    """LPIPS as the perceptual term: (B,3,H,W) tensors in [-1, 1] -> per-image loss (B,)."""
    lpips.model.requires_grad_(False)  # gradients flow to gamma only
    return lambda x0_tilde, x: lpips.model(x0_tilde, x).flatten()


def lpips_fitter(lpips: LPIPS, refine_steps: int, learning_rate: float, weight: float = 1.0) -> GammaFitter:
    """The encoder's perceptual fit: closed form, then ``refine_steps`` Adam steps on
    MSE + ``weight`` * LPIPS. The weight barely matters (Adam's step ignores the gradient's
    scale and the MSE gradient is zero at the closed form); steps and rate set how far gamma
    may move (docs/method.md)."""
    return GammaFitter(perceptual=lpips_loss(lpips), perceptual_weight=weight, refine_steps=refine_steps,
                       learning_rate=learning_rate)
