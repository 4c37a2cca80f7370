"""Paired bootstrap of B - A over patients (mammo promote, mammo compare), on small synthetic predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammo_core.evaluation import metrics
from mammo_core.evaluation import paired_bootstrap as pb


def _frame(correct: np.ndarray, split: str = "test", classifier: str = "fusion", per_patient: int = 2) -> pd.DataFrame:
    n = len(correct)
    labels = np.arange(n) % 3
    return pd.DataFrame({"split": split, "classifier": classifier, "source_id": [f"s{i:04d}" for i in range(n)],
                         "patient_id": [f"P{i // per_patient:04d}" for i in range(n)], "label": labels,
                         "predicted": np.where(correct, labels, (labels + 1) % 3)})


def test_identical_runs_differ_by_exactly_zero_and_are_not_distinguishable():
    correct = np.random.default_rng(0).random(120) < 0.6
    d = pb.paired_difference(pb.paired_predictions(_frame(correct), _frame(correct), "test", "fusion"), n_boot=500)
    assert (d.a, d.b, d.diff, d.low, d.high) == (d.a, d.a, 0.0, 0.0, 0.0)
    assert not d.distinguishable and not d.b_better and d.n_patients == 60 and d.n_items == 120


def test_pairing_detects_a_consistent_gain_that_separate_intervals_cannot():
    """B fixes 12 of A's errors (one patch each on 12 patients) and breaks none: a real gain of 0.05. Each
    run's own patient-bootstrap interval is wide and they overlap; the paired interval excludes 0."""
    rng = np.random.default_rng(1)
    a_correct = rng.random(240) < 0.55
    b_correct = a_correct.copy()
    b_correct[np.flatnonzero(~a_correct)[::2][:12]] = True
    a, b = _frame(a_correct), _frame(b_correct)
    d = pb.paired_difference(pb.paired_predictions(a, b, "test", "fusion"), "accuracy", n_boot=1000, seed=0)
    assert d.diff == pytest.approx(12 / 240) and d.low > 0 and d.b_better and d.distinguishable
    assert d.low <= d.diff <= d.high
    groups = a["patient_id"].to_numpy()
    ci_a = metrics.bootstrap_ci(metrics.ACCURACY, a["label"], a["predicted"], None, groups, n_boot=1000)
    ci_b = metrics.bootstrap_ci(metrics.ACCURACY, b["label"], b["predicted"], None, groups, n_boot=1000)
    assert ci_b[0] < ci_a[1]  # the unpaired intervals overlap: they could not tell
    worse = pb.paired_difference(pb.paired_predictions(b, a, "test", "fusion"), n_boot=1000)
    assert worse.high < 0 and worse.distinguishable and not worse.b_better
    assert "B - A -0.0500" in worse.describe()


def test_a_gain_on_one_patient_is_noise():
    a_correct = np.zeros(80, dtype=bool)
    b_correct = a_correct.copy()
    b_correct[[10, 11]] = True  # both patches of patient P0005
    d = pb.paired_difference(pb.paired_predictions(_frame(a_correct), _frame(b_correct), "test", "fusion"),
                             n_boot=2000)
    assert d.diff == pytest.approx(0.025) and d.low == 0.0 and not d.distinguishable


def test_balanced_accuracy_is_paired_the_same_way():
    labels_correct = np.tile([True, False, False], 40)
    b_correct = np.ones(120, dtype=bool)
    d = pb.paired_difference(pb.paired_predictions(_frame(labels_correct), _frame(b_correct), "test", "fusion"),
                             "balanced_accuracy", n_boot=300)
    assert d.a == pytest.approx(1 / 3) and d.b == 1.0 and d.low > 0.5


def test_predictions_of_different_splits_are_refused_by_name():
    correct = np.ones(40, dtype=bool)
    with pytest.raises(pb.NotPaired, match="2 patch\\(es\\) only in A, 0 only in B"):
        pb.paired_predictions(_frame(correct), _frame(correct).iloc[:38], "test", "fusion")
    relabelled = _frame(correct)
    relabelled.loc[3, "label"] = 2
    with pytest.raises(pb.NotPaired, match="label"):
        pb.paired_predictions(_frame(correct), relabelled, "test", "fusion")
    with pytest.raises(pb.NotPaired, match="no 'val' rows"):
        pb.paired_predictions(_frame(correct), _frame(correct), "val", "fusion")
    with pytest.raises(ValueError, match="unknown metric"):
        pb.paired_difference(pb.paired_predictions(_frame(correct), _frame(correct), "test", "fusion"), "f1")


def test_paired_table_covers_each_shared_classifier_and_notes_the_rest():
    correct = np.random.default_rng(3).random(60) < 0.5
    a = pd.concat([_frame(correct), _frame(correct, classifier="svm")])
    b = pd.concat([_frame(~correct), _frame(correct, classifier="knn")])
    table, notes = pb.paired_table(a, b, "test", classifiers=("fusion", "svm", "knn"), n_boot=200)
    assert table[["classifier", "metric"]].values.tolist() == [["fusion", "accuracy"], ["fusion", "balanced_accuracy"]]
    assert table.loc[0, "diff"] == pytest.approx(1 - 2 * correct.mean())
    assert len(notes) == 2 and "svm" in notes[0] and "knn" in notes[1]
