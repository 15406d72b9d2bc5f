"""Tiled coding (format versions 2 and 3): the grids, the halos the networks need, and records
that cross tile boundaries, in batches of tiles or one at a time, round-tripping exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corrdiff import CorrDiffCodec
from corrdiff.codec import pixel_source
from corrdiff.latent_codec import _latent
from corrdiff.record import Record
from corrdiff.tiled_sampler import reconstruct_e2e_tiled
from corrdiff.tiling import Tiling, blocks, score_tiles, tile_batches

from conftest import smooth_image


@pytest.mark.parametrize("spread", [True, False])
@pytest.mark.parametrize("length, tile, overlap", [(64, 512, 64), (640, 512, 64), (1344, 256, 64), (2048, 512, 0),
                                                    (704, 192, 96), (6016, 512, 64), (832, 512, 64), (4032, 1024, 32)])
def test_score_tiles_cover_every_pixel_with_weights_summing_to_one(length, tile, overlap, spread):
    spans = score_tiles(length, tile, overlap, spread)
    assert len({s.size for s in spans}) == 1 and spans[0].size <= tile  # one tile size: no padded edge tiles
    assert spread or spans[0].size == min(tile, length)
    assert spans[0].start == 0 and spans[-1].stop == length
    assert all(s.start % 16 == 0 for s in spans)  # on the latent's grid
    assert all(b.start - a.start <= tile - overlap for a, b in zip(spans, spans[1:]))  # overlap at least `overlap`
    total = torch.zeros(length, dtype=torch.float64)
    for s in spans:
        assert bool((s.weights > 0).all())
        total[s.start:s.stop] += s.weights.double()
    assert torch.allclose(total, torch.ones(length, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("length, tile, overlap, expected", [
    (832, 512, 64, [(0, 448), (384, 448)]),  # format 2: (0, 512), (320, 512)
    (1280, 512, 64, [(0, 480), (400, 480), (800, 480)]),  # format 2: 0, 448, 768 of 512
    (640, 512, 64, [(0, 352), (288, 352)]),
    (6016, 512, 64, None),
])
def test_spread_score_tiles_are_the_fewest_and_smallest_that_fit(length, tile, overlap, expected):
    """As few tiles as format 2 cuts, each as small as covering the axis with overlaps of at
    least ``overlap`` allows: the network sees 1.1-1.3 times the image instead of up to 1.6."""
    spread, fixed = score_tiles(length, tile, overlap, True), score_tiles(length, tile, overlap, False)
    assert len(spread) == len(fixed)
    size = spread[0].size
    assert size - 16 < (length + (len(spread) - 1) * overlap) / len(spread) <= size
    if expected is not None:
        assert [(s.start, s.size) for s in spread] == expected


def test_blocks_partition_the_image():
    assert [(b.start, b.size) for b in blocks(1344, 512)] == [(0, 512), (512, 512), (1024, 320)]


def test_tile_batches_are_consecutive_tiles_in_raster_order():
    rows, cols = score_tiles(1024, 512, 64, True), score_tiles(1536, 512, 64, True)  # 3 x 4 tiles
    batches = tile_batches(rows, cols, 5)
    assert [len(b) for b in batches] == [5, 5, 2]
    assert [(r.start, c.start) for b in batches for r, c in b] == [(r.start, c.start) for r in rows for c in cols]
    assert tile_batches(rows, cols, 16) == [[(r, c) for r in rows for c in cols]]


def test_an_invalid_tiling_is_refused_by_the_codec():
    with pytest.raises(ValueError, match="invalid tile overlap"):
        Tiling(tile=256, overlap=200)
    with pytest.raises(ValueError, match="invalid tile batch 5: from 1 to 4 tiles of 1024 px"):
        Tiling(tile=1024, overlap=0, batch=5)


def _halo_variant(monkeypatch, name: str, value: int) -> None:
    import corrdiff.latent_codec
    import corrdiff.tiled_sampler

    for module in (corrdiff.latent_codec, corrdiff.tiled_sampler):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)


def test_each_halo_is_what_its_network_reads(codec, monkeypatch):
    """Block by block with the format's halos, h_s is exactly the whole image's and D and
    g_a equal it to float rounding; one position less and they do not (the receptive field,
    measured on the tiny model, whose layers have the shipped models' kernels and strides)."""
    latent = codec.model.latent
    image = smooth_image(384, 320, seed=3)
    x = pixel_source(image, codec.device)(0, 0, 384, 320)

    # h_s: each block's means and scales, from z around it, are the whole image's exactly.
    z_symbols = torch.randint(-4, 5, (1, 8, 6, 5), generator=torch.Generator().manual_seed(0))

    def blocks_match() -> bool:
        means, indexes = latent._y_parameters(z_symbols)
        return all(torch.equal(latent._block_parameters(z_symbols, r, c, (384, 320))[0], means[_latent(r, c)]) and
                   torch.equal(latent._block_parameters(z_symbols, r, c, (384, 320))[1], indexes[_latent(r, c)])
                   for r in blocks(384, 128) for c in blocks(320, 128))

    assert blocks_match()
    _halo_variant(monkeypatch, "HYPER_SYNTHESIS_HALO", 2)
    assert not blocks_match()
    monkeypatch.undo()
    q = latent.quantize(x)
    assert torch.equal(latent.compress_tiled(pixel_source(image, codec.device), (384, 320), 128, codec.device)[1],
                       q.y_hat)

    y_hat = q.y_hat
    whole = codec.model.reconstruct_e2e(y_hat)
    assert (reconstruct_e2e_tiled(codec.model, y_hat, 128) - whole).abs().max() < 1e-5
    _halo_variant(monkeypatch, "DECODER_HALO", 1)
    assert (reconstruct_e2e_tiled(codec.model, y_hat, 128) - whole).abs().max() > 1e-4
    monkeypatch.undo()

    # The encoder-only halos: g_a (2 positions) and h_a (8, whole z positions), on crops
    # that start inside the image (their other sides are the image's own edges).
    y = latent.g_a(x)
    crop = latent.g_a(x[..., 64:, 64:])  # y positions from 4
    assert (crop[..., 2:, 2:] - y[..., 6:, 6:]).abs().max() < 1e-5
    assert (crop[..., 1:, 1:] - y[..., 5:, 5:]).abs().max() > 1e-4
    z = latent.h_a(y)
    crop = latent.h_a(y[..., 8:, 8:])  # z positions from 2
    assert (crop[..., 2:, 2:] - z[..., 4:, 4:]).abs().max() < 1e-5
    assert (crop[..., 1:, 1:] - z[..., 3:, 3:]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def tiled(codec):
    """A 150 x 230 image (192 x 256 padded) in 128 px tiles overlapping by 32: 2 x 3 score
    tiles, 2 x 2 blocks."""
    tiled_codec = CorrDiffCodec(codec.model, device="cpu", tiling=Tiling(tile=128, overlap=32))
    image = smooth_image(150, 230, seed=5)
    return tiled_codec, image, tiled_codec.encode_detailed([image])[0]


def test_a_tiled_record_decodes_to_the_encoders_pixels(tiled):
    tiled_codec, image, encoded = tiled
    record = Record.from_bytes(encoded.record)
    assert (record.version, record.tile, record.overlap, record.tile_batch, len(record.y_strings)) == (3, 128, 32, 1, 4)
    [decoded] = tiled_codec.decode([encoded.record])
    assert decoded.shape == image.shape and np.array_equal(decoded, encoded.reconstruction)
    # Any codec decodes it: the record, not the decoder's setting, says how it was cut.
    assert np.array_equal(CorrDiffCodec(tiled_codec.model, device="cpu").decode([encoded.record])[0], decoded)


def test_a_batch_of_tiles_is_the_records_and_decodes_to_the_encoders_pixels(tiled):
    """Six score tiles in batches of four (then the two left): the decoder runs the record's
    batches whatever its own setting, and reproduces the encoder's pixels exactly; the
    batches change only the floats' rounding, so the image is the batch-one one's to a level."""
    tiled_codec, image, one_at_a_time = tiled
    batched = CorrDiffCodec(tiled_codec.model, device="cpu", tiling=Tiling(tile=128, overlap=32, batch=4))
    [encoded] = batched.encode_detailed([image])
    assert Record.from_bytes(encoded.record).tiling == Tiling(128, 32, 4)
    for decoder in (batched, tiled_codec):
        assert np.array_equal(decoder.decode([encoded.record])[0], encoded.reconstruction)
    assert torch.equal(encoded.latent, one_at_a_time.latent)
    difference = np.abs(encoded.reconstruction.astype(np.int16) - one_at_a_time.reconstruction.astype(np.int16))
    assert difference.max() <= 1


def test_a_tiled_record_is_the_same_every_time_and_other_thread_counts_only_round_differently(tiled):
    """Same thread count: the same record and the same pixels, encoder and decoder alike. Another
    thread count decodes the same latent (fixed point) through float kernels that may split their
    sums otherwise (oneDNN on AVX-512 does, for some shapes): a few pixels at a rounding boundary
    move by one level, nothing more (docs/method.md, "Reproducible pixels")."""
    tiled_codec, image, encoded = tiled
    [again] = tiled_codec.encode_detailed([image])
    assert again.record == encoded.record and np.array_equal(again.reconstruction, encoded.reconstruction)
    previous = torch.get_num_threads()
    torch.set_num_threads(1 if previous > 1 else 2)
    try:
        [other] = tiled_codec.decode([encoded.record])
        latent = tiled_codec.latent(Record.from_bytes(encoded.record))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(latent, encoded.latent)
    difference = np.abs(other.astype(np.int16) - encoded.reconstruction.astype(np.int16))
    assert difference.max() <= 1 and np.count_nonzero(difference) <= difference.size // 1000


def test_an_image_within_one_tile_is_coded_as_a_whole(codec, encoded, images):
    """The default tile holds the test images: one block, one score tile, and the same bytes
    as a tiling whose tile is the whole image."""
    whole = CorrDiffCodec(codec.model, device="cpu", tiling=Tiling(tile=2048, overlap=0))
    [again] = whole.encode_detailed([images[2]])
    assert Record.from_bytes(encoded[2].record).tile == 512
    assert Record.from_bytes(again.record).y_strings == Record.from_bytes(encoded[2].record).y_strings
    assert np.array_equal(again.reconstruction, encoded[2].reconstruction)
