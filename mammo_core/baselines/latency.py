"""Per-image inference latency of several models, measured side by side (the paper's Table 6 column).

Batch 1, eval and inference mode, each model fed the same patch-sized 3-channel input (so each model's
own upsampling is part of its cost). The models run interleaved in every repeat, after a warm-up call
each, so machine noise hits them all alike; the median over repeats is reported. Only the architecture
decides the cost, not the weight values, so untrained builds measure the same as trained ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mammo_core.evaluation.latency import Call, cuda_sync, interleaved_ms


def latency_ms(models: Mapping[str, nn.Module], patch_size: int, *, repeats: int = 10,
               device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
    """``name -> median milliseconds per image`` at batch 1."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    x = torch.randn(1, 3, patch_size, patch_size, generator=torch.Generator().manual_seed(seed)).to(device)
    for model in models.values():
        model.to(device).eval()
    with torch.inference_mode():  # one warm-up call each: allocator, kernels, caches
        return interleaved_ms({name: (lambda m=model: m(x)) for name, model in models.items()}, repeats=repeats,
                              sync=cuda_sync(device))


def module_call(model: nn.Module, batch: int, patch_size: int, seed: int = 0) -> Call:
    """A call running ``model`` in eval and inference mode on a fixed random batch of patch-sized images."""
    x = torch.randn(batch, 3, patch_size, patch_size, generator=torch.Generator().manual_seed(seed))
    model.eval()

    def call() -> object:
        with torch.inference_mode():
            return model(x)

    return call


def batch_latency_rows(calls: Mapping[tuple[str, int], Call], *, repeats: int) -> list[dict[str, object]]:
    """Rows ``model, batch_size, ms_per_batch, ms_per_image`` for calls keyed by (model, batch size).

    All (model, batch) calls are interleaved in one loop, so every row of the table is measured under the
    same conditions, in one process.
    """
    named = {f"{model}@{batch}": call for (model, batch), call in calls.items()}
    ms = interleaved_ms(named, repeats=repeats)
    return [{"model": model, "batch_size": int(batch), "ms_per_batch": ms[f"{model}@{batch}"],
             "ms_per_image": ms[f"{model}@{batch}"] / int(batch)} for model, batch in calls]
