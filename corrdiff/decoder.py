"""D, the privileged end-to-end decoder: x_e = D(y_hat).

A plain synthesis transform (compressai's g_s: four stride-2 transposed convolutions
with inverse GDN), trained for MSE with the latent codec and then frozen. On its own it is
the "e2e" decode mode; inside the sampler it is the anchor the gammas pull toward.
"""

from __future__ import annotations

from corrdiff.layers import GDN
from torch import Tensor, nn


def _deconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1)


class EndToEndDecoder(nn.Module):
    """y_hat (stride 16, M channels) -> image in [0, 1] (unclamped during training)."""

    def __init__(self, latent_channels: int, channels: int) -> None:
        super().__init__()
        self.g_s = nn.Sequential(
            _deconv(latent_channels, channels), GDN(channels, inverse=True),
            _deconv(channels, channels), GDN(channels, inverse=True),
            _deconv(channels, channels), GDN(channels, inverse=True),
            _deconv(channels, 3),
        )

    def forward(self, y_hat: Tensor) -> Tensor:
        return self.g_s(y_hat)
