"""Per-image latency of several detectors measured side by side in one process.

Why interleaved rounds: on a shared or thermally throttled CPU the machine's speed drifts; timing model A
for a minute and then model B for a minute would fold that drift into the comparison. Each round times one
call of every model on the same input, after warm-up calls that are not timed; the median over rounds is
reported (robust to the occasional scheduler hiccup).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mammo_core.evaluation.latency import cuda_sync, interleaved_ms


@torch.inference_mode()
def measure_latency(models: Mapping[str, nn.Module], image: Tensor, repeats: int = 10, warmup: int = 2
                    ) -> dict[str, float]:
    """Median milliseconds per image (batch of one) for each model, on ``image`` (3, H, W) on the models' device."""
    for m in models.values():
        m.eval()
    return interleaved_ms({name: (lambda m=m: m([image])) for name, m in models.items()}, repeats=repeats,
                          warmup=warmup, sync=cuda_sync(image.device))
