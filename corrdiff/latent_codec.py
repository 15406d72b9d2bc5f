"""The mean-scale hyperprior latent codec: x -> (z, y) bitstreams -> y_hat.

Training uses compressai's differentiable entropy models (likelihoods, noisy
quantization). Coding uses the same models' own ``compress``/``decompress`` (compressai's
rANS coder) with CDF tables that are computed once by :meth:`LatentCodec.freeze` and stored
as buffers; what is ours is the fixed-point hyper-synthesis (:mod:`corrdiff.fixed_point`)
that gives the means and CDF indexes of y, so that everything that selects a CDF, and y_hat
itself, is bit-identical on the encoder and on any decoder, and the block-by-block layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from corrdiff.layers import GDN
from torch import Tensor, nn

from corrdiff.config import LatentConfig
from corrdiff.fixed_point import ACT_FRAC_BITS, FixedPointHyperSynthesis, HyperSynthesis, to_fixed
from corrdiff.record import RecordError
from corrdiff.tiling import (
    ANALYSIS_HALO, HYPER_ANALYSIS_HALO, HYPER_SYNTHESIS_HALO, Span, blocks, halo,
)

LATENT_STRIDE = 16  # y is x downsampled 16 times
HYPER_STRIDE = 64  # z is x downsampled 64 times: images are padded to a multiple of this
# compressai's rANS strings are 32-bit words ending in the coder's 64-bit final state, and no
# symbol costs more than 16 bits (its CDF precision) plus the bypass code of an out-of-range
# value (a 4-bit count and at most 36 bits of value): 7 bytes, rounded up to 8.
RANS_WORD_BYTES = 4
RANS_FLUSH_BYTES = 8
RANS_MAX_BYTES_PER_SYMBOL = 8


def _conv(cin: int, cout: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)


@dataclass
class LatentForward:
    """Training-time outputs: the latent before and after (noisy) quantization, its
    predicted means, and the likelihoods that give the rate."""

    y: Tensor
    means: Tensor
    y_hat: Tensor
    y_likelihoods: Tensor
    z_likelihoods: Tensor


@dataclass
class LatentBitstreams:
    """One image's coded latent: the hyper-latent z string and the latent y string."""

    z: bytes
    y: bytes


@dataclass
class TiledBitstreams:
    """One image's latent coded in blocks (format versions 2 and 3): one z string for the whole
    image (1/4096 of its pixels times N symbols), one y string per block in raster order."""

    z: bytes
    y: list[bytes]


# (top, left, height, width) in padded-image pixels -> (1, 3, height, width) in [0, 1]
PixelSource = Callable[[int, int, int, int], Tensor]


@dataclass
class QuantizedLatent:
    """A batch's integer symbols and the exact (float64) means and CDF indexes of y."""

    z_symbols: Tensor
    y_symbols: Tensor
    means: Tensor
    indexes: Tensor

    @property
    def y_hat(self) -> Tensor:
        """y_hat as every decoder computes it: the symbols plus the fixed-point means."""
        return (self.y_symbols + self.means).float()


