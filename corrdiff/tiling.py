"""Where the tiles of a padded image lie, and how overlapping tiles are blended.

Format versions 2 and 3 (docs/format.md) code an image in tiles so that the networks' memory
is set by the tile, not by the image. Two grids, both functions of the padded size and the
record's numbers (``tile``, ``overlap``; the batch and the version for the score network's
calls) alone, so the encoder and every decoder cut an image the same way:

* **blocks**: non-overlapping ``tile x tile`` squares in raster order (the last ones in a
  row or column smaller). The latent is coded one block at a time (one y string each), and
  D reconstructs one block at a time from a halo of the latent around it (its receptive
  field: :data:`DECODER_HALO`), so D's output does not depend on the cut.
* **score tiles**: on each axis longer than ``tile``, the fewest tiles of at most
  ``tile`` px that overlap by at least ``overlap`` px, all of one size (the smallest
  multiple of 16 that covers the axis with that many), spread evenly from edge to edge
  (format 3, :func:`score_tiles`); where the axis is shorter, one tile of the whole side.
  Format 2 cut tiles of exactly ``tile`` px and moved the last one back to end at the edge
  (``spread=False``), which runs up to 1.6 times the image's pixels through the network
  where spreading runs 1.1 to 1.3 times (docs/method.md "Tiles"). The score network's
  GroupNorm makes its output depend on the whole tile, so overlapping outputs are blended
  with a raised-cosine ramp over ``overlap`` pixels, normalised so the weights sum to one
  at every pixel. The window is separable and the tiles form a grid, so the normalisation
  is a product of two 1-D sums. From format version 3 the score network runs on ``batch``
  tiles at a time, consecutive in raster order (:func:`tile_batches`): a batch changes the
  kernels' float rounding, so the record fixes it like the grid, and the encoder's and
  every decoder's batches are the same tiles.

An image that fits in one tile is one block and one score tile: it is coded exactly as a
whole image, at the cost of a few header bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# A tile's side is a multiple of the hyper-latent's stride (64 px), so blocks hold whole
# z positions; the overlap is a multiple of the latent's stride (16 px), so every score
# tile starts on a y position. Bounded because a record chooses them: a decoder's memory
# is set by the tile (2048 px: about 2.3 GB for the default model's score network).
TILE_MULTIPLE = 64
LATENT_GRID = 16  # px: score tiles start, end and overlap on latent positions
OVERLAP_MULTIPLE = LATENT_GRID
MAX_TILE = 2048
# The most pixels the score network sees in one call: a batch of tiles is at most as large
# as one tile of the largest side, so a record's batch cannot raise a decoder's memory bound.
MAX_BATCH_PIXELS = MAX_TILE * MAX_TILE
# Halos, in latent (stride-16) positions unless said otherwise: how far outside a block
# each network reads, measured (tests/test_tiling.py: with one position less, a block's
# result differs from the whole image's; docs/method.md "Tiles"). With them a block's
# result is the whole image's: exactly for the integer h_s, to float rounding at most for
# the float networks (bit-identical on the CPU in the measurement). D's halo is part of
# the format: decoders must cut as the encoder did. The analysis halos are the encoder's
# alone (they only decide which y it codes).
ANALYSIS_HALO = 2  # g_a: four stride-2 5x5 convolutions read 30 px beyond a position
HYPER_ANALYSIS_HALO = 8  # h_a: 3x3, then two stride-2 5x5 (7 y positions), in whole z positions
HYPER_SYNTHESIS_HALO = 3  # h_s, in z (stride-64) positions: three 3x3 layers, the last at half z
DECODER_HALO = 2  # D: four stride-2 transposed 5x5 convolutions read 1 to 2 y positions away


@dataclass(frozen=True)
class Tiling:
    """The encoder's choice of tile side and overlap, in pixels, and of how many score tiles
    the network runs at once (stored in each record).

    ``batch`` 1 (the default) is fastest on a CPU: measured there, a batch of 512 px tiles
    costs more per tile, not less (docs/method.md "Batches of tiles"). A GPU runs one small
    tile far below its capacity; a record written with a larger batch is decoded with it
    everywhere, at that cost on a CPU.
    """

    tile: int = 512
    overlap: int = 64
    batch: int = 1

    def __post_init__(self) -> None:
        check_tiling(self.tile, self.overlap, self.batch, ValueError)


def max_batch(tile: int) -> int:
    """The largest batch of ``tile`` px tiles a record may ask for (:data:`MAX_BATCH_PIXELS`)."""
    return MAX_BATCH_PIXELS // (tile * tile)


def check_tiling(tile: int, overlap: int, batch: int, error: type[Exception]) -> None:
    """Raise ``error`` unless (tile, overlap, batch) is valid (shared by the codec and the parser)."""
    if not (TILE_MULTIPLE <= tile <= MAX_TILE and tile % TILE_MULTIPLE == 0):
        raise error(f"invalid tile side {tile}: a multiple of {TILE_MULTIPLE} from {TILE_MULTIPLE} to {MAX_TILE}")
    if not (0 <= overlap <= tile // 2 and overlap % OVERLAP_MULTIPLE == 0):
        raise error(f"invalid tile overlap {overlap}: a multiple of {OVERLAP_MULTIPLE} from 0 to half the tile "
                    f"({tile // 2})")
    if not 1 <= batch <= max_batch(tile):
        raise error(f"invalid tile batch {batch}: from 1 to {max_batch(tile)} tiles of {tile} px "
                    f"({MAX_BATCH_PIXELS} px in one network call)")


@dataclass(frozen=True)
class Span:
    """A tile's extent on one axis, in pixels, and its normalised blend weights there."""

    start: int
    size: int
    weights: Tensor | None = None  # (size,) float32; None for blocks (no blending)

    @property
    def stop(self) -> int:
        return self.start + self.size


