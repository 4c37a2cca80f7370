"""The classify stage's rows (mammo_core.codes.classifier_tables) on small synthetic values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from mammo_core.codes.classifier_tables import PROBA_PREFIX, class_probabilities, prediction_rows, result_row


def test_prediction_rows_hold_ids_label_argmax_and_one_probability_column_per_class():
    proba = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    frame = prediction_rows("test", "fusion", np.array(["p1", "p2"]), np.array(["A", "B"]), np.array([1, 2]),
                            proba, ["mass", "calc", "normal"])
    assert list(frame.columns) == ["split", "classifier", "source_id", "patient_id", "label", "predicted",
                                   f"{PROBA_PREFIX}mass", f"{PROBA_PREFIX}calc", f"{PROBA_PREFIX}normal"]
    assert frame["predicted"].tolist() == [1, 0]
    assert frame[f"{PROBA_PREFIX}calc"].tolist() == [0.7, 0.3]
    assert set(frame["split"]) == {"test"} and frame["patient_id"].tolist() == ["A", "B"]


def test_class_probabilities_give_a_zero_column_to_a_class_missing_from_training():
    x = np.array([[0, 0], [0, 1], [1, 1], [1, 0]], dtype=np.uint8)
    knn = KNeighborsClassifier(n_neighbors=1).fit(x, [0, 0, 2, 2])  # class 1 never seen
    proba = class_probabilities(knn, x, [0, 1, 2])
    assert proba.shape == (4, 3)
    assert proba[:, 1].tolist() == [0.0] * 4 and proba[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_result_row_orders_extra_columns_after_the_name_and_recall_last():
    report = {"accuracy": 0.75, "ci": {"accuracy": (0.5, 0.9)}, "macro_f1": 0.7, "balanced_accuracy": 0.72,
              "recall": {"mass": 1.0, "calc": 0.5}}
    row = result_row("svm", report, recall_of=["mass", "calc"], features="single freeze3")
    assert list(row) == ["classifier", "features", "test_acc", "test_acc_ci_low", "test_acc_ci_high", "macro_f1",
                         "balanced_acc", "auc_ovr_macro", "recall/mass", "recall/calc"]
    assert (row["test_acc"], row["test_acc_ci_low"], row["recall/calc"]) == (0.75, 0.5, 0.5)
    assert np.isnan(row["auc_ovr_macro"])  # undefined AUC stays NaN, not 0
    assert result_row("knn", {**report, "auc_ovr_macro": 0.8})["auc_ovr_macro"] == pytest.approx(0.8)
