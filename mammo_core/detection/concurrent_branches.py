"""The fused extractor's branches computed at the same time on one-thread workers (CPU inference).

Why: at batch 1 the Freeze1-3 branches work on maps of 24 x 16 cells, where one op is a few hundred
microseconds of work. When OpenMP threads sleep between parallel regions (the pipeline's
``OMP_WAIT_POLICY=PASSIVE``, :mod:`mammo_core.runtime.openmp_wait`), every region of such an op first wakes
the other thread, and on 2 cores the branches ran *slower* on two intra-op threads than on one: a branch's
19 dense layers took 24.5 ms against 13.1 ms (2026-12-04, the default's 384 x 240 input). The branches do
not depend on each other, except where one reuses another's frozen segments (``shared_segments``), so
their segments (and the two fusion sums) are tasks of a small graph (:mod:`~mammo_core.detection.task_graph`)
run on one-thread workers (:mod:`~mammo_core.detection.worker_pool`): no op waits for a sleeping partner
and both cores work. The trunk before them runs its dense blocks in bands of rows on the same workers
(:mod:`~mammo_core.detection.row_bands`).

What it computes is what :class:`~mammo_core.detection.backbone.FusedFeatureMaps` computes, in the same order
(each fusion sum adds the branches in branch order); only the ops' thread count differs, which changes
convolution results by float rounding at most. It is used only where it wins
(:func:`~mammo_core.detection.worker_pool.concurrent_workers`); anything else runs the wrapped module as it is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork

from mammo_core.detection.backbone import FusedBackbone, FusedFeatureMaps
from mammo_core.detection.task_graph import Task, run_graph
from mammo_core.detection.worker_pool import concurrent_workers


def segment_producers(plan: list[tuple[int, int]], lengths: list[int]) -> dict[tuple[int, int], tuple[int, int]]:
    """Per (branch, segment): the (branch, segment) whose run computes that map (itself, or a reused source's).

    ``plan`` is :meth:`FusedFeatureMaps.shared_segments`: branch b reuses the first ``reused`` segments of
    ``source``, which may in turn reuse another branch's.
    """
    producer: dict[tuple[int, int], tuple[int, int]] = {}
    for branch, (source, reused) in enumerate(plan):
        for i in range(lengths[branch]):
            producer[(branch, i)] = producer[(source, i)] if i < reused else (branch, i)
    return producer


def branch_tasks(plan: list[tuple[int, int]], segments: list[list[nn.Module]], trunk: Tensor,
                 fusion_weights: Tensor) -> list[Task]:
    """The segments each branch computes itself, and the two fusion sums, as tasks with their dependencies.

    A segment's cost is its parameter count (every segment of a branch works at one map size, so that is
    proportional to its convolutions' work); the sums cost next to nothing.
    """
    producer = segment_producers(plan, [len(s) for s in segments])

    def input_of(branch: int, i: int) -> tuple[int, int] | None:
        return producer[(branch, i - 1)] if i > 0 else None

    def runner(branch: int, i: int):
        source = input_of(branch, i)
        return lambda results: segments[branch][i](trunk if source is None else results[source])

    tasks = []
    for (branch, i), made_by in producer.items():
        if made_by == (branch, i):
            source = input_of(branch, i)
            cost = 1.0 + sum(p.numel() for p in segments[branch][i].parameters())
            tasks.append(Task((branch, i), runner(branch, i), () if source is None else (source,), cost))
    middles = [input_of(b, len(s) - 1) for b, s in enumerate(segments)]  # each branch's map before its tail
    finals = [producer[(b, len(s) - 1)] for b, s in enumerate(segments)]

    def weighted_sum(keys: list[tuple[int, int] | None]):
        def run(results: Mapping[Hashable, Any]) -> Tensor:
            total: Tensor | None = None
            for key, w in zip(keys, fusion_weights, strict=True):
                m = trunk if key is None else results[key]
                total = w * m if total is None else total + w * m
            assert total is not None
            return total
        return run

    tasks.append(Task("middle", weighted_sum(middles), tuple(k for k in middles if k is not None)))
    tasks.append(Task("final", weighted_sum(finals), tuple(finals)))
    return tasks


def fpn_tasks(fpn: FeaturePyramidNetwork, sources: list[Hashable | None], trunk: Tensor,
              level_work: list[float]) -> list[Task]:
    """The FPN's lateral, top-down and output convolutions per level, as tasks after the maps they read.

    ``sources``: per level, finest first, the task whose result is that level's input (None: the trunk).
    ``level_work``: per level, a convolution's work per parameter there (its pixels, relative to the
    branches' maps). The ops are :class:`~torchvision.ops.FeaturePyramidNetwork.forward`'s, level by level;
    its ``extra_blocks`` run after the graph (:func:`fpn_outputs`).
    """
    top = len(sources) - 1

    def lateral(i: int):
        return lambda results: fpn.get_result_from_inner_blocks(trunk if sources[i] is None else results[sources[i]], i)

    def merged(i: int):
        def run(results: Mapping[Hashable, Any]) -> Tensor:
            inner = results[("fpn_lateral", i)]
            above = results[_merged_key(i + 1, top)]
            return inner + F.interpolate(above, size=inner.shape[-2:], mode="nearest")
        return run

    def output(i: int):
        return lambda results: fpn.get_result_from_layer_blocks(results[_merged_key(i, top)], i)

    def work(blocks: nn.ModuleList, i: int) -> float:
        return 1.0 + level_work[i] * sum(p.numel() for p in blocks[i].parameters())

    tasks = []
    for i, source in enumerate(sources):
        tasks.append(Task(("fpn_lateral", i), lateral(i), () if source is None else (source,),
                          work(fpn.inner_blocks, i)))
    for i in range(top - 1, -1, -1):
        tasks.append(Task(("fpn_merged", i), merged(i), (("fpn_lateral", i), _merged_key(i + 1, top))))
    for i in range(len(sources)):
        tasks.append(Task(("fpn_output", i), output(i), (_merged_key(i, top),), work(fpn.layer_blocks, i)))
    return tasks


def _merged_key(i: int, top: int) -> tuple[str, int]:
    """The task whose result is level i's top-down map (the top level's is its lateral map itself)."""
    return ("fpn_lateral", i) if i == top else ("fpn_merged", i)


def fpn_outputs(fpn: FeaturePyramidNetwork, results: Mapping[Hashable, Any], inputs: list[Tensor]
                ) -> OrderedDict[str, Tensor]:
    """The FPN's output dict from the graph's results, with its extra blocks, named as FusedBackbone names them."""
    maps = [results[("fpn_output", i)] for i in range(len(inputs))]
    names = [str(i) for i in range(len(inputs))]
    if fpn.extra_blocks is not None:
        maps, names = fpn.extra_blocks(maps, inputs, names)
    return OrderedDict(zip(names, maps, strict=True))


class ConcurrentBranchMaps(nn.Module):
    """:class:`FusedFeatureMaps`' maps with its branch segments run concurrently where that is faster."""

    def __init__(self, maps: FusedFeatureMaps):
        super().__init__()
        self.maps = maps

    def workers_for(self, x: Tensor) -> int:
        """How many one-thread workers this call uses for the branches; 1: the wrapped module's forward."""
        return concurrent_workers(x, len(self.maps.fused.branches))

    def tasks(self, trunk: Tensor) -> list[Task]:
        """The branch segments and fusion sums from ``trunk``; their "middle" and "final" results are the maps."""
        segments = [list(branch.children()) for branch in self.maps.fused.branches.values()]
        return branch_tasks(self.maps.shared_segments(), segments, trunk, self.maps.fusion_weights)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        workers = self.workers_for(x)
        if workers < 2:
            return self.maps(x)
        trunk = self.maps.fused.trunk_output(x)
        results = run_graph(self.tasks(trunk), workers, torch.is_inference_mode_enabled())
        return OrderedDict([("trunk", trunk), ("middle", results["middle"]), ("final", results["final"])])


