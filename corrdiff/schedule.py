"""The shifted cosine noise schedule and the sampler's time grid.

alpha_bar(t) = 1 / (1 + tan^2(pi t / 2) / shift^2), i.e. the cosine schedule
(alpha_bar = cos^2(pi t / 2) at shift 1) with its log-SNR raised by 2 log(shift).
A shift above 1 spends every step at less noise than the plain cosine schedule, following
HFD's observation that a decoder conditioned on a good latent only needs to add detail.
Sampling starts at t_max <= 1 from x_e noised to that level (t_max < 1: not from pure noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from corrdiff.config import DiffusionConfig


@dataclass(frozen=True)
class NoiseSchedule:
    snr_shift: float
    t_max: float

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> NoiseSchedule:
        if not 0.0 < config.t_max <= 1.0:
            raise ValueError(f"t_max must be in (0, 1], got {config.t_max}")
        if config.snr_shift <= 0.0:
            raise ValueError(f"snr_shift must be positive, got {config.snr_shift}")
        return cls(snr_shift=config.snr_shift, t_max=config.t_max)

    def alpha_bar(self, t: float) -> float:
        """Signal fraction at time t (1 at t = 0, 0 at t = 1)."""
        cos, sin = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
        signal = (cos * self.snr_shift) ** 2
        return signal / (signal + sin**2)

    def alpha_bar_tensor(self, t: Tensor) -> Tensor:
        """Same as :meth:`alpha_bar` for a batch of training times."""
        cos, sin = torch.cos(torch.pi * t / 2), torch.sin(torch.pi * t / 2)
        signal = (cos * self.snr_shift) ** 2
        return signal / (signal + sin**2)

    def timesteps(self, steps: int) -> list[float]:
        """steps + 1 uniformly spaced times from t_max down to 0."""
        if steps < 1:
            raise ValueError(f"need at least one sampling step, got {steps}")
        return [self.t_max * (1.0 - i / steps) for i in range(steps + 1)]
