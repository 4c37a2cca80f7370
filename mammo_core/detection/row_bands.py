"""Work on a feature map split into bands of rows, one band per one-thread worker, in lockstep (CPU inference).

Why: the fused extractor's trunk (the stem and dense blocks 1-2, two thirds of ours' CPU time at batch 1)
is a long chain of ops on mid-sized maps. On two intra-op threads under sleeping OpenMP waits (the
pipeline's ``OMP_WAIT_POLICY=PASSIVE``, :mod:`mammo_core.runtime.openmp_wait`), every parallel region of
every op first wakes the other thread, and dense block 2 (12 layers on 48 x 32 cells) ran *slower* on two
threads than on one: 27.9 ms against 24.7 ms (2026-12-04, the default's 384 x 240 input). A dense layer is
a pointwise stage (BatchNorm, ReLU, 1x1 convolution) and one 3x3 convolution, so a band of output rows
needs only its own input rows plus one row each side (the halo): each worker computes its band from the
shared input, writes it into the shared output, and the workers meet once per layer instead of once per
parallel region. Block 2 then took 16.7 ms, block 1 19.7 ms against 29.8 ms (``bench/detect.py`` measures
the whole detector).

Every output value is computed from the same inputs by the same ops as without bands; only the split of
the convolutions' work differs, which changes results by float rounding at most (tested). The halo rows
are computed by both neighbours (two rows per band and layer: about 4% more work on block 1's 48-row
bands, 8% on block 2's 24-row bands).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

from mammo_core.detection.worker_pool import concurrent_workers, single_thread_workers

MIN_BAND_ROWS = 16  # below this the halo rows cost more than a second thread wins
BARRIER_TIMEOUT_S = 600.0  # a band waiting this long for its neighbours means something is wrong: fail, never hang
_ONE_AT_A_TIME = threading.Lock()  # two callers' bands interleaved on one pool could each hold a worker at a barrier

BandStep = Callable[[int, int, int], None]  # step(k, first row, end row): step k of one band


def row_bands(height: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, end) row ranges of near-equal height covering ``range(height)``."""
    parts = max(1, min(parts, height))
    edges = [round(height * i / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def bands_for(x: Tensor, height: int) -> list[tuple[int, int]]:
    """The bands a call on ``x`` uses for a map of ``height`` rows here (one band: run on the caller)."""
    return row_bands(height, concurrent_workers(x, height // MIN_BAND_ROWS))


def run_in_bands(step: BandStep, steps: int, bands: list[tuple[int, int]], inference: bool) -> None:
    """``step(k, r0, r1)`` for k in ``range(steps)``, each band on its own one-thread worker.

    Every band finishes step k before any band starts step k + 1 (a step reads its neighbours' rows of
    what earlier steps wrote). Calls from several threads take turns: interleaved on one pool, two
    calls' bands could each hold a worker at their barriers and wait for each other forever. A failing
    step breaks the barrier, so the other bands stop too and the first error is raised here.
    ``inference``: run the steps under ``torch.inference_mode`` (the caller's mode does not cross
    threads), else under ``torch.no_grad``.
    """
    barrier = threading.Barrier(len(bands), timeout=BARRIER_TIMEOUT_S)

    def band(r0: int, r1: int) -> None:
        with torch.inference_mode() if inference else torch.no_grad():
            try:
                for k in range(steps):
                    step(k, r0, r1)
                    barrier.wait()
            except threading.BrokenBarrierError:
                raise
            except BaseException:
                barrier.abort()
                raise

    pool = single_thread_workers(len(bands))
    errors: list[BaseException] = []
    with _ONE_AT_A_TIME:  # every band of this call must be running at once: no other caller's band in between
        futures = [pool.submit(band, r0, r1) for r0, r1 in bands]
        for future in futures:
            try:
                future.result()
            except threading.BrokenBarrierError as exc:
                errors.append(exc)
            except BaseException as exc:
                errors.insert(0, exc)
    if errors:
        raise errors[0]
