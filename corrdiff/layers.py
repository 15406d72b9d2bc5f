"""Layers that keep oneDNN's 1x1 kernels out of the float results' thread dependence.

oneDNN's 1x1-convolution kernels (used by ``nn.Conv2d`` with a 1x1 kernel, and by
compressai's GDN) split the channel reduction differently for different thread counts,
so the same record decoded with 1 and with 2 threads would differ in the last bits.
Written as one matrix product, a 1x1 convolution runs through a GEMM that keeps its
reduction order (checked by tests/test_determinism.py). Larger and transposed
convolutions are invariant for most sizes but not all (docs/method.md, "Reproducible
pixels"): another thread count can still move a pixel on a rounding boundary by one level."""

from __future__ import annotations

import torch
from compressai.layers import GDN as _CompressaiGDN
from torch import Tensor, nn


def pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution (weight (O, C, 1, 1)) as a matrix product over channels."""
    batch, channels, height, width = x.shape
    out = torch.matmul(weight.reshape(weight.shape[0], channels), x.reshape(batch, channels, height * width))
    if bias is not None:
        out = out + bias.view(1, -1, 1)
    return out.view(batch, -1, height, width)


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(cin, cout, 1)`` with thread-invariant results (same parameters)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return pointwise_conv(x, self.weight, self.bias)


class GDN(_CompressaiGDN):
    """compressai's (inverse) GDN with its 1x1 normalisation written as a matrix product."""

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        beta = self.beta_reparam(self.beta)
        gamma = self.gamma_reparam(self.gamma).reshape(channels, channels, 1, 1)
        norm = pointwise_conv(x * x, gamma, beta)
        return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))
