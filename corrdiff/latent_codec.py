"""The mean-scale hyperprior latent codec: x -> (z, y) bitstreams -> y_hat.

Training uses compressai's differentiable entropy models (likelihoods, noisy
quantization). Coding uses compressai's rANS coder with CDF tables that are computed once
by :meth:`LatentCodec.freeze` and stored as buffers, and a fixed-point hyper-synthesis
(:mod:`corrdiff.fixed_point`), so that everything that selects a CDF, and y_hat itself,
is bit-identical on the encoder and on any decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from compressai.ans import RansDecoder, RansEncoder
from compressai.entropy_models import EntropyBottleneck, EntropyModel, GaussianConditional
from corrdiff.layers import GDN
from torch import Tensor, nn

from corrdiff.config import LatentConfig
from corrdiff.fixed_point import ACT_FRAC_BITS, FixedPointHyperSynthesis, HyperSynthesis, to_fixed
from corrdiff.record import RecordError

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
        self._rans_encoder = RansEncoder()
        self._rans_decoder = RansDecoder()

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
        z = self.h_a(y)
        z_symbols = torch.round(z - self._z_medians()).to(torch.int64)
        means, indexes = self._y_parameters(z_symbols)
        y_symbols = torch.round(y.double() - means).to(torch.int64)
        return QuantizedLatent(z_symbols=z_symbols, y_symbols=y_symbols, means=means, indexes=indexes)

    @torch.no_grad()
    def compress(self, x: Tensor) -> tuple[list[LatentBitstreams], Tensor]:
        """Code a batch of padded images; also return y_hat exactly as a decoder will see it."""
        q = self.quantize(x)
        z_strings = self._encode(self.entropy_bottleneck, q.z_symbols, self._z_indexes(q.z_symbols.shape))
        y_strings = self._encode(self.gaussian_conditional, q.y_symbols, q.indexes)
        streams = [LatentBitstreams(z=zs, y=ys) for zs, ys in zip(z_strings, y_strings)]
        return streams, q.y_hat

    @torch.no_grad()
    def decompress(self, streams: list[LatentBitstreams], padded_size: tuple[int, int]) -> Tensor:
        """Decode y_hat for a batch of images that share one padded size."""
        height, width = padded_size
        z_shape = (len(streams), self.config.hyper_channels, height // HYPER_STRIDE, width // HYPER_STRIDE)
        z_symbols = self._decode(self.entropy_bottleneck, [s.z for s in streams], self._z_indexes(z_shape))
        means, indexes = self._y_parameters(z_symbols)
        y_symbols = self._decode(self.gaussian_conditional, [s.y for s in streams], indexes)
        return (y_symbols + means).float()

    def _z_medians(self) -> Tensor:
        return self.entropy_bottleneck.quantiles[:, 0, 1].view(1, -1, 1, 1)

    def _z_indexes(self, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """z element -> CDF index: the factorized prior has one CDF per channel."""
        batch, channels, height, width = shape
        return torch.arange(channels, device=self._z_medians().device).view(1, -1, 1, 1).expand(batch, channels, height, width)

    def _y_parameters(self, z_symbols: Tensor) -> tuple[Tensor, Tensor]:
        """Exact means (float64) and CDF indexes of y from the integer z symbols."""
        z_fixed = z_symbols.to(torch.float64) * 2.0**ACT_FRAC_BITS + to_fixed(self._z_medians())
        means_fixed, positions_fixed = self.h_s_fixed(z_fixed).chunk(2, dim=1)
        means = means_fixed * 2.0**-ACT_FRAC_BITS
        half = 2.0 ** (ACT_FRAC_BITS - 1)
        indexes = torch.floor((positions_fixed + half) * 2.0**-ACT_FRAC_BITS)
        indexes = indexes.clamp(0, self.config.scale_levels - 1).to(torch.int64)
        return means, indexes

    def _encode(self, model: EntropyModel, symbols: Tensor, indexes: Tensor) -> list[bytes]:
        cdfs, lengths, offsets = _cdf_tables(model)
        return [
            self._rans_encoder.encode_with_indexes(
                symbols[i].reshape(-1).tolist(), indexes[i].reshape(-1).tolist(), cdfs, lengths, offsets,
            )
            for i in range(symbols.shape[0])
        ]

    def _decode(self, model: EntropyModel, strings: list[bytes], indexes: Tensor) -> Tensor:
        cdfs, lengths, offsets = _cdf_tables(model)
        symbols = indexes[0].numel()
        decoded = [
            self._rans_decoder.decode_with_indexes(
                readable_string(string, symbols), indexes[i].reshape(-1).tolist(), cdfs, lengths, offsets,
            )
            for i, string in enumerate(strings)
        ]
        return torch.tensor(decoded, dtype=torch.int64, device=indexes.device).view(indexes.shape)


def _cdf_tables(model: EntropyModel) -> tuple[list[list[int]], list[int], list[int]]:
    if model._quantized_cdf.numel() == 0:
        raise RuntimeError("entropy model has no CDF tables: call LatentCodec.freeze() after training")
    return (
        model._quantized_cdf.tolist(),
        model._cdf_length.reshape(-1).tolist(),
        model._offset.reshape(-1).tolist(),
    )


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


def pad_amount(size: int) -> int:
    """Rows (or columns) to add so that ``size`` becomes a multiple of HYPER_STRIDE."""
    return (-size) % HYPER_STRIDE


def pad_to_stride(x: Tensor) -> Tensor:
    """Replicate-pad the bottom and right edges to a multiple of 64 (cropped after decoding)."""
    height, width = x.shape[-2:]
    return F.pad(x, (0, pad_amount(width), 0, pad_amount(height)), mode="replicate")
