"""How torch's OpenMP threads wait between parallel regions: the pipeline's default, and what a run reports.

libgomp (torch's OpenMP runtime on Linux) reads its environment once, when torch is loaded: a thread that
finishes its share of a parallel region spins up to ``GOMP_SPINCOUNT`` iterations (300,000 unless set, 0
with ``OMP_WAIT_POLICY=PASSIVE``, 30 billion with ``ACTIVE``: libgomp's documentation) before it sleeps.
Neither choice is right everywhere (``bench/omp_wait.py``, 2 cores, 2026-12-04):

- idle machine: spinning is faster. A training step of the fused DenseNet took 395-526 ms spinning against
  681-934 ms passive; ours (the detector's inference copy, batch 1, many small ops) 157-196 ms against
  252-402 ms, the ResNet-50 FPN 300-334 against 343-448 ms.
- one other busy process: spinning collapses, passive does not. The training step took 1,893 ms with
  libgomp's default spin and 3,358 ms with 30,000 spins, against 693-799 ms passive.

The pipeline sets ``PASSIVE`` (:func:`set_default`): a run that takes 1.5-1.8x longer on an idle machine is
better than one that takes 3-5x longer whenever anything else runs. Whoever owns the cores exports
``GOMP_SPINCOUNT=3000000`` (ten times libgomp's default count) and gets the faster figures; what the user exported wins.
"""

from __future__ import annotations

import os

SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
DEFAULT_POLICY = "PASSIVE"


def set_default() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy or a spin count (call before torch loads)."""
    if not any(name in os.environ for name in SETTINGS):
        os.environ["OMP_WAIT_POLICY"] = DEFAULT_POLICY


def settings() -> dict[str, str | None]:
    """The wait settings of this process's environment, as libgomp read them when torch loaded (for reports)."""
    return {name: os.environ.get(name) for name in SETTINGS}


def threads_sleep(values: dict[str, str | None] | None = None) -> bool:
    """Whether a thread that ends its share of a parallel region sleeps at once (PASSIVE, no spin count).

    Why callers ask: then every parallel region of a small op pays a wake-up, and work of many small ops
    runs faster as separate one-thread tasks than on the shared team (``concurrent_branches``).
    """
    values = settings() if values is None else values
    policy = (values.get("OMP_WAIT_POLICY") or "").upper()
    return values.get("GOMP_SPINCOUNT") is None and policy == "PASSIVE"


def describe(values: dict[str, str | None] | None = None) -> str:
    """One phrase for a report: how OpenMP threads waited when a figure was measured."""
    values = settings() if values is None else values
    spin, policy = values.get("GOMP_SPINCOUNT"), values.get("OMP_WAIT_POLICY")
    if spin is not None:
        return f"OpenMP threads spin {spin} iterations, then sleep (GOMP_SPINCOUNT)"
    if policy:
        return f"OMP_WAIT_POLICY={policy}"
    return "libgomp's default wait (300,000 spins, then sleep)"
