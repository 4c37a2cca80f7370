"""Building blocks the paper adds to DenseNet-121: attention between dense blocks, a closing transition.

The paper inserts "an attention block and a transition block between every two dense blocks" and
after the last one. The pretrained transitions of torchvision already sit between the dense blocks, so
only the attention blocks are new there; after the third dense block both are new.

``AttentionBlock`` is CBAM-style (channel gate from average- and max-pooled descriptors through a
shared MLP, then a spatial gate from a 7x7 convolution over channel mean and max), wrapped in a
residual with a learnable scale ``gamma`` that starts at 0. Why the residual: the block starts as the
exact identity, so (a) ImageNet features flow through unchanged at the start of training, and (b) an
attention block inside a frozen prefix stays the identity, which keeps the frozen prefix exactly the
pretrained DenseNet instead of a randomly initialised gate nobody trains.

``DenseLayers`` is torchvision's dense-block forward over any run of its layers: feeding it the
concatenation produced by the earlier layers gives bit-identical results to the whole block, which is
what lets a frozen prefix end in the middle of a dense block.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class AttentionBlock(nn.Module):
    """Residual CBAM attention: ``x + gamma * spatial(channel(x))``; identity while gamma is 0."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=True),
        )
        self.spatial_conv = nn.Conv2d(
            2, 1, kernel_size=spatial_kernel, padding=spatial_kernel // 2, bias=False
        )
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        avg = torch.mean(x, dim=(2, 3), keepdim=True)
        peak = torch.amax(x, dim=(2, 3), keepdim=True)
        gated = x * torch.sigmoid(self.channel_mlp(avg) + self.channel_mlp(peak))
        descriptor = torch.cat(
            [torch.mean(gated, dim=1, keepdim=True), torch.amax(gated, dim=1, keepdim=True)], dim=1
        )
        attended = gated * torch.sigmoid(self.spatial_conv(descriptor))
        return x + self.gamma * attended


class ClosingTransition(nn.Sequential):
    """The transition after the last kept dense block: BN, ReLU, 1x1 conv, 2x2 max pooling.

    Max pooling because the paper says so for its transition blocks (torchvision's pretrained
    interior transitions keep their average pooling: their weights were learnt with it).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)


class DenseLayers(nn.ModuleDict):
    """A run of torchvision dense layers (keeping their ``denselayerK`` names) with the block's forward.

    Input: the concatenated features so far; output: that input concatenated with every new layer's
    output, as torchvision's ``_DenseBlock`` returns.
    """

    def __init__(self, layers: Iterable[tuple[str, nn.Module]]):
        super().__init__(dict(layers))

    def forward(self, init_features: Tensor) -> Tensor:  # type: ignore[override]
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)
