"""Reliability summary: kill points survived, bad inputs tried, items lost, computed from the real checks.

Nothing here is a number written by hand: the counts come from the session's kill-anywhere chain (whose
plan includes the store's own kill points: after a seal before its MLflow run ends, inside an MLflow
database write, inside a ``--force`` swap)
(``kill_anywhere`` fixture, tests/reliability/test_kill_anywhere.py) and the generated bad-input corpus
(``bad_input_outcome`` fixture, tests/reliability/test_bad_inputs.py), which other modules assert item by item, and
the untrusted-input cases of tests/helpers/untrusted_inputs.py (issue 16: hostile images, workers, downloads). The
summary prints one JSON line (visible in ``make test`` output) and writes it to ``reliability.json``
in the session's temporary root, so an issue resolution can quote it.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.untrusted_inputs import run_cases, unrefused
from tests.reliability.test_bad_inputs import verdicts
from tests.reliability.test_clear_failures import FAILURE_CASES
from tests.reliability.test_kill_anywhere import KILL_PLAN

pytestmark = pytest.mark.slow


def test_reliability_summary(kill_anywhere, bad_input_outcome, tmp_path_factory, capsys, record_property):
    kills = kill_anywhere.summary()
    judged = verdicts(bad_input_outcome)
    untrusted = run_cases(tmp_path_factory.mktemp("untrusted_inputs"))
    summary = {
        "kill_points_tried": len(kill_anywhere.kills),
        "kill_points_survived": kills["kill_points_survived"],
        "kill_points": kills["kill_points"],
        "bad_inputs_tried": len(judged),
        "bad_inputs_as_specified": sum(v is None for v in judged.values()),
        "items_lost": bad_input_outcome.lost,
        "untrusted_inputs_tried": len(untrusted),
        "untrusted_inputs_refused": len(untrusted) - len(unrefused(untrusted)),
        "abandoned_temporary_folders": len(kills["abandoned_temporary_folders"]),
        # asserted one by one (exit code 2, one line, store unchanged) in tests/reliability/test_clear_failures.py
        "failure_cases_exit_2": list(FAILURE_CASES.values()),
    }
    path = tmp_path_factory.getbasetemp() / "reliability.json"
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    with capsys.disabled():
        print(f"\nreliability summary: {json.dumps(summary)}")
    record_property("reliability_summary", json.dumps(summary))  # printed by conftest under pytest-xdist
    assert summary["kill_points_tried"] == len(KILL_PLAN)
    assert summary["kill_points_survived"] == len(KILL_PLAN), kills["final_problems"]
    assert {k: v for k, v in judged.items() if v is not None} == {}
    assert summary["items_lost"] == 0
    assert unrefused(untrusted) == {}
