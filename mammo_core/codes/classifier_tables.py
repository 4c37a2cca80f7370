"""The classify stage's rows as plain functions: per-patch predictions and one test-set row per classifier.

Why here and not in the stage: the stage decides what is fitted and where files go; what a row holds (which
probability columns, which confidence bounds) is the predictions/table contract that the report, ``mammo
promote`` and ``mammo compare`` read, so it is written once, beside the classifiers that produce it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mammo_core.codes.classifiers import FusedClassifier, align_proba

PROBA_PREFIX = "proba/"  # predictions.csv columns: one probability per class (macro AUC in the report)


def class_probabilities(estimator: Any, x: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(rows, classes) probabilities in ``classes`` order; a fitted member whose training split lacked a class
    gets a zero column for it (a :class:`FusedClassifier` is aligned already)."""
    if isinstance(estimator, FusedClassifier):
        return estimator.predict_proba(x)
    return align_proba(estimator.predict_proba(x), estimator.classes_, list(classes))


def prediction_rows(split: str, classifier: str, source_ids: np.ndarray, patient_ids: np.ndarray,
                    labels: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One ``predictions.csv`` row per patch: ids, label, the arg-max class and one probability per class."""
    classes = np.arange(len(class_names))
    return pd.DataFrame({
        "split": split, "classifier": classifier, "source_id": source_ids, "patient_id": patient_ids,
        "label": labels, "predicted": classes[proba.argmax(axis=1)],
        **{f"{PROBA_PREFIX}{c}": proba[:, i] for i, c in enumerate(class_names)}})


def result_row(classifier: str, report: dict[str, Any], recall_of: Sequence[str] = (),
             **extra: Any) -> dict[str, Any]:
    """A classifier's test-set row from ``mammo_core.evaluation.metrics.report_with_ci``: accuracy with its
    bootstrap interval, macro F1, balanced accuracy, macro AUC (NaN when undefined), then ``recall/<class>``
    for each of ``recall_of``. ``extra`` columns follow ``classifier``."""
    row = {"classifier": classifier, **extra, "test_acc": report["accuracy"],
           "test_acc_ci_low": report["ci"]["accuracy"][0], "test_acc_ci_high": report["ci"]["accuracy"][1],
           "macro_f1": report["macro_f1"], "balanced_acc": report["balanced_accuracy"],
           "auc_ovr_macro": report.get("auc_ovr_macro", np.nan)}
    row.update({f"recall/{c}": report["recall"][c] for c in recall_of})
    return row
