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
from collections.abc import Hashable

import torch
from torch import Tensor, nn

from mammo_core.detection.backbone import FusedFeatureMaps, fuse_maps
from mammo_core.detection.task_graph import Task, TaskGraph
from mammo_core.detection.worker_pool import concurrent_workers

TRUNK = "trunk"  # the graph's input: the trunk's output, computed before the branches (in bands of rows)


def parameter_cost(module: nn.Module, pixels: float = 1.0) -> float:
    """A task's cost estimate: its parameters times the pixels it works on (relative), plus one.

    At one map size a convolution's work is its parameter count times the pixels; the one keeps tasks
    without parameters (sums) ordered after real work but above nothing.
    """
    return 1.0 + pixels * sum(p.numel() for p in module.parameters())


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


def branch_tasks(plan: list[tuple[int, int]], segments: list[list[nn.Module]], fusion_weights: Tensor) -> list[Task]:
    """The segments each branch computes itself, and the two fusion sums, as tasks with their dependencies.

    The first segments read the graph's input :data:`TRUNK`. A segment's cost is its parameter count (every
    segment of a branch works at one map size, so that is proportional to its convolutions' work); the
    sums ("middle", "final": the branches' maps before and after their tails) cost next to nothing.
    """
    producer = segment_producers(plan, [len(s) for s in segments])

    def input_of(branch: int, i: int) -> Hashable:
        return producer[(branch, i - 1)] if i > 0 else TRUNK

    def runner(module: nn.Module, source: Hashable):
        return lambda results: module(results[source])

    tasks = []
    for (branch, i), made_by in producer.items():
        if made_by == (branch, i):
            module = segments[branch][i]
            tasks.append(Task((branch, i), runner(module, input_of(branch, i)), (input_of(branch, i),),
                              parameter_cost(module)))
    middles = [input_of(b, len(s) - 1) for b, s in enumerate(segments)]  # each branch's map before its tail
    finals = [producer[(b, len(s) - 1)] for b, s in enumerate(segments)]

    def weighted_sum(keys: list[Hashable]):
        return lambda results: fuse_maps([results[key] for key in keys], fusion_weights)

    tasks.append(Task("middle", weighted_sum(middles), tuple(dict.fromkeys(middles))))
    tasks.append(Task("final", weighted_sum(finals), tuple(dict.fromkeys(finals))))
    return tasks


class ConcurrentBranchMaps(nn.Module):
    """:class:`FusedFeatureMaps`' maps with its branch segments run concurrently where that is faster."""

    def __init__(self, maps: FusedFeatureMaps):
        super().__init__()
        self.maps = maps
        self._graphs: tuple[object, tuple[Task, ...], TaskGraph] | None = None

    def workers_for(self, x: Tensor) -> int:
        """How many one-thread workers this call uses for the branches; 1: the wrapped module's forward."""
        return concurrent_workers(x, len(self.maps.fused.branches))

    def tasks(self) -> list[Task]:
        """The branch segments and fusion sums under the current shared-segment plan (input: :data:`TRUNK`)."""
        segments = [list(branch.children()) for branch in self.maps.fused.branches.values()]
        return branch_tasks(self.maps.shared_segments(), segments, self.maps.fusion_weights)

    def graph(self, extra: tuple[Task, ...] = ()) -> TaskGraph:
        """The branch tasks plus ``extra``, checked once per shared-segment plan (rebuilt when the plan is)."""
        plan = self.maps.shared_segments()  # the same object while every branch weight is unchanged
        cached = self._graphs
        if cached is None or cached[0] is not plan or cached[1] is not extra:
            cached = (plan, extra, TaskGraph(self.tasks() + list(extra), (TRUNK,)))
            self._graphs = cached
        return cached[2]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        workers = self.workers_for(x)
        if workers < 2:
            return self.maps(x)
        trunk = self.maps.fused.trunk_output(x)
        results = self.graph().run(workers, torch.is_inference_mode_enabled(), {TRUNK: trunk})
        return OrderedDict([("trunk", trunk), ("middle", results["middle"]), ("final", results["final"])])


def branch_workers(model: nn.Module, device: torch.device | str = "cpu") -> int:
    """How many one-thread workers an inference call of ``model`` uses for its branches here (0: none wrapped).

    For reports: a latency measured with them is not the latency of the same copy without them.
    """
    probe = torch.empty(0, device=device)
    with torch.inference_mode():
        return max((m.workers_for(probe) for m in model.modules() if isinstance(m, ConcurrentBranchMaps)), default=0)


def run_branches_concurrently(model: nn.Module) -> int:
    """Wrap, in place, every :class:`FusedFeatureMaps` child of ``model`` not wrapped yet; returns how many."""
    wrapped = 0
    for module in list(model.modules()):
        if isinstance(module, ConcurrentBranchMaps):
            continue
        for name, child in list(module._modules.items()):
            if isinstance(child, FusedFeatureMaps):
                setattr(module, name, ConcurrentBranchMaps(child))
                wrapped += 1
    return wrapped