class LatentCodec(nn.Module):
    """Analysis g_a (stride 16), hyper-analysis h_a (stride 64), entropy models, h_s."""

    def __init__(self, config: LatentConfig) -> None:
        super().__init__()
        n, m = config.hyper_channels, config.latent_channels
        self.config = config
        self.g_a = nn.Sequential(
            _conv(3, n), GDN(n), _conv(n, n), GDN(n), _conv(n, n), GDN(n), _conv(n, m),
        )
        self.h_a = nn.Sequential(
            _conv(m, n, 3, 1), nn.ReLU(inplace=True), _conv(n, n), nn.ReLU(inplace=True), _conv(n, n),
        )
        self.h_s = HyperSynthesis(n, m)
        self.h_s_fixed = FixedPointHyperSynthesis(self.h_s)
        self.entropy_bottleneck = EntropyBottleneck(n)
        self.log_scale_min = math.log(config.scale_min)
        self.log_scale_step = (math.log(config.scale_max) - self.log_scale_min) / (config.scale_levels - 1)
        table = [math.exp(self.log_scale_min + i * self.log_scale_step) for i in range(config.scale_levels)]
        self.gaussian_conditional = GaussianConditional(table)

    # ----------------------------------------------------------------- training
    def forward(self, x: Tensor) -> LatentForward:
        y = self.g_a(x)
        z = self.h_a(y)
        z_hat, z_likelihoods = self.entropy_bottleneck(z)
        means, positions = self.h_s(z_hat).chunk(2, dim=1)
        y_hat, y_likelihoods = self.gaussian_conditional(y, self.scales(positions), means=means)
        return LatentForward(y=y, means=means, y_hat=y_hat, y_likelihoods=y_likelihoods, z_likelihoods=z_likelihoods)

    def scales(self, positions: Tensor) -> Tensor:
        """Gaussian scales from positions in the log-uniform scale table (continuous in training)."""
        positions = positions.clamp(0.0, self.config.scale_levels - 1.0)
        return torch.exp(self.log_scale_min + positions * self.log_scale_step)

    def aux_loss(self) -> Tensor:
        """compressai's auxiliary loss that fits the z prior's quantiles (train it alongside)."""
        return self.entropy_bottleneck.loss()

    @torch.no_grad()
    def freeze(self) -> None:
        """Compute the CDF tables and the fixed-point h_s once, after training.

        They are buffers: saved with the weights and never recomputed when a model is
        loaded, so a decoder always uses the encoder's exact tables.
        """
        self.entropy_bottleneck.update(force=True)
        self.gaussian_conditional.update()
        self.h_s_fixed.quantize_from(self.h_s)

    # ----------------------------------------------------------------- coding
    @torch.no_grad()
    def quantize(self, x: Tensor) -> QuantizedLatent:
        """A batch of padded images' latent exactly as :meth:`compress` codes it, without the
        entropy coding: training on a frozen codec needs y_hat at every step, the bytes rarely."""
        y = self.g_a(x)
        z_symbols = self._z_symbols(self.h_a(y))
        means, indexes = self._y_parameters(z_symbols)
        y_symbols = self.gaussian_conditional.quantize(y.double(), "symbols", means).to(torch.int64)
        return QuantizedLatent(z_symbols=z_symbols, y_symbols=y_symbols, means=means, indexes=indexes)

    @torch.no_grad()
    def compress(self, x: Tensor) -> tuple[list[LatentBitstreams], Tensor]:
        """Code a batch of padded images; also return y_hat exactly as a decoder will see it."""
        y = self.g_a(x)
        z = self.h_a(y)
        means, indexes = self._y_parameters(self._z_symbols(z))
        z_strings = self.entropy_bottleneck.compress(z)
        y_strings = self.gaussian_conditional.compress(y.double(), indexes, means)
        streams = [LatentBitstreams(z=zs, y=ys) for zs, ys in zip(z_strings, y_strings)]
        return streams, self.gaussian_conditional.quantize(y.double(), "dequantize", means).float()

    @torch.no_grad()
    def decompress(self, streams: list[LatentBitstreams], padded_size: tuple[int, int]) -> Tensor:
        """Decode y_hat for a batch of images that share one padded size."""
        z_symbols = self._decode_z([s.z for s in streams], padded_size)
        means, indexes = self._y_parameters(z_symbols)
        return self._decode_y([s.y for s in streams], means, indexes)

    @torch.no_grad()
    def compress_tiled(self, pixels: PixelSource, padded_size: tuple[int, int], tile: int,
                       device: torch.device) -> tuple[TiledBitstreams, Tensor]:
        """Code one padded image block by block; also return y_hat (1, M, H/16, W/16) exactly
        as :meth:`decompress_tiled` will.

        The analysis transforms run on blocks widened by their receptive fields, so y and z
        are the whole image's (to float rounding: the encoder's business alone). z is coded
        whole; each block's y is coded with the means and scales that the integer h_s gives
        from z around the block (:data:`HYPER_SYNTHESIS_HALO`): exactly the whole image's,
        so the blocks cost the rate of one string each (a few bytes) and no more.
        """
        height, width = padded_size
        grid = [(r, c) for r in blocks(height, tile) for c in blocks(width, tile)]
        y = torch.empty((1, self.config.latent_channels, height // LATENT_STRIDE, width // LATENT_STRIDE), device=device)
        for r, c in grid:
            (top, bottom), (left, right) = (halo(s, ANALYSIS_HALO, LATENT_STRIDE, n) for s, n in ((r, height), (c, width)))
            crop = self.g_a(pixels(top * LATENT_STRIDE, left * LATENT_STRIDE,
                                   (bottom - top) * LATENT_STRIDE, (right - left) * LATENT_STRIDE))
            y[_latent(r, c)] = crop[_latent(r, c, top, left)]
        z = torch.empty((1, self.config.hyper_channels, height // HYPER_STRIDE, width // HYPER_STRIDE), device=device)
        ratio = HYPER_STRIDE // LATENT_STRIDE
        for r, c in grid:
            (top, bottom), (left, right) = (halo(s, HYPER_ANALYSIS_HALO, LATENT_STRIDE, n) for s, n in ((r, height), (c, width)))
            crop = self.h_a(y[..., top:bottom, left:right])
            z[_hyper(r, c)] = crop[_hyper(r, c, top // ratio, left // ratio)]
        z_symbols = self._z_symbols(z)
        [z_string] = self.entropy_bottleneck.compress(z)
        y_strings = []
        for r, c in grid:
            means, indexes = self._block_parameters(z_symbols, r, c, padded_size)
            block = y[_latent(r, c)].double()
            y_strings += self.gaussian_conditional.compress(block, indexes, means)
            y[_latent(r, c)] = self.gaussian_conditional.quantize(block, "dequantize", means).float()
        return TiledBitstreams(z=z_string, y=y_strings), y

    @torch.no_grad()
    def decompress_tiled(self, streams: TiledBitstreams, padded_size: tuple[int, int], tile: int,
                         device: torch.device) -> Tensor:
        """y_hat of one image coded by :meth:`compress_tiled`, decoded one block at a time."""
        height, width = padded_size
        z_symbols = self._decode_z([streams.z], padded_size).to(device)
        y_hat = torch.empty((1, self.config.latent_channels, height // LATENT_STRIDE, width // LATENT_STRIDE), device=device)
        grid = [(r, c) for r in blocks(height, tile) for c in blocks(width, tile)]
        for (r, c), string in zip(grid, streams.y, strict=True):
            means, indexes = self._block_parameters(z_symbols, r, c, padded_size)
            y_hat[_latent(r, c)] = self._decode_y([string], means, indexes)
        return y_hat

    def _block_parameters(self, z_symbols: Tensor, r: Span, c: Span, padded_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Means and CDF indexes of one block's y, from z around it (exactly the whole image's)."""
        (top, bottom), (left, right) = (halo(s, HYPER_SYNTHESIS_HALO, HYPER_STRIDE, n) for s, n in zip((r, c), padded_size))
        means, indexes = self._y_parameters(z_symbols[..., top:bottom, left:right])
        ratio = HYPER_STRIDE // LATENT_STRIDE
        inside = _latent(r, c, top * ratio, left * ratio)
        return means[inside], indexes[inside]

    def _z_medians(self) -> Tensor:
        return self.entropy_bottleneck.quantiles[:, 0, 1].view(1, -1, 1, 1)

    def _z_symbols(self, z: Tensor) -> Tensor:
        """z's integer symbols as the EntropyBottleneck codes them: round(z - median).

        The same function of the decoded z_hat (symbol + median in float32) gives the symbols
        back exactly: both roundings together are off by less than 1/4 for any symbol below
        2^22, and a real z is many orders of magnitude smaller.
        """
        return self.entropy_bottleneck.quantize(z, "symbols", self._z_medians()).to(torch.int64)

    def _decode_z(self, strings: list[bytes], padded_size: tuple[int, int]) -> Tensor:
        """The integer z symbols of a batch of z strings for images of one padded size."""
        height, width = padded_size
        size = (height // HYPER_STRIDE, width // HYPER_STRIDE)
        symbols = self.config.hyper_channels * size[0] * size[1]
        z_hat = self.entropy_bottleneck.decompress([readable_string(s, symbols) for s in strings], size)
        return self._z_symbols(z_hat)

    def _decode_y(self, strings: list[bytes], means: Tensor, indexes: Tensor) -> Tensor:
        """y_hat (symbols + the exact means) of y strings coded with these means and indexes."""
        symbols = indexes[0].numel()
        y_hat = self.gaussian_conditional.decompress([readable_string(s, symbols) for s in strings], indexes,
                                                     means=means)
        return y_hat.float()

    def _y_parameters(self, z_symbols: Tensor) -> tuple[Tensor, Tensor]:
        """Exact means (float64) and CDF indexes of y from the integer z symbols."""
        z_fixed = z_symbols.to(torch.float64) * 2.0**ACT_FRAC_BITS + to_fixed(self._z_medians())
        means_fixed, positions_fixed = self.h_s_fixed(z_fixed).chunk(2, dim=1)
        means = means_fixed * 2.0**-ACT_FRAC_BITS
        half = 2.0 ** (ACT_FRAC_BITS - 1)
        indexes = torch.floor((positions_fixed + half) * 2.0**-ACT_FRAC_BITS)
        indexes = indexes.clamp(0, self.config.scale_levels - 1).to(torch.int64)
        return means, indexes


def readable_string(string: bytes, symbols: int) -> bytes:
    """Check a rANS string's length against the number of symbols it codes; return it with a
    zero tail of one word per symbol.

    compressai's decoder reads 32-bit words without bounds checks: a string shorter than its
    symbols need (a record forged with a valid checksum) would make it read past the end of
    the buffer and crash the process. Each decode step reads at most one word (bypass-coded
    values aside, which a zero tail does not produce), so the tail keeps every read inside
    the buffer; a string that was really written never reaches it, and decodes as before.
    """
    length = len(string)
    if length % RANS_WORD_BYTES or not RANS_FLUSH_BYTES <= length <= RANS_FLUSH_BYTES + RANS_MAX_BYTES_PER_SYMBOL * symbols:
        raise RecordError(f"entropy-coded string of {length} bytes is impossible for {symbols} symbols "
                          f"(whole {RANS_WORD_BYTES}-byte words, {RANS_FLUSH_BYTES} to "
                          f"{RANS_FLUSH_BYTES + RANS_MAX_BYTES_PER_SYMBOL * symbols} bytes)")
    return string + bytes(RANS_WORD_BYTES * symbols)


def _latent(r: Span, c: Span, top: int = 0, left: int = 0) -> tuple[slice, ...]:
    """Index of block (r, c) in a stride-16 tensor whose first position is (top, left)."""
    return (..., slice(r.start // LATENT_STRIDE - top, r.stop // LATENT_STRIDE - top),
            slice(c.start // LATENT_STRIDE - left, c.stop // LATENT_STRIDE - left))


def _hyper(r: Span, c: Span, top: int = 0, left: int = 0) -> tuple[slice, ...]:
    """Index of block (r, c) in a stride-64 tensor whose first position is (top, left)."""
    return (..., slice(r.start // HYPER_STRIDE - top, r.stop // HYPER_STRIDE - top),
            slice(c.start // HYPER_STRIDE - left, c.stop // HYPER_STRIDE - left))


def pad_amount(size: int) -> int:
    """Rows (or columns) to add so that ``size`` becomes a multiple of HYPER_STRIDE."""
    return (-size) % HYPER_STRIDE


def pad_to_stride(x: Tensor) -> Tensor:
    """Replicate-pad the bottom and right edges to a multiple of 64 (cropped after decoding)."""
    height, width = x.shape[-2:]
    return F.pad(x, (0, pad_amount(width), 0, pad_amount(height)), mode="replicate")
