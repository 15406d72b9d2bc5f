"""The float half of format versions 2 and 3: D and the corrected sampler, run tile by tile.

Memory is set by the tile: D only ever sees one block, the score network one batch of
tiles (the record's, at most 2048 x 2048 px in all). What stays whole-image is the
sampler's state, three float32 images (x_t, x_e and the blended x0 estimate, 36 bytes per
padded pixel) and y_hat; every other temporary is a tile, a batch of tiles or a stripe of
rows (:data:`STRIPE_ROWS`). One gamma per step for the whole image, as in the paper: the
encoder fits it on the blended estimate of the whole image, so the tiles' seams are
corrected like every other pixel.

Every loop runs in a fixed order over a grid fixed by the record (corrdiff.tiling), the
score network on the record's batches of tiles (version 2: each tile alone) and D on each
block alone, so the encoder and every decoder compute the same floats in the same order:
the decoder reproduces the encoder's pixels exactly (with the encoder's thread count;
another one can round a few pixels by one level, docs/method.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from corrdiff.gamma import quantize_gamma
from corrdiff.latent_codec import LATENT_STRIDE, PixelSource
from corrdiff.model import CorrDiffModel
from corrdiff.sampler import GammaRule
from corrdiff.tiling import DECODER_HALO, Span, Tiling, blocks, halo, score_tiles, tile_batches

STRIPE_ROWS = 64  # rows per pass of the whole-image elementwise updates


def reconstruct_e2e_tiled(model: CorrDiffModel, y_hat: Tensor, tile: int) -> Tensor:
    """x_e = D(y_hat) block by block, each from y_hat widened by D's receptive field."""
    height, width = y_hat.shape[-2] * LATENT_STRIDE, y_hat.shape[-1] * LATENT_STRIDE
    x_e = torch.empty((1, 3, height, width), device=y_hat.device)
    for r in blocks(height, tile):
        for c in blocks(width, tile):
            (top, bottom), (left, right) = (halo(s, DECODER_HALO, LATENT_STRIDE, n) for s, n in ((r, height), (c, width)))
            out = model.reconstruct_e2e(y_hat[..., top:bottom, left:right])
            top, left = top * LATENT_STRIDE, left * LATENT_STRIDE
            x_e[..., r.start:r.stop, c.start:c.stop] = out[..., r.start - top:r.stop - top, c.start - left:c.stop - left]
    return x_e


def initial_state_tiled(x_e: Tensor, seed: int, alpha_bar: float) -> Tensor:
    """x_T = sqrt(a) x_e + sqrt(1 - a) n, n from a CPU generator seeded by the record's seed,
    computed in place in the noise's own buffer (no further image-sized temporary)."""
    noise = torch.randn(tuple(x_e.shape), generator=torch.Generator().manual_seed(seed)).to(x_e.device)
    return noise.mul_(math.sqrt(1.0 - alpha_bar)).add_(x_e, alpha=math.sqrt(alpha_bar))


