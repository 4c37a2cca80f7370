"""Ours' feature pyramid and RPN head in the branches' task graph (CPU inference of a whole detector).

Why: after the fused extractor, ours' FPN and RPN head are a few dozen small convolutions on maps of at
most 48 x 32 cells; on the caller's two sleeping OpenMP threads (the pipeline's ``OMP_WAIT_POLICY=PASSIVE``)
they ran at one thread's speed (FPN 8.5 ms, RPN head 5.5 ms of a 130 ms detector, 2026-12-04). Their
levels do not depend on each other once the top-down sums are made, and the trunk's lateral convolution
can start as soon as the trunk is done, so they join the branch segments as tasks
(:mod:`~mammo_core.detection.task_graph`) on the same one-thread workers.

The ops are torchvision's, level by level: ``FeaturePyramidNetwork.forward``'s lateral, top-down and
output convolutions (its ``extra_blocks`` after the graph) and ``RPNHead.forward``'s convolution and two
predictions per level. The RPN is handed the head's outputs by :class:`PrecomputedRPNHead`, which computes
them itself for any other input. Where the graph is not used (one thread, autograd, spinning waits, a
GPU) the wrapped modules run as they are.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork

from mammo_core.detection.backbone import FusedBackbone
from mammo_core.detection.concurrent_branches import TRUNK, ConcurrentBranchMaps, parameter_cost
from mammo_core.detection.task_graph import Task

LEVEL_INPUTS = (TRUNK, "middle", "final")  # the branch graph's results that feed the FPN, finest first


def fpn_tasks(fpn: FeaturePyramidNetwork, sources: Sequence[Hashable], level_work: Sequence[float]) -> list[Task]:
    """The FPN's lateral, top-down and output convolutions per level, as tasks after the maps they read.

    ``sources``: per level, finest first, the result that is that level's input. ``level_work``: per level,
    a convolution's work per parameter there (its pixels relative to the branches' maps).
    """
    top = len(sources) - 1

    def lateral(i: int):
        return lambda results: fpn.get_result_from_inner_blocks(results[sources[i]], i)

    def merged(i: int):
        def run(results: Mapping[Hashable, Any]) -> Tensor:
            inner = results[("fpn_lateral", i)]
            above = results[merged_key(i + 1)]
            return inner + F.interpolate(above, size=inner.shape[-2:], mode="nearest")
        return run

    def output(i: int):
        return lambda results: fpn.get_result_from_layer_blocks(results[merged_key(i)], i)

    def merged_key(i: int) -> tuple[str, int]:
        return ("fpn_lateral", i) if i == top else ("fpn_merged", i)

    tasks = [Task(("fpn_lateral", i), lateral(i), (source,), parameter_cost(fpn.inner_blocks[i], level_work[i]))
             for i, source in enumerate(sources)]
    tasks += [Task(("fpn_merged", i), merged(i), (("fpn_lateral", i), merged_key(i + 1)))
              for i in range(top - 1, -1, -1)]
    tasks += [Task(("fpn_output", i), output(i), (merged_key(i),), parameter_cost(fpn.layer_blocks[i], level_work[i]))
              for i in range(top + 1)]
    return tasks


def rpn_head_tasks(head: RPNHead, levels: int, level_work: Sequence[float]) -> list[Task]:
    """``RPNHead.forward``'s convolution and two predictions of each FPN output level, one task per level."""

    def predict(i: int):
        def run(results: Mapping[Hashable, Any]) -> tuple[Tensor, Tensor]:
            t = head.conv(results[("fpn_output", i)])
            return head.cls_logits(t), head.bbox_pred(t)
        return run

    return [Task(("rpn_head", i), predict(i), (("fpn_output", i),), parameter_cost(head, level_work[i]))
            for i in range(levels)]


class PrecomputedRPNHead(nn.Module):
    """An RPN head that returns the outputs the backbone's graph computed for these very feature maps.

    The backbone leaves them for the calling thread only (:meth:`offer`); a call on other maps (or a
    second call) computes them with the wrapped head, as ``RPNHead.forward`` does.
    """

    def __init__(self, head: RPNHead):
        super().__init__()
        self.head = head
        self._offered = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, ``torch.save``) starts with nothing offered: a thread's offer stays its own."""
        state = self.__dict__.copy()
        state.pop("_offered", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._offered = threading.local()

    def offer(self, features: Sequence[Tensor], outputs: tuple[list[Tensor], list[Tensor]]) -> None:
        self._offered.value = (tuple(features), outputs)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        offered = getattr(self._offered, "value", None)
        self._offered.value = None
        if offered is not None and len(offered[0]) == len(x) and all(
                a is b for a, b in zip(offered[0], x, strict=True)):
            return offered[1]
        return self.head(x)


class ConcurrentFusedBackbone(nn.Module):
    """:class:`FusedBackbone` with its FPN levels (and, given one, an RPN head) in the branches' task graph."""

    def __init__(self, backbone: FusedBackbone, rpn_head: PrecomputedRPNHead | None = None):
        super().__init__()
        self.body = ConcurrentBranchMaps(backbone.body)
        self.fpn = backbone.fpn
        self.out_channels = backbone.out_channels
        self.rpn_head = rpn_head
        maps = backbone.body
        fpn_work = [(maps.strides[1] / stride) ** 2 for stride in maps.strides]
        extra = fpn_tasks(self.fpn, LEVEL_INPUTS, fpn_work)
        if rpn_head is not None:
            extra += rpn_head_tasks(rpn_head.head, len(LEVEL_INPUTS), fpn_work)
        self._extra = tuple(extra)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body.maps
        workers = self.body.workers_for(x)
        if workers < 2:
            return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps(x).values())))
        trunk = maps.fused.trunk_output(x)
        results = self.body.graph(self._extra).run(workers, torch.is_inference_mode_enabled(), {TRUNK: trunk})
        levels = [results[("fpn_output", i)] for i in range(len(LEVEL_INPUTS))]
        names = [str(i) for i in range(len(LEVEL_INPUTS))]
        if self.fpn.extra_blocks is not None:
            levels, names = self.fpn.extra_blocks(levels, [results[k] for k in LEVEL_INPUTS], names)
        if self.rpn_head is not None:
            computed = [results[("rpn_head", i)] for i in range(len(LEVEL_INPUTS))]
            rest = self.rpn_head.head(levels[len(LEVEL_INPUTS):])  # the extra blocks' levels: tiny
            self.rpn_head.offer(levels, ([c[0] for c in computed] + rest[0], [c[1] for c in computed] + rest[1]))
        return OrderedDict(zip(names, levels, strict=True))


def run_pyramid_concurrently(model: nn.Module) -> int:
    """Wrap, in place, the :class:`FusedBackbone` of ``model`` (a detector or any holder); returns how many.

    A torchvision ``FasterRCNN`` whose head is torchvision's ``RPNHead`` gets its head wrapped too, so that
    the graph computes it.
    """
    wrapped = 0
    if isinstance(model, FasterRCNN) and isinstance(model.backbone, FusedBackbone):
        head = model.rpn.head
        shared = PrecomputedRPNHead(head) if type(head) is RPNHead else None
        if shared is not None:
            model.rpn.head = shared
        model.backbone = ConcurrentFusedBackbone(model.backbone, shared)
        return 1
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, FusedBackbone):
                setattr(module, name, ConcurrentFusedBackbone(child))
                wrapped += 1
    return wrapped
