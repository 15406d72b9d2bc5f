"""Training objectives of the three phases (plain PyTorch; the loop lives in corrdiff/trainer.py).

Phase 0: latent codec + D for rate + lambda * MSE (compressai's convention: distortion
         scaled by 255^2), plus compressai's auxiliary loss for the z prior's quantiles.
         Optionally D alone on the frozen codec's coded latent (the records' bytes stay
         put; ``coded_latent``), and optionally with a perceptual term,
         rate + lambda * (MSE + w * LPIPS): our extension, not the paper's (its D is
         MSE-trained), so that the anchor the gammas mix toward is not MSE blur
         (docs/model-history.md, rounds eight and nine; the default model's D was trained this way).
Phase 1: the score network alone, everything else frozen: predict x0 from x_t at a time
         drawn uniformly in (0, t_max], conditioned on the coded latent.
Phase 2: perceptual fine-tuning of the encoder, entropy model and score network (D stays
         frozen): rate + lambda * (MSE + w * LPIPS) of the corrected estimate, whose gamma is
         the differentiable closed form, plus the phase-1 loss.

Precision (``amp``, e.g. ``torch.bfloat16``): the networks whose output only feeds a loss
run under autocast, the score network always and D where it trains (phase 0); the latent
codec (g_a, h_a, h_s, entropy models), the rate and every loss stay in float32, since y is
rounded to integers and a bf16 y (8 bits of mantissa) would move those roundings. A frozen
D (phases 1 and 2) runs in float32 too: x_e then conditions the score network exactly as
it does at decode time.

``measure=False`` skips what only the log needs (the coded bytes of a frozen codec and
every ``.item()``, which waits for a GPU): the loop measures on the steps it logs only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrdiff.gamma import PerceptualLoss, closed_form_gamma, correct
from corrdiff.latent_codec import LatentForward
from corrdiff.model import CorrDiffModel


@dataclass
class PhaseLoss:
    """The loss to minimise and the numbers worth logging."""

    loss: Tensor
    aux_loss: Tensor | None  # None where the latent codec is frozen (train_latent: false)
    metrics: dict[str, float]  # empty when the loss was computed with measure=False
    # The phase's output image in [-1, 1], detached (D's, the score network's x0 estimate,
    # the corrected estimate): what a per-interval LPIPS is logged on.
    reconstruction: Tensor | None = None


def bits(likelihoods: Tensor) -> Tensor:
    return -torch.log2(likelihoods).sum()


def autocast(x: Tensor, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``amp`` on x's device type (CPU autocast takes bfloat16 too), or nothing."""
    return torch.autocast(x.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def psnr(mse: float) -> float:
    """PSNR in dB of images in [0, 1] from their MSE."""
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def trainable_parameters(model: CorrDiffModel, phase: int,
                         train_latent: bool = True) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(main, auxiliary) parameters of a phase; auxiliary = the z prior's quantiles.

    Phases 0 and 2 train the latent codec too unless ``train_latent`` is false: then the
    encoder, entropy model and rate stay exactly as they are and only D (phase 0) or f_theta
    (phase 2) learns (the rate drifts otherwise; docs/model-history.md, round five).
    """
    if phase == 0:
        modules = [model.latent, model.decoder] if train_latent else [model.decoder]
    elif phase == 1:
        modules = [model.score]
    elif phase == 2:
        modules = [model.latent, model.score] if train_latent else [model.score]
    else:
        raise ValueError(f"unknown training phase {phase}")
    trains_latent = any(m is model.latent for m in modules)
    aux = [p for n, p in model.latent.named_parameters() if n.endswith("quantiles")] if trains_latent else []
    aux_ids = {id(p) for p in aux}
    main = [p for m in modules for p in m.parameters() if id(p) not in aux_ids]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in main + aux:
        p.requires_grad_(True)
    return main, aux


def phase0_loss(model: CorrDiffModel, x: Tensor, lmbda: float, perceptual: PerceptualLoss | None = None,
                perceptual_weight: float = 0.0, train_latent: bool = True,
                amp: torch.dtype | None = None, measure: bool = True) -> PhaseLoss:
    if train_latent:
        out = model.latent(x)  # compressai's training proxy: additive uniform noise
        y_hat, bpp = out.y_hat, _proxy_bpp(out, x)
    else:
        y_hat, bpp = coded_latent(model, x, count_bytes=measure)
    with autocast(x, amp):
        x_hat = model.decoder(y_hat)
    x_hat = x_hat.float()
    mse = F.mse_loss(x_hat, x)
    distortion = mse
    lp = None
    if perceptual_weight > 0:
        lp = perceptual(x_hat.clamp(0.0, 1.0) * 2 - 1, x * 2 - 1).mean()
        distortion = mse + perceptual_weight * lp
    loss = _rate_term(bpp, train_latent, measure) + lmbda * 255**2 * distortion
    metrics = {}
    if measure:
        metrics = {"bpp": bpp.item(), "mse": mse.item(), "psnr": psnr(mse.item())}
        if lp is not None:
            metrics["lpips"] = lp.item()
    return PhaseLoss(loss, model.latent.aux_loss() if train_latent else None, metrics,
                     (x_hat.detach().clamp(0.0, 1.0) * 2 - 1))


def _diffusion_pair(model: CorrDiffModel, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """A noisy x_t of x (in [-1, 1]) at random times in (0, t_max], and those times."""
    t_max = model.schedule.t_max
    t = (1.0 - torch.rand(x.shape[0], generator=generator)) * t_max
    a = model.schedule.alpha_bar_tensor(t.double()).float().to(x.device).view(-1, 1, 1, 1)
    # Drawn where the generator lives (the CPU when one is given: reproducible), else on
    # x's device: a batch of noise drawn on the CPU and copied costs a GPU step's time.
    noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
    return a.sqrt() * x + (1 - a).sqrt() * noise.to(x.device), t.to(x.device)


def coded_latent(model: CorrDiffModel, x: Tensor, count_bytes: bool = True) -> tuple[Tensor, Tensor]:
    """A frozen codec's latent of x exactly as a decoder will see it, and its real rate.

    The latent is ``LatentCodec.compress``'s (fixed-point h_s, the CDF tables), so D and the
    score network train on the very values they will decode from: the float h_s's means
    differ from the coded ones by about 0.002 and flip one rounding in a thousand. The rate
    is counted from the coded bytes; with ``count_bytes=False`` nothing is entropy-coded
    (``LatentCodec.quantize``: the same y_hat, no rANS pass on the CPU) and the rate is NaN.
    A frozen codec's rate has no gradient, so only the log needs it. The tables must be
    current: the training loop calls ``LatentCodec.freeze`` when a phase starts with the
    codec frozen.
    """
    with torch.no_grad():
        if not count_bytes:
            return model.latent.quantize(x).y_hat, torch.tensor(math.nan)
        streams, y_hat = model.latent.compress(x)
        bpp = torch.tensor(8.0 * sum(len(s.z) + len(s.y) for s in streams) / _pixels(x))
    return y_hat, bpp


def _proxy_bpp(out: LatentForward, x: Tensor) -> Tensor:
    """The rate of compressai's training proxy: the likelihoods' bits per pixel (differentiable)."""
    return (bits(out.y_likelihoods) + bits(out.z_likelihoods)) / _pixels(x)


def _rate_term(bpp: Tensor, train_latent: bool, measure: bool) -> Tensor | float:
    """The rate in the loss. A frozen codec's rate is a constant without gradient, counted
    only when measured (the logged loss then includes it, as it always did)."""
    return bpp if train_latent or measure else 0.0


def _pixels(x: Tensor) -> int:
    return x.shape[0] * x.shape[2] * x.shape[3]


def phase1_loss(model: CorrDiffModel, x: Tensor, generator: torch.Generator | None = None,
                amp: torch.dtype | None = None, measure: bool = True) -> PhaseLoss:
    y_hat, _ = coded_latent(model, x, count_bytes=False)
    with torch.no_grad():
        x_e = model.reconstruct_e2e(y_hat)
    target = x * 2 - 1
    x_t, t = _diffusion_pair(model, target, generator)
    with autocast(x, amp):
        x0_theta = model.score(x_t, t, x_e, y_hat)
    x0_theta = x0_theta.float()
    loss = F.mse_loss(x0_theta, target)
    metrics = {}
    if measure:
        mse01 = loss.item() / 4  # [-1, 1] -> [0, 1]
        e2e_mse = F.mse_loss(x_e, target).item() / 4
        metrics = {"mse": mse01, "psnr": psnr(mse01), "e2e_psnr": psnr(e2e_mse)}
    return PhaseLoss(loss, None, metrics, x0_theta.detach().clamp(-1.0, 1.0))


def phase2_loss(model: CorrDiffModel, x: Tensor, lmbda: float, perceptual: PerceptualLoss,
                perceptual_weight: float, train_latent: bool = True,
                generator: torch.Generator | None = None,
                amp: torch.dtype | None = None, measure: bool = True) -> PhaseLoss:
    if train_latent:
        out = model.latent(x)
        # Straight-through rounding: the decoder side sees quantized values, gradients pass through.
        y_hat = out.y + (torch.round(out.y - out.means) + out.means - out.y).detach()
        bpp = _proxy_bpp(out, x)
    else:
        y_hat, bpp = coded_latent(model, x, count_bytes=measure)
    x_e = model.reconstruct_e2e(y_hat)
    target = x * 2 - 1
    x_t, t = _diffusion_pair(model, target, generator)
    with autocast(x, amp):
        x0_theta = model.score(x_t, t, x_e, y_hat)
    x0_theta = x0_theta.float()
    mask = torch.ones_like(target[:, :1])
    gamma = closed_form_gamma(target, x0_theta, x_e, mask).float()
    x0 = correct(x0_theta, x_e, gamma)
    mse = F.mse_loss(x0, target) / 4
    lp = perceptual(x0, target).mean()
    diffusion = F.mse_loss(x0_theta, target)
    loss = _rate_term(bpp, train_latent, measure) + lmbda * 255**2 * (mse + perceptual_weight * lp) + diffusion
    metrics = {}
    if measure:
        metrics = {"bpp": bpp.item(), "mse": mse.item(), "psnr": psnr(mse.item()), "lpips": lp.item(),
                   "gamma": gamma.mean().item()}
    return PhaseLoss(loss, model.latent.aux_loss() if train_latent else None, metrics,
                     x0.detach().clamp(-1.0, 1.0))
