"""One-thread workers for CPU inference: the pool, and whether a call should use it.

Why: when OpenMP threads sleep between parallel regions (the pipeline's ``OMP_WAIT_POLICY=PASSIVE``,
:mod:`mammo_core.runtime.openmp_wait`), every parallel region of a small op first wakes the other intra-op
thread; at batch 1 the fused extractor is thousands of such ops. Independent pieces of its work (branch
segments: :mod:`~mammo_core.detection.concurrent_branches`; bands of rows: :mod:`~mammo_core.detection.row_bands`)
run faster on threads that each use one intra-op thread and meet only where the work depends on each other.
The decision is the same for all of them (:func:`concurrent_workers`), so a one-thread latency stays a
one-thread latency and autograd and GPUs are never touched.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from mammo_core.runtime import openmp_wait

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_START_TIMEOUT_S = 60.0
_WORKER = threading.local()  # .active: this thread is one of the pools' one-thread workers


def _one_intra_op_thread() -> None:
    torch.get_num_threads()  # torch gives a thread its count lazily, from the process's; take it first
    torch.set_num_threads(1)
    _WORKER.active = True


def on_single_thread_worker() -> bool:
    """Whether the calling thread is one of :func:`single_thread_workers`' threads (work there stays on it)."""
    return bool(getattr(_WORKER, "active", False))


def concurrent_workers(x: Tensor, tasks: int) -> int:
    """How many one-thread workers ``tasks`` independent pieces of work on ``x`` use here; 1: the caller runs them.

    More than one only on the CPU without autograd, under sleeping OpenMP waits (with spinning waits the
    shared team was faster: the whole detector took 105 ms on it against 113 ms with workers), with two or
    more intra-op threads, and never from a worker itself (its pool would wait on itself).
    """
    if (x.device.type != "cpu" or torch.is_grad_enabled() or not openmp_wait.threads_sleep()
            or on_single_thread_worker()):
        return 1
    return max(1, min(tasks, torch.get_num_threads()))


def single_thread_workers(count: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``count`` threads, each running torch ops on one intra-op thread.

    ``torch.set_num_threads`` in a worker also sets the count that threads started later inherit, so the
    caller's count is set again once every worker has taken its own (the barrier makes them all start).
    """
    with _POOLS_LOCK:
        pool = _POOLS.get(count)
        if pool is None:
            caller_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(count, thread_name_prefix="mammo-worker", initializer=_one_intra_op_thread)
            started = threading.Barrier(count)
            for waiting in [pool.submit(started.wait, _START_TIMEOUT_S) for _ in range(count)]:
                waiting.result()
            torch.set_num_threads(caller_threads)
            _POOLS[count] = pool
        return pool
