"""Per-image latency of several detectors measured side by side in one process.

Why interleaved rounds: on a shared or thermally throttled CPU the machine's speed drifts; timing model A
for a minute and then model B for a minute would fold that drift into the comparison. Each round times one
call of every model on the same input, after warm-up calls that are not timed; the median over rounds is
reported (robust to the occasional scheduler hiccup). Process CPU milliseconds per call are recorded
too: on a machine shared with other work they are far less inflated than wall time (with one torch
thread, CPU time is the model's own work, whatever else runs).

Why a one-thread figure beside the process's: with two or more intra-op threads, how OpenMP threads wait
between ops (:mod:`mammo_core.runtime.openmp_wait`) moves a model of many small ops by 1.5x and more, and
the pipeline's setting is not the bench's or a server's; on one thread nobody waits, so that ratio holds
under any setting.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from mammo_core.evaluation.latency import cuda_sync, interleaved_detail
from mammo_core.runtime.intra_op_threads import torch_threads


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


def measure_latency_on_threads(models: Mapping[str, nn.Module], image: Tensor, threads: int, repeats: int = 10,
                               warmup: int = 2) -> dict[str, float]:
    """:func:`measure_latency` with ``threads`` intra-op threads (CPU), the process's count restored after."""
    with torch_threads(threads):
        return measure_latency(models, image, repeats, warmup)
