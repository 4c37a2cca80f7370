"""Strided-view pooling computes PyTorch's pooling (mammo_core.detection.strided_pools)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mammo_core.detection.strided_pools import (
    StridedAvgPool2d,
    StridedMaxPool2d,
    pooled_length,
    strided_equivalent,
)

MAX_POOLS = [
    nn.MaxPool2d(3, 2, 1),  # ResNet and DenseNet stems
    nn.MaxPool2d(2, 2, ceil_mode=True),  # the closing transition
    nn.MaxPool2d(2, 2),
    nn.MaxPool2d((3, 2), (1, 2), (1, 0)),
    nn.MaxPool2d(3, 3, 1, ceil_mode=True),
    nn.MaxPool2d(1, 2),
]
AVG_POOLS = [nn.AvgPool2d(2, 2), nn.AvgPool2d(3, 2), nn.AvgPool2d((2, 3), (2, 1))]
SHAPES = [(1, 5, 12, 10), (2, 3, 13, 11), (1, 4, 7, 2)]


@pytest.mark.parametrize("pool", MAX_POOLS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_max_pool_is_exact_on_even_and_odd_sizes(pool: nn.MaxPool2d, shape: tuple[int, ...]):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 0] = -1e30  # a window whose only real value is far below zero must not see the padding
    before = x.clone()
    strided = strided_equivalent(pool)
    assert isinstance(strided, StridedMaxPool2d)
    expected, got = pool(x), strided(x)
    assert got.shape == expected.shape and got.is_contiguous()
    assert torch.equal(got, expected)
    assert torch.equal(x, before)  # the windows are maximised into a new tensor, never into the input's views


@pytest.mark.parametrize("pool", AVG_POOLS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_avg_pool_agrees_up_to_rounding(pool: nn.AvgPool2d, shape: tuple[int, ...]):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    strided = strided_equivalent(pool)
    assert isinstance(strided, StridedAvgPool2d)
    expected, got = pool(x), strided(x)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_nan_propagates_through_max_as_in_pytorch():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = float("nan")
    got, expected = strided_equivalent(nn.MaxPool2d(2, 2))(x), nn.MaxPool2d(2, 2)(x)
    assert torch.equal(got.isnan(), expected.isnan()) and int(got.isnan().sum()) == 1


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2, dilation=2), nn.MaxPool2d(2, return_indices=True),
                                  nn.AvgPool2d(2, padding=1), nn.AvgPool2d(2, ceil_mode=True),
                                  nn.AvgPool2d(2, divisor_override=3), nn.AdaptiveAvgPool2d(1), nn.ReLU()], ids=repr)
def test_uncovered_pools_are_left_alone(pool: nn.Module):
    assert strided_equivalent(pool) is None


@pytest.mark.parametrize("length,kernel,stride,padding", [
    (n, k, s, p) for n in range(1, 12) for k, s, p in [(3, 2, 1), (2, 2, 0), (3, 3, 1), (2, 1, 1)] if n + 2 * p >= k])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pooled_length_matches_pytorch(length: int, kernel: int, stride: int, padding: int, ceil_mode: bool):
    out = nn.MaxPool2d((1, kernel), (1, stride), (0, padding), ceil_mode=ceil_mode)(torch.zeros(1, 1, 1, length))
    assert pooled_length(length, kernel, stride, padding, ceil_mode) == out.shape[-1]