def blocks(length: int, tile: int) -> list[Span]:
    """Non-overlapping spans of ``tile`` pixels covering ``length`` (the last one shorter)."""
    return [Span(start, min(tile, length - start)) for start in range(0, length, tile)]


def halo(span: Span, halo_positions: int, stride: int, length: int) -> tuple[int, int]:
    """A span in positions of ``stride`` px, widened by ``halo_positions`` and clipped to the image."""
    return max(0, span.start // stride - halo_positions), min(length // stride, span.stop // stride + halo_positions)


def score_tiles(length: int, tile: int, overlap: int, spread: bool) -> list[Span]:
    """Score-network spans of one axis with their normalised blend weights: spread evenly
    (format 3) or, ``spread=False``, format 2's tiles of ``tile`` px with the last moved back.

    Spread: n = ceil((L - O) / (T - O)) tiles (the fewest that fit T with overlaps of O), of
    size t = the smallest multiple of 16 >= (L + (n - 1) O) / n (<= T, since n (T - O) >= L - O),
    starting at floor16(i (L - t) / (n - 1)): every start is a latent position, the first
    tile starts at 0, the last ends at L, and two neighbours' starts are at most
    ceil16((L - t) / (n - 1)) <= t - O apart, so they overlap by at least O.
    """
    if length <= tile:
        return [Span(0, length, torch.ones(length))]
    count = math.ceil((length - overlap) / (tile - overlap))
    if spread:
        size = -(-(length + (count - 1) * overlap) // (count * LATENT_GRID)) * LATENT_GRID
        starts = [i * (length - size) // (count - 1) // LATENT_GRID * LATENT_GRID for i in range(count)]
    else:
        size = tile
        starts = [min(i * (tile - overlap), length - tile) for i in range(count)]
    windows = [_window(size, overlap, first=i == 0, last=i == count - 1) for i in range(count)]
    total = torch.zeros(length, dtype=torch.float64)
    for start, window in zip(starts, windows):
        total[start:start + size] += window
    return [Span(start, size, (window / total[start:start + size]).float()) for start, window in zip(starts, windows)]


def tile_batches(rows: list[Span], cols: list[Span], batch: int) -> list[list[tuple[Span, Span]]]:
    """The score tiles (row span, column span) in raster order, in consecutive groups of
    ``batch`` (the last one smaller): the network calls of one step."""
    tiles = [(r, c) for r in rows for c in cols]
    return [tiles[start:start + batch] for start in range(0, len(tiles), batch)]


def _window(tile: int, overlap: int, first: bool, last: bool) -> Tensor:
    """1 inside, a raised-cosine ramp (never 0) over ``overlap`` px toward each neighbour."""
    window = torch.ones(tile, dtype=torch.float64)
    if overlap:
        ramp = torch.sin(math.pi * (torch.arange(overlap, dtype=torch.float64) + 0.5) / (2 * overlap)) ** 2
        if not first:
            window[:overlap] = ramp
        if not last:
            window[-overlap:] = ramp.flip(0)
    return window
