"""How much memory coding one image takes (format versions 2 and 3): for sizing workers.

Tiled coding (corrdiff.tiling) keeps two kinds of memory: the sampler's whole-image state,
known exactly (:data:`STATE_BYTES_PER_PIXEL` per padded pixel, plus y_hat), and the
networks' working set on one batch of tiles, which depends on the model, the tile and the
batch, not the image.
A pool sizes its workers as ``model + tile_working_bytes + image_bytes(largest image)``
(:func:`coding_bytes`);
the second term is an estimate from the architecture (activations the U-Net keeps for its
skips, plus a few of its largest working tensors), checked against the measured peaks of
benchmarks/memory.py (docs/benchmarks.md, "Memory").
"""

from __future__ import annotations

import math

from corrdiff.config import ModelConfig
from corrdiff.latent_codec import LATENT_STRIDE
from corrdiff.tiling import Tiling

FLOAT_BYTES = 4
# x_t, x_e and the blended x0 estimate (float32, 3 channels each), the uint8 image in and out.
STATE_BYTES_PER_PIXEL = 3 * 3 * FLOAT_BYTES + 2 * 3
# Working tensors alive beside the skips at the U-Net's widest layer (concatenation,
# GroupNorm, SiLU, convolution output, residual): measured peaks stay under this many.
WORKING_TENSORS = 6


def image_bytes(config: ModelConfig, padded_height: int, padded_width: int) -> int:
    """The whole-image state of one image in flight: sampler buffers and y_hat."""
    pixels = padded_height * padded_width
    return pixels * STATE_BYTES_PER_PIXEL + pixels // LATENT_STRIDE**2 * config.latent.latent_channels * FLOAT_BYTES


def tile_working_bytes(config: ModelConfig, tile: int, batch: int = 1) -> int:
    """Estimated peak of the networks on ``batch`` tiles of ``tile`` x ``tile`` (the score
    network's U-Net dominates, and grows with the batch; D and g_a run on one block of the
    same side at a time and hold less). A format 1 record runs them on the whole image: its
    tile is the image's padded side, its batch one."""
    score = config.score
    side = tile // score.patch_size
    area = side * side
    skips, widest = 0, 0
    channels = score.base_channels
    skips += channels * area
    for level, mult in enumerate(score.channel_mults):
        level_area = area >> (2 * level)
        width = score.base_channels * mult
        skips += width * level_area * score.res_blocks
        widest = max(widest, (channels + width) * level_area)
        channels = width
        if level < len(score.channel_mults) - 1:
            skips += channels * (level_area >> 2)
    inputs = (6 * score.patch_size**2 + score.latent_cond_channels) * area
    decoder = config.decoder_channels * (tile // 2) ** 2 * 3  # D's last hidden layer, GDN's temporaries
    return FLOAT_BYTES * (batch * (skips + inputs + WORKING_TENSORS * widest) + decoder)


def coding_bytes(config: ModelConfig, tiling: Tiling | None, pixels: int) -> int:
    """What coding an image of ``pixels`` pixels takes beyond the loaded model: the tile's
    working set and the whole-image state, the image padded as a square would be (padding
    adds at most 15 rows and columns; for a photograph's shape, well under 1 %). ``tiling``
    None: a format 1 record, whose networks run on the whole image."""
    side = math.isqrt(max(pixels, 1) - 1) + 1
    padded = -(-side // LATENT_STRIDE) * LATENT_STRIDE
    if tiling is None:
        return tile_working_bytes(config, padded) + image_bytes(config, padded, padded)
    return tile_working_bytes(config, tiling.tile, tiling.batch) + image_bytes(config, padded, padded)
