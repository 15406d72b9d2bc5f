"""Exact fixed-point hyper-synthesis: the device-independent half of the entropy model.

The entropy decoder can only decode y if it selects, for every element, the very same CDF
that the encoder used. In a hyperprior codec those CDFs are chosen by the hyper-synthesis
network h_s(z_hat); if h_s runs in floating point, a one-ulp difference between the
encoder's machine and the decoder's (another GPU, thread count, BLAS or library version)
can move a scale across a table boundary and the rest of the bitstream decodes to garbage.

So at inference h_s runs in integer arithmetic that every machine computes identically:

* activations are integers in fixed point with ``ACT_FRAC_BITS`` fractional bits, clamped
  to +-``ACT_MAX``;
* each layer has integer weights ``w_q = round(w * 2^s)`` and bias ``b_q = round(b * 2^(s+F))``
  (``s`` chosen per layer so that ``|w_q| < 2^15``);
* a layer computes ``acc = sum(w_q * a) + b_q`` and rescales with ``floor(acc / 2^s)``.

The sums are carried in float64 tensors holding integers. Every product and every partial
sum is an integer below 2^53 in magnitude (checked for the worst case when the layer is
built, see ``_check_exact``), and float64 represents all such integers exactly, so each
addition is exact and the result does not depend on the summation order, the device or
the BLAS. Convolutions are written as a sum of per-tap matrix products rather than calling
``conv2d``, because a convolution backend may pick Winograd or FFT algorithms that round.
Upsampling is a pixel shuffle (a pure re-indexing), never a transposed convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACT_FRAC_BITS = 8  # fixed-point activations carry 1/256 resolution
ACT_MAX = 2**23  # |activation| bound: real values within +-32768, exactly representable in float32
WEIGHT_MAX_BITS = 15  # |w_q| < 2^15
WEIGHT_MAX_FRAC_BITS = 20  # do not spend more than 20 fractional bits on tiny weights
EXACT_LIMIT = 2**53  # every integer of smaller magnitude is exact in float64


class HyperSynthesis(nn.Module):
    """Float hyper-synthesis h_s used in training; its layers map 1:1 to the fixed-point one.

    z (stride 64) -> conv3x3, ReLU -> conv3x3 + pixel shuffle x2, ReLU -> conv3x3 + pixel
    shuffle x2, ReLU -> conv1x1 -> [means | scale positions] at stride 16.
    """

    def __init__(self, hyper_channels: int, latent_channels: int) -> None:
        super().__init__()
        n, m = hyper_channels, latent_channels
        mid = max(n, (3 * m) // 4)
        self.convs = nn.ModuleList([
            nn.Conv2d(n, n, 3, padding=1),
            nn.Conv2d(n, 4 * n, 3, padding=1),
            nn.Conv2d(n, 4 * mid, 3, padding=1),
            nn.Conv2d(mid, 2 * m, 1),
        ])
        self.shuffles = (1, 2, 2, 1)
        self.relus = (True, True, True, False)

    def forward(self, z_hat: Tensor) -> Tensor:
        h = z_hat
        for conv, shuffle, relu in zip(self.convs, self.shuffles, self.relus):
            h = conv(h)
            if shuffle > 1:
                h = F.pixel_shuffle(h, shuffle)
            if relu:
                h = F.relu(h)
        return h


class FixedPointHyperSynthesis(nn.Module):
    """Integer twin of a :class:`HyperSynthesis`, exact on every device.

    Its integer weights are buffers, so they are saved with the model and never
    recomputed at load time: the decoder uses the very integers the encoder used.
    """

    def __init__(self, reference: HyperSynthesis) -> None:
        super().__init__()
        self.shuffles = reference.shuffles
        self.relus = reference.relus
        self.kernel_sizes = tuple(conv.kernel_size[0] for conv in reference.convs)
        for i, conv in enumerate(reference.convs):
            self.register_buffer(f"weight_{i}", torch.zeros(conv.weight.shape, dtype=torch.int32))
            self.register_buffer(f"bias_{i}", torch.zeros(conv.out_channels, dtype=torch.int64))
            self.register_buffer(f"shift_{i}", torch.zeros((), dtype=torch.int32))

    @torch.no_grad()
    def quantize_from(self, reference: HyperSynthesis) -> None:
        """Round the float layers of ``reference`` to fixed point and prove exactness bounds."""
        for i, conv in enumerate(reference.convs):
            weight = conv.weight.detach().double().cpu()
            bias = conv.bias.detach().double().cpu()
            largest = float(weight.abs().max())
            shift = WEIGHT_MAX_FRAC_BITS if largest == 0.0 else min(
                WEIGHT_MAX_FRAC_BITS, math.floor(math.log2((2**WEIGHT_MAX_BITS - 1) / largest))
            )
            if shift < 0:
                raise ValueError(f"hyper-synthesis layer {i} has a weight of {largest}, too large for fixed point")
            w_q = torch.round(weight * 2.0**shift)
            b_q = torch.round(bias * 2.0 ** (shift + ACT_FRAC_BITS))
            _check_exact(w_q, b_q, layer=i)
            getattr(self, f"weight_{i}").copy_(w_q.to(torch.int32))
            getattr(self, f"bias_{i}").copy_(b_q.to(torch.int64))
            getattr(self, f"shift_{i}").fill_(shift)

    def forward(self, z_fixed: Tensor) -> Tensor:
        """Map fixed-point z (float64 tensor of integers) to fixed-point [means | positions]."""
        a = z_fixed.to(torch.float64).clamp(-ACT_MAX, ACT_MAX)
        for i, (kernel, shuffle, relu) in enumerate(zip(self.kernel_sizes, self.shuffles, self.relus)):
            weight = getattr(self, f"weight_{i}").to(a.device, torch.float64)
            bias = getattr(self, f"bias_{i}").to(a.device, torch.float64)
            shift = int(getattr(self, f"shift_{i}"))
            acc = exact_conv2d(a, weight, bias, kernel)
            a = torch.floor(acc * 2.0**-shift)  # multiplying by a power of two is exact
            if shuffle > 1:
                a = F.pixel_shuffle(a, shuffle)
            a = a.clamp(0 if relu else -ACT_MAX, ACT_MAX)
        return a


def exact_conv2d(a: Tensor, weight: Tensor, bias: Tensor, kernel: int) -> Tensor:
    """'Same' convolution of integer-valued float64 tensors as a sum of per-tap products.

    Exact when every partial sum stays below 2^53, which ``_check_exact`` guarantees.
    """
    pad = kernel // 2
    height, width = a.shape[-2:]
    padded = F.pad(a, (pad, pad, pad, pad))
    acc = bias.view(1, -1, 1, 1).expand(a.shape[0], -1, height, width).clone()
    for dy in range(kernel):
        for dx in range(kernel):
            tap = padded[:, :, dy:dy + height, dx:dx + width]
            acc += torch.einsum("oc,bchw->bohw", weight[:, :, dy, dx], tap)
    return acc


def _check_exact(w_q: Tensor, b_q: Tensor, layer: int) -> None:
    """Prove that no partial sum of this layer can reach 2^53 for any admissible input.

    Takes the rounded weights and biases still in float64, before any integer cast could wrap.
    """
    worst = w_q.abs().flatten(1).sum(1) * ACT_MAX + b_q.abs()
    if float(worst.max()) >= EXACT_LIMIT:
        raise ValueError(f"hyper-synthesis layer {layer} could overflow exact float64 sums")


def to_fixed(values: Tensor) -> Tensor:
    """Round real values to fixed point (float64 holding integers), clamped to the range."""
    return torch.round(values.to(torch.float64) * 2.0**ACT_FRAC_BITS).clamp(-ACT_MAX, ACT_MAX)
