"""The fused extractor's branches computed at the same time, each on its own one-thread worker (CPU inference).

Why: at batch 1 the Freeze1-3 branches work on maps of 24 x 16 cells, where one op is a few hundred
microseconds of work. When OpenMP threads sleep between parallel regions (the pipeline's
``OMP_WAIT_POLICY=PASSIVE``, :mod:`mammo_core.runtime.openmp_wait`), every region of such an op first wakes
the other thread, and on 2 cores the branches ran *slower* on two intra-op threads than on one: a branch's
19 dense layers took 24.5 ms against 13.1 ms (2026-12-04, the default's 384 x 240 input). The branches do
not depend on each other, except where one reuses another's frozen segments (``shared_segments``), so they
are run as independent chains, one per worker thread, each with one intra-op thread: no op waits for a
sleeping partner and both cores work. The trunk before them (large maps) stays on the caller's threads.

What it computes is what :class:`~mammo_core.detection.backbone.FusedFeatureMaps` computes, in the same order
(the fusion sums run in the caller in branch order); only the ops' thread count differs, which changes
convolution results by float rounding at most. It is used only where it wins: CPU, no autograd, two or
more intra-op threads, and sleeping OpenMP waits (with spinning waits the shared team was faster: the
whole detector took 105 ms on it against 113 ms with the workers). Anything else runs the wrapped module as it is, so a
one-thread latency stays a one-thread latency.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from mammo_core.detection.backbone import FusedFeatureMaps
from mammo_core.runtime import openmp_wait

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_START_TIMEOUT_S = 60.0

BranchSteps = dict[int, tuple[list[Tensor], Tensor]]  # branch -> (maps after each segment but the last, last)


def _one_intra_op_thread() -> None:
    torch.get_num_threads()  # torch gives a thread its count lazily, from the process's; take it first
    torch.set_num_threads(1)


def single_thread_workers(count: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``count`` threads, each running torch ops on one intra-op thread.

    ``torch.set_num_threads`` in a worker also sets the count that threads started later inherit, so the
    caller's count is set again once every worker has taken its own (the barrier makes them all start).
    """
    with _POOLS_LOCK:
        pool = _POOLS.get(count)
        if pool is None:
            caller_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(count, thread_name_prefix="mammo-branch", initializer=_one_intra_op_thread)
            started = threading.Barrier(count)
            for waiting in [pool.submit(started.wait, _START_TIMEOUT_S) for _ in range(count)]:
                waiting.result()
            torch.set_num_threads(caller_threads)
            _POOLS[count] = pool
        return pool


def branch_chains(plan: list[tuple[int, int]]) -> list[list[int]]:
    """Branches grouped so that a branch runs after the one whose segments it reuses (same chain), in order."""
    chains: list[list[int]] = []
    chain_of: dict[int, list[int]] = {}
    for branch, (source, reused) in enumerate(plan):
        chain = chain_of[source] if reused else []
        if not reused:
            chains.append(chain)
        chain.append(branch)
        chain_of[branch] = chain
    return chains


def run_chain(chain: list[int], plan: list[tuple[int, int]], segments: list[list[nn.Module]], trunk: Tensor,
              inference: bool) -> BranchSteps:
    """Every branch of ``chain`` from the trunk's output, reusing its source's leading maps as the plan says."""
    with torch.inference_mode() if inference else torch.no_grad():
        steps: BranchSteps = {}
        for branch in chain:
            source, reused = plan[branch]
            outputs = list(steps[source][0][:reused]) if reused else []
            m = outputs[-1] if outputs else trunk
            for segment in segments[branch][len(outputs):-1]:
                m = segment(m)
                outputs.append(m)
            steps[branch] = (outputs, segments[branch][-1](m))
        return steps


class ConcurrentBranchMaps(nn.Module):
    """:class:`FusedFeatureMaps`' maps with its branch chains run concurrently where that is faster."""

    def __init__(self, maps: FusedFeatureMaps):
        super().__init__()
        self.maps = maps

    def workers_for(self, x: Tensor, chains: int | None = None) -> int:
        """How many one-thread workers this call uses for ``chains`` chains; 1: the wrapped module's forward."""
        if x.device.type != "cpu" or torch.is_grad_enabled() or not openmp_wait.threads_sleep():
            return 1
        chains = len(branch_chains(self.maps.shared_segments())) if chains is None else chains
        return min(chains, torch.get_num_threads())

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        body = self.maps
        plan = body.shared_segments()
        chains = branch_chains(plan)
        workers = self.workers_for(x, len(chains))
        if workers < 2:
            return body(x)
        trunk = body.fused.trunk_output(x)
        segments = [list(branch.children()) for branch in body.fused.branches.values()]
        pool = single_thread_workers(workers)
        inference = torch.is_inference_mode_enabled()
        futures = [pool.submit(run_chain, chain, plan, segments, trunk, inference) for chain in chains]
        steps: BranchSteps = {}
        for future in futures:
            steps.update(future.result())
        middle: Tensor | None = None
        final: Tensor | None = None
        for branch, w in enumerate(body.fusion_weights):
            outputs, last = steps[branch]
            m = outputs[-1] if outputs else trunk
            middle = w * m if middle is None else middle + w * m
            final = w * last if final is None else final + w * last
        return OrderedDict([("trunk", trunk), ("middle", middle), ("final", final)])


def branch_workers(model: nn.Module, device: torch.device | str = "cpu") -> int:
    """How many one-thread workers an inference call of ``model`` uses for its branches here (0: none wrapped).

    For reports: a latency measured with them is not the latency of the same copy without them.
    """
    probe = torch.empty(0, device=device)
    with torch.inference_mode():
        return max((m.workers_for(probe) for m in model.modules() if isinstance(m, ConcurrentBranchMaps)), default=0)


def run_branches_concurrently(model: nn.Module) -> int:
    """Wrap, in place, every :class:`FusedFeatureMaps` child of ``model``; returns how many were wrapped."""
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, FusedFeatureMaps):
                setattr(module, name, ConcurrentBranchMaps(child))
                wrapped += 1
    return wrapped
