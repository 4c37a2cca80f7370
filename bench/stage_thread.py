"""A training step on the thread that has run torch before vs on a fresh worker thread of the same process.

Why: Prefect's thread task runner gave every stage a worker thread of its own, while the flow's thread (and
each earlier stage's) had run torch already. With spinning OpenMP waits, PyTorch's CPU ops then gain little
from their second thread on the new one. The pipeline runs the stages in the flow's thread under the thread
runner (``flows.pipeline.run_stages``); this bench measures the gap on the train stage's workload: one SGD step
of the fused DenseNet (Freeze1-3 on a shared trunk) on a batch of 64-px patches, as ``train:`` in
``params/default.yaml``. It runs under the pipeline's OpenMP wait setting (:mod:`mammo_core.runtime.openmp_wait`,
named in the output): PASSIVE unless exported; ``GOMP_SPINCOUNT=3000000 python bench/stage_thread.py`` times
long spinning waits (ten times libgomp's default count).

Each repeat times ``--steps`` steps on the main thread, then on a fresh ``ThreadPoolExecutor`` thread, so
machine noise hits both alike; medians over repeats are reported, and ``worker_vs_main`` is their ratio.

Usage: python bench/stage_thread.py [--repeats 5] [--steps 4] [--batch 32] [--size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# first: the pipeline's OpenMP wait setting must be in place when torch loads (mammo_core.runtime.openmp_wait)
from mammo_core.runtime import openmp_wait  # noqa: E402, I001

import torch  # noqa: E402
from mammo_core.models.fused import FusedDenseNet  # noqa: E402


def training_step_timer(batch: int = 32, size: int = 64, classes: int = 7, steps: int = 4) -> Callable[[], float]:
    """A function that times ``steps`` SGD steps of the fused DenseNet on this thread (median seconds, after one
    untimed step): the train stage's workload, shared with ``bench/omp_wait.py``."""
    model = FusedDenseNet(classes, seed=0).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)

    def seconds_per_step() -> float:
        times = []
        for i in range(steps + 1):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)  # one head per branch, trained together as in the train stage
            sum(torch.nn.functional.cross_entropy(out, labels) for out in logits.values()).backward()
            optimizer.step()
            if i:
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    return seconds_per_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seconds_per_step = training_step_timer(args.batch, args.size, args.classes, args.steps)

    main_s, worker_s = [], []
    for _ in range(args.repeats):
        main_s.append(seconds_per_step())
        with ThreadPoolExecutor(max_workers=1) as pool:  # a new thread each repeat, as each stage got one
            worker_s.append(pool.submit(seconds_per_step).result())
    main_ms, worker_ms = 1000 * statistics.median(main_s), 1000 * statistics.median(worker_s)
    print(json.dumps({
        "bench": "stage_thread", "threads": args.threads, "omp_wait": openmp_wait.describe(),
        "batch": args.batch, "size": args.size,
        "repeats": args.repeats, "steps": args.steps,
        "main_thread_ms_per_step": round(main_ms, 1), "worker_thread_ms_per_step": round(worker_ms, 1),
        "worker_vs_main": round(worker_ms / main_ms, 3),
    }))


if __name__ == "__main__":
    main()
