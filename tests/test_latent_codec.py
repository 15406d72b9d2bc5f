"""The coded latent: what the decoder gets is exactly what the encoder quantized."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corrdiff.latent_codec import pad_to_stride

from conftest import smooth_image


def _padded_batch(*images: np.ndarray) -> torch.Tensor:
    return torch.stack([pad_to_stride(torch.from_numpy(im).permute(2, 0, 1).float() / 255) for im in images])


def test_decoded_latent_equals_the_quantized_latent(codec):
    latent = codec.model.latent
    x = _padded_batch(smooth_image(100, 130, seed=1), smooth_image(128, 150, seed=2))
    streams, y_hat = latent.compress(x)
    decoded = latent.decompress(streams, (128, 192))
    assert torch.equal(decoded, y_hat)
    # y_hat is on the quantization grid: symbols are integers around the exact means.
    means, _ = latent._y_parameters(latent._decode_z([s.z for s in streams], (128, 192)))
    symbols = y_hat.double() - means
    assert torch.equal(symbols, torch.round(symbols))


def test_padding_replicates_edges_to_a_multiple_of_64():
    x = torch.arange(6.0).view(1, 2, 3)
    padded = pad_to_stride(x)
    assert padded.shape == (1, 64, 64)
    assert torch.equal(padded[:, :2, :3], x) and torch.all(padded[:, 63, 63] == x[0, 1, 2])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40))
def test_rans_round_trips_any_symbols(codec, seed, magnitude):
    """Any integers, in range of the CDFs or far outside (escape coded), decode exactly."""
    latent = codec.model.latent
    rng = np.random.default_rng(seed)
    indexes = torch.from_numpy(rng.integers(0, latent.config.scale_levels, (1, 12, 3, 4)))
    symbols = torch.from_numpy(rng.integers(-magnitude, magnitude + 1, (1, 12, 3, 4)))
    means = torch.zeros(symbols.shape, dtype=torch.float64)
    (string,) = latent.gaussian_conditional.compress(symbols.double(), indexes, means)
    assert torch.equal(latent._decode_y([string], means, indexes), symbols.float())


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 2**21))
def test_z_symbols_come_back_exactly_from_the_decoded_z(codec, seed, magnitude):
    """The decoder's z is symbol + median in float32; the symbols it gives back are the encoder's,
    for symbols far beyond any real z (escape coded)."""
    latent = codec.model.latent
    rng = np.random.default_rng(seed)
    channels = latent.config.hyper_channels
    symbols = torch.from_numpy(rng.integers(-magnitude, magnitude + 1, (1, channels, 2, 3)))
    z = symbols.float() + latent._z_medians()
    (string,) = latent.entropy_bottleneck.compress(z)
    assert torch.equal(latent._decode_z([string], (128, 192)), symbols)


def test_bits_follow_the_information(codec):
    """The y string is a real entropy code: larger symbols under a narrow prior cost more bytes."""
    latent = codec.model.latent
    indexes = torch.zeros((1, 12, 8, 8), dtype=torch.int64)  # the narrowest Gaussian
    quiet = torch.zeros((1, 12, 8, 8), dtype=torch.int64)
    loud = torch.from_numpy(np.random.default_rng(0).integers(-3, 4, (1, 12, 8, 8)))
    means = torch.zeros(quiet.shape, dtype=torch.float64)
    (quiet_bytes,) = latent.gaussian_conditional.compress(quiet.double(), indexes, means)
    (loud_bytes,) = latent.gaussian_conditional.compress(loud.double(), indexes, means)
    assert len(quiet_bytes) < 16 < len(loud_bytes)
