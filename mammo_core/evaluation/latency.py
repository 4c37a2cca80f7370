"""The one latency timer: zero-argument calls timed interleaved, median milliseconds per call.

Why interleaved: on a shared or thermally throttled machine the speed drifts from second to second; timing
model A for a minute and then model B would fold that drift into their comparison. Each repeat runs every
call once, after warm-up calls that are not timed, so a busy moment hits them all alike and their ratios
hold even when absolute times drift; the median over repeats is robust to the occasional scheduler hiccup.
Used by the classifier latency table and the baselines (``baselines/latency.py``) and by the detectors
(``detection/latency.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

Call = Callable[[], object]


def cuda_sync(device: torch.device | str) -> Callable[[], None]:
    """A sync function for :func:`interleaved_ms`: waits for queued CUDA work on ``device``; a no-op on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return lambda: None
    return lambda: torch.cuda.synchronize(device)


def interleaved_ms(calls: Mapping[str, Call], *, repeats: int, warmup: int = 1,
                   sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """``name -> median milliseconds per call`` of the calls, run ``warmup`` rounds untimed, then interleaved."""
    detail = interleaved_detail(calls, repeats=repeats, warmup=warmup, sync=sync)
    return {name: t["wall_ms"] for name, t in detail.items()}


def interleaved_detail(calls: Mapping[str, Call], *, repeats: int, warmup: int = 1,
                       sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Per call: median wall and process-CPU milliseconds, and the least CPU of any round.

    ``{"wall_ms", "cpu_ms", "cpu_min_ms"}``: the minimum is the round least disturbed by other processes
    sharing caches and cores, the steadiest figure on a busy machine.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        for call in calls.values():
            call()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync()
            started, cpu_started = time.perf_counter(), time.process_time()
            call()
            sync()
            wall[name].append(1000.0 * (time.perf_counter() - started))
            cpu[name].append(1000.0 * (time.process_time() - cpu_started))
    return {name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name]),
                   "cpu_min_ms": min(cpu[name])} for name in calls}
