"""Per-image latency of several detectors measured side by side in one process.

Why interleaved rounds: on a shared or thermally throttled CPU the machine's speed drifts; timing model A
for a minute and then model B for a minute would fold that drift into the comparison. Each round times one
call of every model on the same input, after warm-up calls that are not timed; the median over rounds is
reported (robust to the occasional scheduler hiccup). Process CPU milliseconds per call are recorded
too: on a machine shared with other work they are far less inflated than wall time (with one torch
thread, CPU time is the model's own work, whatever else runs).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(models: Mapping[str, nn.Module], image: Tensor, repeats: int = 10, warmup: int = 2
                    ) -> dict[str, float]:
    """Median milliseconds per image (batch of one) for each model, on ``image`` (3, H, W) on the models' device."""
    return {name: t["wall_ms"] for name, t in measure_latency_detail(models, image, repeats, warmup).items()}


@torch.inference_mode()
def measure_latency_detail(models: Mapping[str, nn.Module], image: Tensor, repeats: int = 10, warmup: int = 2
                           ) -> dict[str, dict[str, float]]:
    """Per model, median wall and process-CPU milliseconds per image, and the least CPU of any round.

    ``{"wall_ms", "cpu_ms", "cpu_min_ms"}``: the minimum is the round least disturbed by other processes
    sharing caches and cores, the steadiest figure on a busy machine.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for m in models.values():
        m.eval()
    device = image.device
    for _ in range(warmup):
        for m in models.values():
            m([image])
    _sync(device)
    wall: dict[str, list[float]] = {name: [] for name in models}
    cpu: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            _sync(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            m([image])
            _sync(device)
            wall[name].append((time.perf_counter() - started) * 1000.0)
            cpu[name].append((time.process_time() - cpu_started) * 1000.0)
    return {name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name]),
                   "cpu_min_ms": min(cpu[name])} for name in models}
