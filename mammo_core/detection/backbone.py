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

from mammo_core.models.fused import FusedDenseNet


def _same_frozen(a: nn.Module, b: nn.Module) -> bool:
    """Both modules frozen, of one type, with equal parameters and buffers (then they compute the same)."""
    if type(a) is not type(b) or any(p.requires_grad for p in (*a.parameters(), *b.parameters())):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def fuse_maps(maps: Sequence[Tensor], weights: Tensor) -> Tensor:
    """The branches' maps weighted and summed in branch order (the paper's fusion, applied to maps)."""
    total: Tensor | None = None
    for m, w in zip(maps, weights, strict=True):
        total = w * m if total is None else total + w * m
    if total is None:
        raise ValueError("no branch maps to fuse")
    return total


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

    def _branch_modules(self) -> list[nn.Module]:
        """Every module of the branches, listed again only when a module in them was added or replaced.

        Why: walking the module tree cost 0.95 ms of every inference call at batch 1; checking the listed
        modules' children costs 0.05 ms.
        """
        root = self.fused.branches
        cached = getattr(self, "_modules_cache", None)
        if cached is not None and cached[0] is root:
            modules, children = cached[1], cached[2]
            if tuple(c for m in modules for c in m._modules.values()) == children:
                return modules
        modules = list(root.modules())
        self._modules_cache = (root, modules, tuple(c for m in modules for c in m._modules.values()))
        return modules

    def _segment_state_key(self) -> tuple:
        """Identity of every branch tensor's storage, version and trainability: a plan is valid while it holds."""
        return tuple((t.data_ptr(), t._version, t.requires_grad) for m in self._branch_modules()
                     for d in (m._parameters, m._buffers) for t in d.values() if t is not None)

    def shared_segments(self) -> list[tuple[int, int]]:
        """Per branch, (earlier branch to reuse, number of leading segments reused); (-1, 0) when none.

        Why: Freeze1 and Freeze2 both keep the pretrained transition2 and denseblock3 layers 1-19 frozen, so
        those segments hold the same weights in both branches and compute the same maps: running them once
        is exact and saves about a sixth of the extractor's work. A segment is shared only when it is frozen
        in both branches and every parameter and buffer is equal; the plan is recomputed whenever a weight
        changes (storage or in-place version), so loading other weights can never reuse a stale plan.
        """
        key = self._segment_state_key()
        if getattr(self, "_plan_key", None) == key:
            return self._plan
        branches = [list(b.children())[:-1] for b in self.fused.branches.values()]
        plan = []
        for b, segments in enumerate(branches):
            best = (-1, 0)
            for a in range(b):
                n = 0
                while n < min(len(segments), len(branches[a])) and _same_frozen(segments[n], branches[a][n]):
                    n += 1
                if n > best[1]:
                    best = (a, n)
            plan.append(best)
        self._plan, self._plan_key = plan, key
        return plan

    def _maps(self, x: Tensor) -> OrderedDict[str, Tensor]:
        t = self.fused.trunk_output(x)
        middles: list[Tensor] = []
        finals: list[Tensor] = []
        plan = self.shared_segments()
        steps: list[list[Tensor]] = []  # each branch's maps after each of its segments
        for (source, reused), branch in zip(plan, self.fused.branches.values(), strict=True):
            segments = list(branch.children())
            outputs = steps[source][:reused] if reused else []
            m = outputs[-1] if outputs else t
            for segment in segments[len(outputs):-1]:
                m = segment(m)
                outputs.append(m)
            steps.append(outputs)
            middles.append(m)
            finals.append(segments[-1](m))
        return OrderedDict([("trunk", t), ("middle", fuse_maps(middles, self.fusion_weights)),
                            ("final", fuse_maps(finals, self.fusion_weights))])

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
