"""The fused extractor (shared trunk + Freeze1..3 branches) as a Faster R-CNN backbone with an FPN.

What it exposes to the FPN, finest first: the shared trunk's output (stride 8 with the default freeze
points), the fused branch maps before the closing transition (stride 16, 1024 channels) and the fused
branch maps after it (stride 32, 512 channels); the FPN adds a max-pooled level on top. "Fused" is the
paper's fusion applied to maps instead of pooled vectors: the weighted sum of the three branches' maps.

The trunk stays frozen (as in train: it is frozen in all three branches) and is run without a graph. Every
BatchNorm is kept in eval mode: detection batches hold two images, far too few for batch statistics, so
the running statistics learnt on patches are used (torchvision does the same with FrozenBatchNorm2d).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mammo_core.model import FusedDenseNet


class FusedFeatureMaps(nn.Module):
    """Trunk output and fused branch maps at two depths, as an ordered dict of feature maps."""

    def __init__(self, fused: FusedDenseNet, fusion_weights: Sequence[float]):
        super().__init__()
        if len(fusion_weights) != len(fused.branches):
            raise ValueError(f"{len(fusion_weights)} fusion weights for {len(fused.branches)} branches "
                             f"({', '.join(fused.branches)})")
        fused.heads = nn.ModuleDict()  # the patch classifiers are not part of a detector
        self.fused = fused
        self.register_buffer("fusion_weights", torch.tensor([float(w) for w in fusion_weights]))
        with torch.no_grad():
            probe = self._maps(torch.zeros(1, 3, 64, 64))
        self.channels = [int(m.shape[1]) for m in probe.values()]
        self.strides = [64 // int(m.shape[-1]) for m in probe.values()]

    def _maps(self, x: Tensor) -> OrderedDict[str, Tensor]:
        t = self.fused.trunk_output(x)
        middle: Tensor | None = None
        final: Tensor | None = None
        for w, branch in zip(self.fusion_weights, self.fused.branches.values(), strict=True):
            m = branch[:-1](t)
            f = branch[-1](m)
            middle = w * m if middle is None else middle + w * m
            final = w * f if final is None else final + w * f
        return OrderedDict([("trunk", t), ("middle", middle), ("final", final)])

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self._maps(x)

    def train(self, mode: bool = True):  # type: ignore[override]
        super().train(mode)
        self.fused.train(mode)  # keeps the frozen segments in eval mode
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


class FusedBackbone(nn.Module):
    """:class:`FusedFeatureMaps` + FPN (``out_channels`` per level, names "0".."3") for torchvision's FasterRCNN."""

    def __init__(self, fused: FusedDenseNet, fusion_weights: Sequence[float], out_channels: int = 128):
        super().__init__()
        self.body = FusedFeatureMaps(fused, fusion_weights)
        self.fpn = FeaturePyramidNetwork(self.body.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    @property
    def num_levels(self) -> int:
        return len(self.body.channels) + 1

    def fpn_from_maps(self, maps: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        """The FPN levels from the extractor's maps (given, e.g. cached, or computed by :meth:`forward`)."""
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps.values())))

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn_from_maps(self.body(x))
