"""Which device a task uses when a scheduler assigned it a GPU.

Why: under a Dask cluster each of the three trainings runs on a worker that holds one ``GPU`` resource.
Dask resources are counts, not device ids, so the id comes from the worker: ``$MAMMO_GPU`` when the
operator pinned it (``MAMMO_GPU=1 dask worker ... --resources GPU=1``), else the worker's integer name
(a LocalCluster names its workers 0, 1, ...). :func:`choose_device` is the one chooser every stage uses
(train's branches, detect, baselines, the schedule); the others are pure: the caller passes what it knows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

GPU_ENV = "MAMMO_GPU"


def assigned_gpu(worker_name: object | None = None, env: Mapping[str, str] | None = None) -> int | None:
    """The GPU index this worker owns: ``$MAMMO_GPU``, else an integer worker name, else None."""
    env = os.environ if env is None else env
    pinned = env.get(GPU_ENV, "").strip()
    if pinned:
        if not pinned.isdigit():
            raise ValueError(f"{GPU_ENV} must be a GPU index (0, 1, ...), got {pinned!r}")
        return int(pinned)
    if isinstance(worker_name, int) or (isinstance(worker_name, str) and worker_name.isdigit()):
        return int(worker_name)
    return None


def device_for(requested: str, gpu: int | None, cuda_devices: int) -> str:
    """The torch device string for a task.

    ``requested`` is ``run.device`` (auto, cpu, cuda, cuda:N). An assigned GPU turns ``auto``/``cuda`` into
    ``cuda:<gpu mod visible devices>``; with no CUDA device visible, ``auto`` falls back to ``cpu`` and
    ``cuda`` is an error (a GPU run silently on CPU would take days).
    """
    if requested == "cpu" or requested.startswith("cuda:"):
        return requested
    if cuda_devices <= 0:
        if requested == "cuda":
            raise RuntimeError("run.device is 'cuda' but no CUDA device is visible to this worker")
        return "cpu"
    if gpu is None:
        return "cuda"
    return f"cuda:{gpu % cuda_devices}"


def choose_device(requested: str, worker_name: object | None = None,
                  env: Mapping[str, str] | None = None) -> torch.device:
    """The device for ``run.device`` on this process: the GPU a scheduler assigned (see :func:`assigned_gpu`)
    when there is one, else ``auto`` -> ``cuda`` when visible, else ``cpu``."""
    return torch.device(device_for(requested, assigned_gpu(worker_name, env), torch.cuda.device_count()))
