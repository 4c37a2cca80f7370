"""The Prefect task runner named by ``run.task_runner`` (thread, process or dask).

Why a function and not a decorator argument: the runner depends on the params file, which the flow reads
at run time, so the flow hands its stage graph to a sub-flow built with the chosen runner.
"""

from __future__ import annotations

import os
from typing import Any

from mammo_core.config import RunParams


def build_task_runner(run: RunParams) -> Any | None:
    """None for ``thread`` (the flow's own default runner), else a configured Prefect task runner.

    ``dask`` connects to ``run.dask_address`` when given; otherwise it starts a LocalCluster of
    ``run.dask_workers`` single-threaded worker processes, each holding ``run.gpus`` ``GPU`` resources so
    that tasks annotated with ``GPU: 1`` are spread one per GPU.
    """
    if run.task_runner == "thread":
        return None
    if run.task_runner == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=run.dask_workers)
    from prefect_dask import DaskTaskRunner

    if run.dask_address:
        return DaskTaskRunner(address=run.dask_address)
    import dask

    # Stages start process pools of their own (curate's workers, data loaders); Dask's default daemonic
    # worker processes may not have children. The nannies read this when they spawn the workers.
    dask.config.set({"distributed.worker.daemon": False})
    cluster_kwargs: dict[str, Any] = {"n_workers": run.dask_workers, "threads_per_worker": 1, "processes": True,
                                      "host": "127.0.0.1",  # scheduler and workers on the loopback only
                                      "dashboard_address": None}
    if run.gpus:
        cluster_kwargs["resources"] = {"GPU": run.gpus}
    cluster_kwargs["env"] = _worker_environment()
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs)


def _worker_environment() -> dict[str, str]:
    """Environment for LocalCluster workers: the API of the server this flow reports to, the thread count.

    Why: without ``PREFECT_API_URL`` each worker process would start its own temporary Prefect server,
    so its task runs and the ``gpu-<i>`` concurrency limits would live in a database nobody reads.
    """
    import torch
    from prefect import get_client

    # Dask pins its workers to one thread; the same thread count as this process makes CPU reductions add
    # up in the same order, so a branch trained on a worker equals, bit for bit, one trained here.
    # (Dask resets torch to one thread per worker; the branch task reads MAMMO_TORCH_THREADS and sets it back.)
    env = {"MAMMO_STORE": os.environ.get("MAMMO_STORE", ""), "MAMMO_TORCH_THREADS": str(torch.get_num_threads())}
    with get_client(sync_client=True) as client:
        env["PREFECT_API_URL"] = str(client.api_url)
    return {k: v for k, v in env.items() if v}


def gpu_slots(run: RunParams) -> int:
    """How many ``gpu-<i>`` global concurrency limits the flow guards (0: no GPU resources in use)."""
    if run.task_runner != "dask" or not run.gpus:
        return 0
    return run.gpus * run.dask_workers


def ensure_gpu_limits(count: int) -> None:
    """Create (or reset to 1) the global concurrency limits ``gpu-0 .. gpu-<count-1>``.

    Why: Prefect's ``concurrency()`` only warns when a limit does not exist, so the limits are made
    before any training asks for one: one task per GPU even when two Dask workers share a GPU index.
    """
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for i in range(count):
            client.upsert_global_concurrency_limit_by_name(f"gpu-{i}", 1)
