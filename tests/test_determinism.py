"""The codec's matrix-product layers (1x1 convolutions, GDN) give the same bits for any CPU thread count."""

from __future__ import annotations

import pytest
import torch

from corrdiff.layers import GDN, PointwiseConv2d


def _with_threads(fn, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("layer", [PointwiseConv2d(8, 4), GDN(8), GDN(8, inverse=True)], ids=["pointwise", "gdn", "igdn"])
def test_thread_count_does_not_change_results(layer):
    x = torch.randn((1, 8, 192, 256), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_with_threads(lambda: layer(x), 1), _with_threads(lambda: layer(x), 2))


def test_pointwise_equals_a_1x1_convolution():
    layer = PointwiseConv2d(8, 4)
    x = torch.randn((2, 8, 5, 7))
    with torch.no_grad():
        reference = torch.nn.functional.conv2d(x, layer.weight, layer.bias)
        assert torch.allclose(layer(x), reference, atol=1e-5)


@pytest.mark.parametrize("inverse", [False, True])
def test_gdn_equals_compressai_gdn(inverse):
    from compressai.layers import GDN as CompressaiGDN

    ours, theirs = GDN(8, inverse=inverse), CompressaiGDN(8, inverse=inverse)
    with torch.no_grad():
        ours.gamma.add_(torch.rand_like(ours.gamma) * 0.1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn((1, 8, 9, 11))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
