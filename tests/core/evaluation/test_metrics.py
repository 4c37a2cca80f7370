"""Metrics against scikit-learn, the patient bootstrap, and the paper's Tables 2 and 3 on known answers."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn import metrics as skm

from mammo_core.evaluation.metrics import (
    ACCURACY,
    AUC_OVR_MACRO,
    BALANCED_ACCURACY,
    MACRO_F1,
    bootstrap_ci,
    bootstrap_distribution,
    branch_error_table,
    branch_pair_accuracy_table,
    classification_report_dict,
    confusion_matrix,
    patient_bootstrap_weights,
    recall_of,
    report_with_ci,
)

NAMES = ["benign_calc", "malignant_calc", "benign_mass", "malignant_mass"]


def predictions(n: int, seed: int, n_classes: int = 4, skill: float = 1.5):
    """Labels, probabilities correlated with them (rounded to 2 decimals so ties occur), argmax predictions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes)) + skill * np.eye(n_classes)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    proba = np.round(proba, 2)
    return y, np.argmax(proba, axis=1), proba


def test_metrics_match_sklearn():
    y, pred, proba = predictions(400, 0)
    assert ACCURACY(y, pred, proba) == pytest.approx(skm.accuracy_score(y, pred))
    assert MACRO_F1(y, pred, proba) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert BALANCED_ACCURACY(y, pred, proba) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert recall_of(2)(y, pred, proba) == pytest.approx(skm.recall_score(y, pred, labels=[2], average="macro"))
    expected_auc = np.mean([skm.roc_auc_score(y == c, proba[:, c]) for c in range(4)])  # ties included
    assert AUC_OVR_MACRO(y, pred, proba) == pytest.approx(expected_auc)
    np.testing.assert_array_equal(confusion_matrix(y, pred, 4), skm.confusion_matrix(y, pred, labels=range(4)))


def test_report_skips_auc_of_absent_class_and_says_so():
    y, pred, proba = predictions(200, 1)
    keep = y != 3
    y, pred, proba = y[keep], pred[keep], proba[keep]
    report = classification_report_dict(y, pred, proba, NAMES)
    assert report["auc_skipped"] == ["malignant_mass"]
    assert set(report["auc"]) == {"benign_calc", "malignant_calc", "benign_mass"}
    expected = np.mean([skm.roc_auc_score(y == c, proba[:, c]) for c in range(3)])
    assert report["auc_ovr_macro"] == pytest.approx(expected)
    assert np.isnan(report["recall"]["malignant_mass"])
    assert report["recall"]["benign_calc"] == pytest.approx(skm.recall_score(y, pred, labels=[0], average="macro"))
    assert report["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert report["n"] == int(keep.sum())
    assert np.array(report["confusion"]).sum() == report["n"]


def test_patient_weights_keep_a_patients_rows_together():
    groups = np.array(["p1", "p1", "p2", "p3", "p3", "p3", "p4"])
    weights = patient_bootstrap_weights(groups, 200, seed=3)
    assert weights.shape == (200, 7)
    for patient in np.unique(groups):
        rows = weights[:, groups == patient]
        assert (rows == rows[:, :1]).all()  # every row of a patient has the patient's draw count
    first_rows = weights[:, [0, 2, 3, 6]]  # one row per patient
    assert (first_rows.sum(axis=1) == 4).all()  # each resample draws as many patients as there are
    assert first_rows.std() > 0  # and the draws vary


def test_generic_metric_sees_whole_patients_and_matches_the_vectorised_path():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 5, size=40)
    groups = np.repeat(np.arange(40), sizes)
    y, pred, proba = predictions(groups.size, 2)
    seen = []

    def accuracy_and_check(yt, yp, pr):
        seen.append(yt.size)
        return float(np.mean(yt == yp))

    # Pass the patient ids as y_true to a checker: each drawn patient must bring all its rows.
    def whole_patients(ids, _pred, _proba):
        counts = np.bincount(ids, minlength=40)
        drawn = counts > 0
        assert (counts[drawn] % sizes[drawn] == 0).all()
        return 0.0

    bootstrap_distribution(whole_patients, groups, groups, None, groups, n_boot=50, seed=1)
    slow = bootstrap_distribution(accuracy_and_check, y, pred, proba, groups, n_boot=50, seed=1)
    fast = bootstrap_distribution(ACCURACY, y, pred, proba, groups, n_boot=50, seed=1)
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    assert len(set(seen)) > 1  # resamples have varying row counts: patients, not rows, are drawn
    slow_auc = bootstrap_distribution(lambda a, b, c: AUC_OVR_MACRO(a, b, c), y, pred, proba, groups, 50, 1)
    fast_auc = bootstrap_distribution(AUC_OVR_MACRO, y, pred, proba, groups, 50, 1)
    np.testing.assert_allclose(fast_auc, slow_auc, atol=1e-12)
    slow_f1 = bootstrap_distribution(lambda a, b, c: skm.f1_score(a, b, average="macro"), y, pred, proba,
                                     groups, 20, 4)
    np.testing.assert_allclose(bootstrap_distribution(MACRO_F1, y, pred, proba, groups, 20, 4), slow_f1, atol=1e-12)


