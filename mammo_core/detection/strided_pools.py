"""Max and average pooling computed from strided views of the input: the same numbers, fast on a CPU.

Why: PyTorch's CPU kernels for ``max_pool2d`` and ``avg_pool2d`` on contiguous (NCHW) maps walk every
window pixel by pixel. At batch 1 on one thread, the 3x3/stride-2 max pool after the ResNet and
DenseNet stems took 12-13 ms of a 1x64x192x128 map (more than a dense layer's 3x3 convolution), and the
2x2 average pools of DenseNet's transitions 1.5-3 ms each. A pooling window is separable: the max (or
sum) over a kh x kw window is the max (or sum) over kh rows of the max (or sum) over kw columns, and each
of those is an elementwise ``maximum`` (or ``add``) of k strided views, which PyTorch vectorises:
1.7 ms for that stem pool (3.0 ms while the -inf padding was built as a padded copy; 2026-12-04, same
machine), 0.3 ms for the largest transition pool (``bench/detect.py`` measures the effect on the whole
detector).

Max pooling is exact (max is associative, and a window's padded elements are skipped, which is what
PyTorch's -inf padding amounts to). Average pooling
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


def _every(x: Tensor, dim: int, start: int, count: int, stride: int) -> Tensor:
    """The view of ``count`` elements along ``dim``, from ``start``, ``stride`` apart."""
    index: list[slice] = [slice(None)] * x.dim()
    index[dim] = slice(start, start + stride * (count - 1) + 1, stride)
    return x[tuple(index)]


def _window_views(x: Tensor, dim: int, kernel: int, stride: int, out: int) -> list[Tensor]:
    """For each offset j < kernel, the view holding element j of every window along ``dim``."""
    return [_every(x, dim, j, out, stride) for j in range(kernel)]


def max_along(x: Tensor, dim: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> Tensor:
    """1-D max pooling of ``x`` along ``dim`` with PyTorch's output length and -inf padding.

    The padding is never built: element j of window i is input ``stride * i + j - padding``, and each
    offset j is maximised into just the windows where that index lies inside the input (a padded copy of
    the stem's 1 x 64 x 192 x 128 map cost more than the pooling itself: 3.5 ms of fills and copies).
    """
    length = x.shape[dim]
    out = pooled_length(length, kernel, stride, padding, ceil_mode)
    ranges = []  # per offset: the first and last window whose element j lies inside the input
    for j in range(kernel):
        first = max(0, -(-(padding - j) // stride))
        last = min(out - 1, (length - 1 + padding - j) // stride)
        ranges.append((j, first, last))
    full = [j for j, first, last in ranges if first == 0 and last == out - 1]

    def view(j: int, first: int, last: int) -> Tensor:
        return _every(x, dim, stride * first + j - padding, last - first + 1, stride)

    if len(full) >= 2:
        result = torch.maximum(view(full[0], 0, out - 1), view(full[1], 0, out - 1))
        done = set(full[:2])
    elif full:
        result = view(full[0], 0, out - 1).clone(memory_format=torch.contiguous_format)  # never x itself
        done = {full[0]}
    else:
        shape = list(x.shape)
        shape[dim] = out
        result = torch.full(shape, -math.inf, dtype=x.dtype, device=x.device)
        done = set()
    for j, first, last in ranges:
        if j not in done and first <= last:
            part = result.narrow(dim, first, last - first + 1)
            torch.maximum(part, view(j, first, last), out=part)
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
