"""CorrDiffModel: the networks of one CorrDiff codec, composed (no coding logic here)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from corrdiff.config import ModelConfig
from corrdiff.decoder import EndToEndDecoder
from corrdiff.latent_codec import LatentCodec
from corrdiff.schedule import NoiseSchedule
from corrdiff.score_net import ScoreNet


class CorrDiffModel(nn.Module):
    """Latent codec (E + entropy models), end-to-end decoder D, score network, schedule."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.latent = LatentCodec(config.latent)
        self.decoder = EndToEndDecoder(config.latent.latent_channels, config.decoder_channels)
        self.score = ScoreNet(config.score, config.latent.latent_channels)
        self.schedule = NoiseSchedule.from_config(config.diffusion)

    def reconstruct_e2e(self, y_hat: Tensor) -> Tensor:
        """x_e in [-1, 1]: D's output, clamped to the valid image range."""
        return (self.decoder(y_hat).clamp(0.0, 1.0) * 2.0) - 1.0

    def denoise(self, x_t: Tensor, t: float, x_e: Tensor, y_hat: Tensor) -> Tensor:
        """x0_theta for a batch at one sampler time."""
        times = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=x_t.dtype)
        return self.score(x_t, times, x_e, y_hat)
