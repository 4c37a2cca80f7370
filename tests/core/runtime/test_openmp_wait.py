"""The pipeline's OpenMP wait default: PASSIVE unless the user chose a policy or a spin count, set before torch
loads, and named as it was in what a run reports (the measured trade-off is in ``bench/omp_wait.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mammo_core.runtime import openmp_wait
from tests.helpers.paths import REPO

PROBE = ("import json, os, mammo_core; "
         "print(json.dumps({k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}))")


def _fresh_process_settings(**exported: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in openmp_wait.SETTINGS} | exported
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_mammo_core_sets_passive_waits_in_a_fresh_process():
    assert _fresh_process_settings() == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}


@pytest.mark.parametrize("exported", [{"GOMP_SPINCOUNT": "3000000"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_what_the_user_exported_wins(exported):
    """A spin count alone must not be joined by PASSIVE: the report would then name a policy nobody chose."""
    assert _fresh_process_settings(**exported) == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None} | exported


@pytest.mark.parametrize(("values", "phrase"), [
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}, "OMP_WAIT_POLICY=PASSIVE"),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000000"},
     "OpenMP threads spin 3000000 iterations, then sleep (GOMP_SPINCOUNT)"),
    ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}, "libgomp's default wait (300,000 spins, then sleep)"),
])
def test_describe_names_what_libgomp_obeys(values, phrase):
    """GOMP_SPINCOUNT overrides the policy's spin count in libgomp, so it is what the phrase names."""
    assert openmp_wait.describe(values) == phrase


@pytest.mark.parametrize(("values", "sleep"), [
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}, True),
    ({"OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": None}, True),
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000000"}, False),
    ({"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}, False),
    ({"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None}, False),
])
def test_threads_sleep_only_under_passive_without_a_spin_count(values, sleep):
    """What decides whether ours runs on one-thread workers (worker_pool: trunk bands, branch and pyramid tasks)."""
    assert openmp_wait.threads_sleep(values) is sleep