class ConcurrentFusedBackbone(nn.Module):
    """:class:`FusedBackbone` with its FPN's levels in the branches' task graph where that is faster.

    Why: the FPN's lateral convolution of the trunk can run as soon as the trunk is done, the middle
    level's as soon as the branches' middle maps are summed, and the three output convolutions side by
    side; on the caller's two sleeping OpenMP threads the FPN's small ops ran at one thread's speed.
    """

    def __init__(self, backbone: FusedBackbone):
        super().__init__()
        self.body = ConcurrentBranchMaps(backbone.body)
        self.fpn = backbone.fpn
        self.out_channels = backbone.out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        workers = self.body.workers_for(x)
        maps = self.body.maps
        if workers < 2:
            return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps(x).values())))
        trunk = maps.fused.trunk_output(x)
        level_work = [(maps.strides[1] / stride) ** 2 for stride in maps.strides]
        tasks = self.body.tasks(trunk) + fpn_tasks(self.fpn, [None, "middle", "final"], trunk, level_work)
        results = run_graph(tasks, workers, torch.is_inference_mode_enabled())
        return fpn_outputs(self.fpn, results, [trunk, results["middle"], results["final"]])


def branch_workers(model: nn.Module, device: torch.device | str = "cpu") -> int:
    """How many one-thread workers an inference call of ``model`` uses for its branches here (0: none wrapped).

    For reports: a latency measured with them is not the latency of the same copy without them.
    """
    probe = torch.empty(0, device=device)
    with torch.inference_mode():
        return max((m.workers_for(probe) for m in model.modules() if isinstance(m, ConcurrentBranchMaps)), default=0)


def run_branches_concurrently(model: nn.Module) -> int:
    """Wrap, in place, every :class:`FusedBackbone` and every other :class:`FusedFeatureMaps` child of ``model``.

    Returns how many extractors were wrapped.
    """
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, FusedBackbone):
                setattr(module, name, ConcurrentFusedBackbone(child))
                wrapped += 1
    for module in list(model.modules()):
        if isinstance(module, ConcurrentBranchMaps):
            continue
        for name, child in list(module._modules.items()):
            if isinstance(child, FusedFeatureMaps):
                setattr(module, name, ConcurrentBranchMaps(child))
                wrapped += 1
    return wrapped
