"""Per-image latency of several detectors measured side by side in one process.

Why interleaved rounds: on a shared or thermally throttled CPU the machine's speed drifts; timing model A
for a minute and then model B for a minute would fold that drift into the comparison. Each round times one
call of every model on the same input, after warm-up calls that are not timed; the median over rounds is
reported (robust to the occasional scheduler hiccup). Process CPU milliseconds per call are recorded
too: on a machine shared with other work they are far less inflated than wall time (with one torch
thread, CPU time is the model's own work, whatever else runs).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mammo_core.evaluation.latency import cuda_sync, interleaved_detail


def measure_latency(models: Mapping[str, nn.Module], image: Tensor, repeats: int = 10, warmup: int = 2
                    ) -> dict[str, float]:
    """Median milliseconds per image (batch of one) for each model, on ``image`` (3, H, W) on the models' device."""
    return {name: t["wall_ms"] for name, t in measure_latency_detail(models, image, repeats, warmup).items()}


@torch.inference_mode()
def measure_latency_detail(models: Mapping[str, nn.Module], image: Tensor, repeats: int = 10, warmup: int = 2
                           ) -> dict[str, dict[str, float]]:
    """Per model, median wall and process-CPU milliseconds per image, and the least CPU of any round."""
    for m in models.values():
        m.eval()
    return interleaved_detail({name: (lambda m=m: m([image])) for name, m in models.items()}, repeats=repeats,
                              warmup=warmup, sync=cuda_sync(image.device))
