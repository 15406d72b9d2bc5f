"""The integer entropy path: exact, order-independent, and equal on encoder and decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corrdiff.fixed_point import (
    ACT_FRAC_BITS, ACT_MAX, FixedPointHyperSynthesis, HyperSynthesis, exact_conv2d,
)


def _reference_conv(a: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Same-padded convolution in Python integers (arbitrary precision): the ground truth."""
    batch, cin, height, width = a.shape
    cout, _, k, _ = w.shape
    pad = k // 2
    padded = np.pad(a.astype(object), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty((batch, cout, height, width), dtype=object)
    for n in range(batch):
        for o in range(cout):
            for y in range(height):
                for x in range(width):
                    out[n, o, y, x] = int((padded[n, :, y:y + k, x:x + k] * w[o].astype(object)).sum()) + int(b[o])
    return out


@st.composite
def integer_layers(draw):
    cin, cout = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    k = draw(st.sampled_from([1, 3]))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    a = rng.integers(-ACT_MAX, ACT_MAX + 1, (1, cin, h, w))
    weight = rng.integers(-(2**15) + 1, 2**15, (cout, cin, k, k))
    bias = rng.integers(-(2**40), 2**40, cout)
    return a, weight, bias, k


@settings(max_examples=40, deadline=None)
@given(integer_layers())
def test_exact_conv_equals_arbitrary_precision_integers(layer):
    a, weight, bias, k = layer
    got = exact_conv2d(torch.from_numpy(a).double(), torch.from_numpy(weight).double(),
                       torch.from_numpy(bias).double(), k)
    expected = _reference_conv(a, weight, bias)
    assert [int(v) for v in got.flatten().tolist()] == [int(v) for v in expected.flatten()]


@settings(max_examples=25, deadline=None)
@given(integer_layers(), st.randoms(use_true_random=False))
def test_exact_conv_does_not_depend_on_summation_order(layer, random):
    """Permuting input channels reorders every sum; an exact result cannot change."""
    a, weight, bias, k = layer
    perm = list(range(a.shape[1]))
    random.shuffle(perm)
    args = (torch.from_numpy(bias).double(), k)
    straight = exact_conv2d(torch.from_numpy(a).double(), torch.from_numpy(weight).double(), *args)
    shuffled = exact_conv2d(torch.from_numpy(a[:, perm]).double(), torch.from_numpy(weight[:, perm]).double(), *args)
    assert torch.equal(straight, shuffled)


def _fixed_pair(seed: int) -> tuple[HyperSynthesis, FixedPointHyperSynthesis]:
    torch.manual_seed(seed)
    float_hs = HyperSynthesis(hyper_channels=6, latent_channels=8)
    fixed = FixedPointHyperSynthesis(float_hs)
    fixed.quantize_from(float_hs)
    return float_hs, fixed


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 1000), st.integers(0, 2**31 - 1))
def test_fixed_point_tracks_the_float_network(model_seed, input_seed):
    float_hs, fixed = _fixed_pair(model_seed)
    z = torch.from_numpy(np.random.default_rng(input_seed).integers(-20, 21, (1, 6, 2, 3))).double()
    out_fixed = fixed(z * 2**ACT_FRAC_BITS) / 2**ACT_FRAC_BITS
    out_float = float_hs(z.float()).double()
    assert out_fixed.shape == out_float.shape == (1, 16, 8, 12)
    assert torch.equal(out_fixed * 2**ACT_FRAC_BITS, torch.round(out_fixed * 2**ACT_FRAC_BITS))
    # Floors in 4 layers, each losing < 1/256, scaled by the later layers' weights.
    assert (out_fixed - out_float).abs().max() < 0.05


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_fixed_point_is_thread_independent(input_seed):
    _, fixed = _fixed_pair(3)
    z = torch.from_numpy(np.random.default_rng(input_seed).integers(-(2**14), 2**14, (1, 6, 4, 4))).double()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fixed(z)
        torch.set_num_threads(2)
        two = fixed(z)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)
    assert one.abs().max() <= ACT_MAX


def test_weights_too_large_for_exact_sums_are_refused():
    float_hs = HyperSynthesis(hyper_channels=6, latent_channels=8)
    with torch.no_grad():
        float_hs.convs[0].bias.fill_(2.0**40)  # bias alone exceeds the exact range after scaling
    with pytest.raises(ValueError, match="overflow"):
        FixedPointHyperSynthesis(float_hs).quantize_from(float_hs)