class TiledDenoiser:
    """x0_theta of the whole image: the score network on batches of tiles, each tile's
    estimate blended into ``out`` in raster order."""

    def __init__(self, model: CorrDiffModel, x_e: Tensor, y_hat: Tensor, tiling: Tiling, spread: bool) -> None:
        """``spread``: the score tiles of format 3 (True) or format 2 (corrdiff.tiling.score_tiles)."""
        self.model, self.x_e, self.y_hat = model, x_e, y_hat
        height, width = x_e.shape[-2:]
        device = x_e.device
        self.rows = [_to(s, device) for s in score_tiles(height, tiling.tile, tiling.overlap, spread)]
        self.cols = [_to(s, device) for s in score_tiles(width, tiling.tile, tiling.overlap, spread)]
        self.batches = tile_batches(self.rows, self.cols, tiling.batch)

    def __call__(self, x_t: Tensor, t: float, out: Tensor) -> Tensor:
        out.zero_()
        for tiles in self.batches:
            pixels = [(..., slice(r.start, r.stop), slice(c.start, c.stop)) for r, c in tiles]
            latent = [(..., slice(r.start // LATENT_STRIDE, r.stop // LATENT_STRIDE),
                       slice(c.start // LATENT_STRIDE, c.stop // LATENT_STRIDE)) for r, c in tiles]
            x0 = self.model.denoise(_gather(x_t, pixels), t, _gather(self.x_e, pixels), _gather(self.y_hat, latent))
            for i, ((r, c), where) in enumerate(zip(tiles, pixels)):
                out[where] += x0[i:i + 1] * (r.weights[:, None] * c.weights[None, :])
        return out


def corrected_ddim_tiled(denoiser: TiledDenoiser, x_start: Tensor, model: CorrDiffModel, steps: int,
                         gamma_rule: GammaRule) -> tuple[Tensor, Tensor]:
    """:func:`corrdiff.sampler.corrected_ddim` on the tiled denoiser, updating ``x_start`` in
    place stripe by stripe; returns the final image (in [-1, 1]) and the gammas (1, steps)."""
    schedule, x_e, x = model.schedule, denoiser.x_e, x_start
    times = schedule.timesteps(steps)
    x0 = torch.empty_like(x)
    used = []
    for i in range(steps):
        a, a_next = schedule.alpha_bar(times[i]), schedule.alpha_bar(times[i + 1])
        denoiser(x, times[i], x0)
        gamma = gamma_rule(i, x0)
        g = gamma.to(x0.dtype)
        for rows in _stripes(x.shape[-2]):
            x0s, xs = x0[..., rows, :], x[..., rows, :]
            x0s += g * (x_e[..., rows, :] - x0s)  # the corrected estimate, as corrdiff.gamma.correct
            eps = (xs - math.sqrt(a) * x0s) / math.sqrt(1.0 - a)
            xs.copy_(math.sqrt(a_next) * x0s + math.sqrt(1.0 - a_next) * eps)
        used.append(gamma)
    return x, torch.stack(used, dim=1)


def closed_form_fit(pixels: PixelSource, height: int, width: int, x_e: Tensor) -> Callable[[int, Tensor], Tensor]:
    """The encoder's MSE gamma rule on the image's own pixels, summed stripe by stripe in
    float64 (corrdiff.gamma.closed_form_gamma without an image-sized float64 copy)."""
    def fit(step: int, x0_theta: Tensor) -> Tensor:
        num = torch.zeros((), dtype=torch.float64, device=x0_theta.device)
        den = torch.zeros_like(num)
        for rows in _stripes(height):
            x = pixels(rows.start, 0, rows.stop - rows.start, width) * 2.0 - 1.0
            estimate = x0_theta[..., rows, :width]
            direction = (x_e[..., rows, :width] - estimate).double()
            residual = (x - estimate).double()
            num += (residual * direction).sum()
            den += (direction * direction).sum()
        gamma = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(den))
        return quantize_gamma(gamma.view(1))

    return fit


def to_image(x: Tensor, height: int, width: int) -> np.ndarray:
    """[-1, 1] (1, 3, H, W) -> (height, width, 3) uint8, rounded to nearest, stripe by stripe
    (corrdiff.codec.tensor_to_image without an image-sized float copy)."""
    image = np.empty((height, width, 3), np.uint8)
    for rows in _stripes(height):
        scaled = ((x[0, :, rows, :width].float() + 1.0) * 127.5).clamp(0.0, 255.0).round()
        image[rows] = scaled.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return image


def _stripes(height: int) -> list[slice]:
    return [slice(top, min(top + STRIPE_ROWS, height)) for top in range(0, height, STRIPE_ROWS)]


def _gather(source: Tensor, regions: list[tuple[object, slice, slice]]) -> Tensor:
    """The regions of a (1, C, H, W) tensor as one batch."""
    return torch.cat([source[region] for region in regions])


def _to(span: Span, device: torch.device) -> Span:
    return Span(span.start, span.size, span.weights.to(device))
