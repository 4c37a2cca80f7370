"""Per-image inference latency of several models, measured side by side (the paper's Table 6 column).

Batch 1, eval and inference mode, each model fed the same patch-sized 3-channel input (so each model's
own upsampling is part of its cost). The models run interleaved in every repeat, after a warm-up call
each, so machine noise hits them all alike; the median over repeats is reported. Only the architecture
decides the cost, not the weight values, so untrained builds measure the same as trained ones.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(models: Mapping[str, nn.Module], patch_size: int, *, repeats: int = 10,
               device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
    """``name -> median milliseconds per image`` at batch 1."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    x = torch.randn(1, 3, patch_size, patch_size, generator=torch.Generator().manual_seed(seed)).to(device)
    for model in models.values():
        model.to(device).eval()
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: allocator, kernels, caches
            model(x)
        for _ in range(repeats):
            for name, model in models.items():
                _sync(device)
                start = time.perf_counter()
                model(x)
                _sync(device)
                seconds[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(v) for name, v in seconds.items()}
