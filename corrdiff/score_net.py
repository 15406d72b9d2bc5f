"""The conditional score network f_theta(x_t, t, y_hat): a U-Net that predicts x0.

Conditioning (our choice; the paper leaves it open): the network sees the noisy image x_t,
the end-to-end reconstruction x_e = D(y_hat), and a low-dimensional projection of y_hat
upsampled to full resolution, concatenated on the channel axis. It predicts x0 as a
residual on x_e (x0_theta = x_e + r), so that it only has to supply the detail D lost,
which is the premise of HFD. With patch_size p > 1 the U-Net works on p x p pixel blocks
folded into channels, p^2 times cheaper (our choice for CPU-trainable models). It is fully convolutional with GroupNorm (per-sample), so
any padded size works and the result for one image does not depend on its batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corrdiff.config import ScoreNetConfig
from corrdiff.latent_codec import LATENT_STRIDE
from corrdiff.layers import PointwiseConv2d


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of continuous time t in [0, 1] (scaled to [0, 1000])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(time_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = PointwiseConv2d(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class ScoreNet(nn.Module):
    """U-Net with ``len(channel_mults)`` resolutions; predicts x0 in [-1, 1] space."""

    def __init__(self, config: ScoreNetConfig, latent_channels: int) -> None:
        super().__init__()
        c, groups, tdim = config.base_channels, config.groups, config.time_embed_dim
        self.time_dim = tdim
        self.time_mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        if LATENT_STRIDE % config.patch_size:
            raise ValueError(f"patch_size must divide {LATENT_STRIDE}, got {config.patch_size}")
        self.patch = config.patch_size
        self.latent_proj = PointwiseConv2d(latent_channels, config.latent_cond_channels)
        self.inp = nn.Conv2d(6 * self.patch**2 + config.latent_cond_channels, c, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [c]
        ch = c
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.res_blocks):
                self.down.append(ResBlock(ch, c * mult, tdim, groups))
                ch = c * mult
                skips.append(ch)
            if level < len(config.channel_mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)

        self.mid = nn.ModuleList([ResBlock(ch, ch, tdim, groups), ResBlock(ch, ch, tdim, groups)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), c * mult, tdim, groups))
                ch = c * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, 3 * self.patch**2, 3, padding=1))

    def forward(self, x_t: Tensor, t: Tensor, x_e: Tensor, y_hat: Tensor) -> Tensor:
        """x_t, x_e in [-1, 1] (B, 3, H, W); t (B,) in [0, 1]; y_hat (B, M, H/16, W/16)."""
        emb = self.time_mlp(timestep_embedding(t, self.time_dim))
        y_cond = F.interpolate(self.latent_proj(y_hat), scale_factor=LATENT_STRIDE // self.patch, mode="nearest")
        pixels = F.pixel_unshuffle(torch.cat([x_t, x_e], dim=1), self.patch)
        h = self.inp(torch.cat([pixels, y_cond], dim=1))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return x_e + F.pixel_shuffle(self.out(h), self.patch)
