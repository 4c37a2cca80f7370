"""A small graph of dependent tasks run on one-thread workers, longest remaining path first (CPU inference).

Why: the fused extractor's branches are not equal chains of work. Freeze2 reuses Freeze1's first 19 dense
layers and then needs its own 5 layers and tail, so running each branch chain on its own worker left one
worker with Freeze1 and Freeze2 (39.4 ms at batch 1) while the other finished Freeze3 (32.2 ms) and waited.
Split into segments with their dependencies and started in the order of the longest work still behind
each one (list scheduling on the critical path), the same segments fill both workers: a worker that
finishes Freeze3 takes a tail that the other worker's segments have made ready.

Costs are estimates given by the caller (here, parameter counts: at one map size a convolution's work is
its parameter count times the pixels); they only decide the order in which ready tasks start, never what a
task computes, so every result is the one a sequential run gives.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mammo_core.detection.worker_pool import single_thread_workers


@dataclass(frozen=True)
class Task:
    """``run(results)`` once every task named in ``after`` has finished; ``results`` holds their results."""

    name: Hashable
    run: Callable[[Mapping[Hashable, Any]], Any]
    after: tuple[Hashable, ...] = ()
    cost: float = 1.0


def critical_paths(tasks: Sequence[Task], given: Collection[Hashable] = ()) -> dict[Hashable, float]:
    """Per task, its cost plus the largest such sum over the tasks that wait for it (the work still behind it).

    ``given``: names of results that exist before any task runs (a task may wait for them).
    """
    names = [t.name for t in tasks]
    if len(set(names)) != len(names) or set(names) & set(given):
        raise ValueError("task names must be unique and differ from the given results'")
    by_name = {t.name: t for t in tasks}
    for task in tasks:
        missing = [d for d in task.after if d not in by_name and d not in given]
        if missing:
            raise ValueError(f"task {task.name!r} waits for unknown tasks {missing}")
    waiting: dict[Hashable, list[Hashable]] = {n: [] for n in names}
    for task in tasks:
        for d in task.after:
            if d in waiting:
                waiting[d].append(task.name)
    path: dict[Hashable, float] = {}
    visiting: set[Hashable] = set()

    def length(name: Hashable) -> float:
        if name in path:
            return path[name]
        if name in visiting:
            raise ValueError(f"tasks wait for each other in a cycle through {name!r}")
        visiting.add(name)
        path[name] = by_name[name].cost + max((length(w) for w in waiting[name]), default=0.0)
        return path[name]

    for name in names:
        length(name)
    return path


class TaskGraph:
    """Tasks checked and ordered once (names, dependencies, critical paths), to run many times.

    ``inputs``: names of results that every run is given before any task starts (a task may wait for them).
    """

    def __init__(self, tasks: Sequence[Task], inputs: Collection[Hashable] = ()):
        self.tasks = list(tasks)
        self.inputs = frozenset(inputs)
        self.path = critical_paths(self.tasks, self.inputs)
        self.order = {t.name: i for i, t in enumerate(self.tasks)}
        self.by_name = {t.name: t for t in self.tasks}
        self.waits_for = {t.name: len(set(t.after) - self.inputs) for t in self.tasks}
        self.dependents: dict[Hashable, list[Hashable]] = {t.name: [] for t in self.tasks}
        for task in self.tasks:
            for d in set(task.after) - self.inputs:
                self.dependents[d].append(task.name)

    def run(self, workers: int, inference: bool, given: Mapping[Hashable, Any] | None = None) -> dict[Hashable, Any]:
        """Every task's result (and the given ones), on ``workers`` one-thread workers, longest path first.

        Ties go to the task listed first. A failing task stops the others from starting new tasks and its
        error is raised here. ``inference``: tasks run under ``torch.inference_mode`` (a mode does not cross
        threads), else under ``torch.no_grad``.
        """
        given = dict(given or {})
        if set(given) != self.inputs:
            raise ValueError(f"the graph's inputs are {sorted(map(str, self.inputs))}, given {sorted(map(str, given))}")
        waiting_on = dict(self.waits_for)
        ready = [t.name for t in self.tasks if waiting_on[t.name] == 0]
        results: dict[Hashable, Any] = dict(given)
        total = len(self.tasks) + len(given)
        failed: list[BaseException] = []
        changed = threading.Condition()

        def work() -> None:
            with torch.inference_mode() if inference else torch.no_grad():
                while True:
                    with changed:
                        while not ready and len(results) < total and not failed:
                            changed.wait()
                        if failed or len(results) == total:
                            return
                        name = max(ready, key=lambda n: (self.path[n], -self.order[n]))
                        ready.remove(name)
                    try:
                        value = self.by_name[name].run(results)
                    except BaseException as exc:
                        with changed:
                            failed.append(exc)
                            changed.notify_all()
                        return
                    with changed:
                        results[name] = value
                        for d in self.dependents[name]:
                            waiting_on[d] -= 1
                            if waiting_on[d] == 0:
                                ready.append(d)
                        changed.notify_all()

        count = max(1, min(workers, len(self.tasks)))
        pool = single_thread_workers(count)
        for future in [pool.submit(work) for _ in range(count)]:
            future.result()
        if failed:
            raise failed[0]
        return results