def test_ci_contains_point_estimate_and_narrows_with_more_patients():
    widths = []
    for n_patients in (60, 600):
        groups = np.repeat(np.arange(n_patients), 2)
        y, pred, proba = predictions(groups.size, 5, skill=1.0)
        for metric in (ACCURACY, BALANCED_ACCURACY, AUC_OVR_MACRO):
            low, high = bootstrap_ci(metric, y, pred, proba, groups, n_boot=500, seed=0)
            assert low <= metric(y, pred, proba) <= high, metric.name
            assert low < high
        low, high = bootstrap_ci(ACCURACY, y, pred, proba, groups, n_boot=500, seed=0)
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(10) expected


def test_patient_resampling_widens_the_ci_of_correlated_rows():
    # 50 patients with 10 identical rows each: resampling rows would pretend there are 500 independent ones.
    y, pred, proba = predictions(50, 6, skill=1.0)
    rows = np.repeat(np.arange(50), 10)
    by_patient = bootstrap_ci(ACCURACY, y[rows], pred[rows], proba[rows], rows, n_boot=400, seed=0)
    by_row = bootstrap_ci(ACCURACY, y[rows], pred[rows], proba[rows], None, n_boot=400, seed=0)
    assert (by_patient[1] - by_patient[0]) > 2 * (by_row[1] - by_row[0])


def test_bootstrap_is_fast_and_reproducible():
    groups = np.repeat(np.arange(500), 2)
    y, pred, proba = predictions(1000, 7)
    start = time.perf_counter()
    ci = bootstrap_ci(MACRO_F1, y, pred, proba, groups, n_boot=1000, seed=11)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed
    assert bootstrap_ci(MACRO_F1, y, pred, proba, groups, n_boot=1000, seed=11) == ci
    report = report_with_ci(y, pred, proba, NAMES, groups, n_boot=200, seed=0)
    assert set(report["ci"]) >= {"accuracy", "macro_f1", "balanced_accuracy", "auc_ovr_macro", "recall/benign_mass"}


def test_table2_on_hand_built_probabilities():
    y = np.array([0, 0, 1, 1])
    a = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])  # right, wrong, right, wrong
    b = np.array([[0.2, 0.8], [0.8, 0.2], [0.1, 0.9], [0.45, 0.55]])  # wrong, right, right, right
    c = np.array([[0.7, 0.3], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])  # right, right, wrong, wrong
    table = branch_pair_accuracy_table({"F1": a, "F2": b, "F3": c}, y, ["benign", "malignant"])
    assert list(table.index) == ["F1", "F2", "F3", "F1+F2", "F1+F3", "F2+F3"]
    assert list(table.columns) == ["benign", "malignant", "overall"]
    assert table.loc["F1"].tolist() == [0.5, 0.5, 0.5]
    assert table.loc["F2"].tolist() == [0.5, 1.0, 0.75]
    assert table.loc["F3"].tolist() == [1.0, 0.0, 0.5]
    # F1+F2 averages: [.55,.45] right, [.6,.4] right, [.2,.8] right, [.525,.475] wrong
    assert table.loc["F1+F2"].tolist() == [1.0, 0.5, 0.75]
    # F1+F3: [.8,.2] right, [.55,.45] right, [.55,.45] wrong, [.75,.25] wrong
    assert table.loc["F1+F3"].tolist() == [1.0, 0.0, 0.5]
    # F2+F3: [.45,.55] wrong, [.75,.25] right, [.45,.55] right, [.675,.325] wrong
    assert table.loc["F2+F3"].tolist() == [0.5, 0.5, 0.5]


def test_table3_on_hand_built_probabilities():
    y = np.array([0, 0, 0, 1, 1, 1])
    right = {0: [0.9, 0.1], 1: [0.1, 0.9]}
    wrong = {0: [0.1, 0.9], 1: [0.9, 0.1]}
    # per sample, which branches are wrong
    pattern = [(), ("F1",), ("F1", "F2", "F3"), ("F2",), ("F3",), ("F1", "F3")]
    probas = {b: np.array([wrong[t] if b in w else right[t] for t, w in zip(y, pattern, strict=True)])
              for b in ("F1", "F2", "F3")}
    table = branch_error_table(probas, y, ["benign", "malignant"])
    assert list(table.columns) == ["n_samples", "wrong_only_F1", "wrong_only_F2", "wrong_only_F3",
                                   "wrong_in_exactly_one", "wrong_in_all"]
    assert table.loc["benign"].tolist() == [3, 1, 0, 0, 1, 1]
    assert table.loc["malignant"].tolist() == [3, 0, 1, 1, 2, 0]
    assert table.loc["all"].tolist() == [6, 1, 1, 1, 3, 1]
