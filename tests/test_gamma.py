"""Gamma fitting and the corrected sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corrdiff.gamma import GammaFitter, closed_form_gamma, correct, masked_mse, quantize_gamma
from corrdiff.metrics import FeatureMetric
from corrdiff.sampler import corrected_ddim, initial_state
from corrdiff.schedule import NoiseSchedule


def _triple(seed: int, shape=(2, 3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(shape, generator=g) * 2 - 1 for _ in range(3))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_closed_form_minimises_mse_against_a_grid(seed):
    x, x0_theta, x_e = _triple(seed)
    mask = torch.ones_like(x[:, :1])
    mask[1, :, 10:, :] = 0  # second image is smaller than its padded tensor
    gamma = closed_form_gamma(x, x0_theta, x_e, mask)
    best = masked_mse(correct(x0_theta.double(), x_e.double(), gamma), x.double(), mask.double())
    for g in np.linspace(-3, 3, 601):
        grid = masked_mse(correct(x0_theta.double(), x_e.double(), torch.full((2,), g)), x.double(), mask.double())
        assert torch.all(best <= grid + 1e-12)


def test_closed_form_ignores_padding():
    x, x0_theta, x_e = _triple(1, (1, 3, 8, 8))
    mask = torch.zeros_like(x[:, :1])
    mask[..., :4, :4] = 1
    changed = x.clone()
    changed[..., 4:, :] = 5.0
    assert torch.equal(closed_form_gamma(x, x0_theta, x_e, mask), closed_form_gamma(changed, x0_theta, x_e, mask))


def test_degenerate_direction_gives_gamma_one():
    x, x0_theta, _ = _triple(2, (1, 3, 4, 4))
    assert closed_form_gamma(x, x0_theta, x0_theta.clone(), torch.ones_like(x[:, :1])).item() == 1.0


def test_quantize_gamma_is_float16_and_saturates():
    values = torch.tensor([0.1, 1e6, -1e6, float("nan"), 0.33333])
    q = quantize_gamma(values)
    assert q.dtype == torch.float32
    assert torch.equal(q, q.half().float())
    assert q[1].item() == 65504.0 and q[2].item() == -65504.0 and q[3].item() == 1.0
    assert abs(q[4].item() - 0.33333) < 1e-3


class _L1(FeatureMetric):
    """A differentiable stand-in for LPIPS whose minimiser differs from the MSE one; it
    records the shapes it is shown."""

    name, min_side, device = "L1", 1, torch.device("cpu")

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen.append(tuple(x.shape))
        return [x]

    def distance(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        return (a[0] - b[0]).abs().flatten(1).mean(1)


def test_perceptual_refinement_never_worsens_and_here_improves():
    x, x0_theta, x_e = _triple(3)
    mask = torch.ones_like(x[:, :1])
    fit = GammaFitter(perceptual=_L1(), perceptual_weight=1.0, refine_steps=20, learning_rate=0.02).bind(x, mask)
    start = closed_form_gamma(x, x0_theta, x_e, mask).float()
    refined = fit._refine(start, x0_theta, x_e)
    before = fit.objective(start, x0_theta, x_e)
    after = fit.objective(refined, x0_theta, x_e)
    assert torch.all(after <= before) and torch.any(after < before)
    assert torch.equal(fit(x0_theta, x_e), quantize_gamma(refined))


def test_original_features_are_computed_once_per_bind():
    """The original's features are kept for every step: each objective costs one pass."""
    x, x0_theta, x_e = _triple(5, (1, 3, 8, 8))
    metric = _L1()
    fit = GammaFitter(perceptual=metric, perceptual_weight=1.0, refine_steps=4).bind(x, torch.ones_like(x[:, :1]))
    assert len(metric.seen) == 1
    for _ in range(3):  # three sampler steps
        fit(x0_theta, x_e)
    assert len(metric.seen) == 1 + 3 * (4 + 1)  # per step: one pass per Adam step and one for the last value


def test_perceptual_term_sees_only_the_image_not_its_padding():
    x, x0_theta, x_e = _triple(4, (2, 3, 16, 16))
    mask = torch.ones_like(x[:, :1])
    mask[1, :, 10:, :] = 0
    mask[1, :, :, 7:] = 0  # the second image is 10x7 inside its 16x16 padded tensor
    metric = _L1()
    fitter = GammaFitter(perceptual=metric, perceptual_weight=1.0, refine_steps=3)
    padded = x.clone()
    padded[1, :, 10:, :] = 5.0
    padded[1, :, :, 7:] = -5.0
    assert torch.equal(fitter.bind(x, mask)(x0_theta, x_e), fitter.bind(padded, mask)(x0_theta, x_e))
    assert set(metric.seen) == {(1, 3, 16, 16), (1, 3, 10, 7)}


def _sampler_inputs():
    schedule = NoiseSchedule(snr_shift=2.0, t_max=0.8)
    g = torch.Generator().manual_seed(0)
    x_e = torch.rand((1, 3, 8, 8), generator=g) * 2 - 1
    noise = torch.randn((1, 3, 8, 8), generator=g)
    return schedule, x_e, initial_state(x_e, noise, schedule)


def _denoiser(x_t: torch.Tensor, t: float) -> torch.Tensor:
    """A fixed non-trivial 'network': any x0 estimate that is not x_e."""
    return torch.tanh(x_t * (1.5 - t))


def test_gamma_one_gives_x_e():
    schedule, x_e, x_start = _sampler_inputs()
    out, gammas = corrected_ddim(_denoiser, x_e, x_start, schedule, 6, lambda i, x0: torch.ones(1))
    assert torch.allclose(out, x_e, atol=1e-6) and torch.all(gammas == 1)


def test_gamma_zero_is_plain_ddim():
    schedule, x_e, x_start = _sampler_inputs()
    out, _ = corrected_ddim(_denoiser, x_e, x_start, schedule, 6, lambda i, x0: torch.zeros(1))
    # Reference: the textbook DDIM (eta = 0) update written out independently.
    times = schedule.timesteps(6)
    x = x_start
    for t, t_next in zip(times[:-1], times[1:]):
        a, a_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
        x0 = _denoiser(x, t)
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        x = a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps
    assert torch.allclose(out, x, atol=1e-6) and not torch.allclose(out, x_e, atol=1e-2)


def test_last_step_lands_on_the_corrected_estimate():
    schedule, x_e, x_start = _sampler_inputs()
    seen = []
    out, _ = corrected_ddim(_denoiser, x_e, x_start, schedule, 3,
                            lambda i, x0: seen.append(x0) or torch.full((1,), 0.25))
    assert torch.allclose(out, correct(seen[-1], x_e, torch.full((1,), 0.25)), atol=1e-6)


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0])
def test_schedule_is_monotone_from_clean_to_noise(shift):
    schedule = NoiseSchedule(snr_shift=shift, t_max=1.0)
    values = [schedule.alpha_bar(t) for t in np.linspace(0, 1, 50)]
    assert values[0] == 1.0 and values[-1] < 1e-20
    assert all(a > b for a, b in zip(values, values[1:]))
    t = torch.linspace(0, 1, 50, dtype=torch.float64)
    assert np.allclose(schedule.alpha_bar_tensor(t).numpy(), values)


def test_shift_means_less_noise():
    plain, shifted = NoiseSchedule(1.0, 1.0), NoiseSchedule(2.0, 1.0)
    assert all(shifted.alpha_bar(t) > plain.alpha_bar(t) for t in (0.2, 0.5, 0.8))
    assert abs(plain.alpha_bar(0.5) - np.cos(np.pi / 4) ** 2) < 1e-12
