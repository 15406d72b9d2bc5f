"""DDIM (eta = 0) whose every x0 estimate is corrected toward D's reconstruction.

One function serves the encoder and all decoders; they differ only in how gamma_t is
chosen at each step (``GammaRule``): fitted against the original (encoder), read from
the record (corrdiff decode), or zero (diffusion-only decode).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from corrdiff.gamma import correct
from corrdiff.schedule import NoiseSchedule

# (x_t, t) -> x0_theta
Denoiser = Callable[[Tensor, float], Tensor]
# (step index, x0_theta) -> gamma per image (B,)
GammaRule = Callable[[int, Tensor], Tensor]


def initial_state(x_e: Tensor, noise: Tensor, schedule: NoiseSchedule) -> Tensor:
    """x_T ~ q(x_{t_max} | x_e): D's reconstruction noised to the starting level."""
    a = schedule.alpha_bar(schedule.t_max)
    return math.sqrt(a) * x_e + math.sqrt(1.0 - a) * noise


def corrected_ddim(
    denoise: Denoiser,
    x_e: Tensor,
    x_start: Tensor,
    schedule: NoiseSchedule,
    steps: int,
    gamma_rule: GammaRule,
) -> tuple[Tensor, Tensor]:
    """Run the sampler; return the final image (in [-1, 1] space) and the gammas used (B, steps)."""
    times = schedule.timesteps(steps)
    x = x_start
    used = []
    for i in range(steps):
        a, a_next = schedule.alpha_bar(times[i]), schedule.alpha_bar(times[i + 1])
        x0_theta = denoise(x, times[i])
        gamma = gamma_rule(i, x0_theta)
        x0 = correct(x0_theta, x_e, gamma)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)
        x = math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps
        used.append(gamma)
    return x, torch.stack(used, dim=1)
