"""Max and average pooling computed from strided views of the input: the same numbers, fast on a CPU.

Why: PyTorch's CPU kernels for ``max_pool2d`` and ``avg_pool2d`` on contiguous (NCHW) maps walk every
window pixel by pixel. At batch 1 on one thread, the 3x3/stride-2 max pool after the ResNet and
DenseNet stems took 12-13 ms of a 1x64x192x128 map (more than a dense layer's 3x3 convolution), and the
2x2 average pools of DenseNet's transitions 1.5-3 ms each. A pooling window is separable: the max (or
sum) over a kh x kw window is the max (or sum) over kh rows of the max (or sum) over kw columns, and each
of those is an elementwise ``maximum`` (or ``add``) of k strided views, which PyTorch vectorises:
1.4 ms for that stem pool, 0.3 ms for the largest transition pool (``bench/detect.py`` measures the
effect on the whole detector).

Max pooling is exact (max is associative and the padding is -inf, as PyTorch pads). Average pooling
sums in another order and so agrees up to float rounding; it is rewritten only without padding and
``ceil_mode`` (every window then lies inside the map and divides by kh * kw). On other devices the modules
call PyTorch's own kernel, which is fast there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) == 1:
        return int(value[0]), int(value[0])
    return int(value[0]), int(value[1])


def pooled_length(length: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """The output length PyTorch's pooling gives along one dimension (``pooling_output_shape``)."""
    span = length + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= length + padding:
        out -= 1  # the last window must start inside the input or its left padding
    return out


def _window_views(x: Tensor, dim: int, kernel: int, stride: int, out: int) -> list[Tensor]:
    """For each offset j < kernel, the view holding element j of every window along ``dim``."""
    index: list[slice] = [slice(None)] * x.dim()
    views = []
    for j in range(kernel):
        index[dim] = slice(j, j + stride * (out - 1) + 1, stride)
        views.append(x[tuple(index)])
    return views


def max_along(x: Tensor, dim: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> Tensor:
    """1-D max pooling of ``x`` along ``dim`` with PyTorch's output length and -inf padding."""
    out = pooled_length(x.shape[dim], kernel, stride, padding, ceil_mode)
    right = max(0, (out - 1) * stride + kernel - padding - x.shape[dim])
    if padding or right:
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [padding, right], value=-math.inf)
    views = _window_views(x, dim, kernel, stride, out)
    if kernel == 1:
        return views[0].clone()
    result = torch.maximum(views[0], views[1])
    for view in views[2:]:
        torch.maximum(result, view, out=result)
    return result


def sum_along(x: Tensor, dim: int, kernel: int, stride: int) -> Tensor:
    """1-D sum over every full window (no padding) of ``x`` along ``dim``."""
    views = _window_views(x, dim, kernel, stride, pooled_length(x.shape[dim], kernel, stride, 0, False))
    result = views[0].clone() if kernel == 1 else torch.add(views[0], views[1])
    for view in views[2:]:
        result.add_(view)
    return result


class StridedMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (no dilation, no indices) as two separable passes of strided-view maxima."""

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 ceil_mode: bool):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.ceil_mode = kernel_size, stride, padding, ceil_mode

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, ceil_mode=self.ceil_mode)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        rows = max_along(x, 2, kh, sh, ph, self.ceil_mode)
        return max_along(rows, 3, kw, sw, pw, self.ceil_mode).contiguous()

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}")


class StridedAvgPool2d(nn.Module):
    """``nn.AvgPool2d`` without padding or ``ceil_mode``: window sums of strided views, divided by kh * kw."""

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int]):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return F.avg_pool2d(x, self.kernel_size, self.stride)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        summed = sum_along(sum_along(x, 2, kh, sh), 3, kw, sw)
        return summed.mul_(1.0 / (kh * kw)).contiguous()

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


def strided_equivalent(pool: nn.Module) -> nn.Module | None:
    """The strided-view module computing what ``pool`` computes, or None when ``pool`` is not covered.

    Covered: ``nn.MaxPool2d`` without dilation or ``return_indices``; ``nn.AvgPool2d`` without padding,
    ``ceil_mode`` or ``divisor_override`` (``count_include_pad`` is then irrelevant).
    """
    if type(pool) is nn.MaxPool2d:
        if _pair(pool.dilation) != (1, 1) or pool.return_indices:
            return None
        kernel = _pair(pool.kernel_size)
        return StridedMaxPool2d(kernel, _pair(pool.stride or kernel), _pair(pool.padding), bool(pool.ceil_mode))
    if type(pool) is nn.AvgPool2d:
        if _pair(pool.padding) != (0, 0) or pool.ceil_mode or pool.divisor_override is not None:
            return None
        kernel = _pair(pool.kernel_size)
        return StridedAvgPool2d(kernel, _pair(pool.stride or kernel))
    return None
