"""Paired bootstrap of a metric difference between two models scored on the same patients.

Why paired: two runs evaluated on one split share its hard and easy patients; resampling each run on its own
would add both runs' sampling noise and hide real differences, while comparing the two point values alone
ignores the noise entirely. Each resample draws patients with replacement (all patches of a patient together,
:func:`mammo_core.evaluation.metrics.patient_bootstrap_weights`) and scores both models on that same resample, so the
interval is that of ``B - A`` itself. A difference is *distinguishable from noise* when the percentile
interval excludes 0; the point difference alone never decides anything.

Predictions are matched row by row on an item id (``source_id``: the patch) and must cover exactly the same
items with the same labels; otherwise the two runs did not see the same split and there is nothing to pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mammo_core.evaluation import metrics

PREDICTION_COLUMNS = ("split", "classifier", "source_id", "patient_id", "label", "predicted")
HEADLINE = {"accuracy": metrics.ACCURACY, "balanced_accuracy": metrics.BALANCED_ACCURACY}


class NotPaired(ValueError):
    """The two prediction sets do not cover the same items with the same labels."""


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    a: float
    b: float
    low: float
    high: float
    n_items: int
    n_patients: int
    n_boot: int
    confidence: float
    unit: str = "patches"  # what n_items counts (the detection bootstrap pairs images)

    @property
    def diff(self) -> float:
        return self.b - self.a

    @property
    def distinguishable(self) -> bool:
        """True when the interval of B - A excludes 0 (either sign)."""
        return not (math.isnan(self.low) or math.isnan(self.high)) and (self.low > 0 or self.high < 0)

    @property
    def b_better(self) -> bool:
        """True when B - A is positive with the whole interval above 0."""
        return not math.isnan(self.low) and self.low > 0

    def describe(self, labels: tuple[str, str] = ("A", "B")) -> str:
        a, b = labels
        verdict = "distinguishable from noise" if self.distinguishable else "not distinguishable from noise"
        return (f"{self.metric}: {a} {self.a:.4f}, {b} {self.b:.4f}, {b} - {a} {self.diff:+.4f}, "
                f"{self.confidence:.0%} paired bootstrap CI [{self.low:+.4f}, {self.high:+.4f}] over "
                f"{self.n_patients} patients ({self.n_items} {self.unit}, {self.n_boot} resamples): {verdict}")


def paired_predictions(a: pd.DataFrame, b: pd.DataFrame, split: str, classifier: str) -> pd.DataFrame:
    """Rows of ``split``/``classifier`` of both prediction tables joined on ``source_id``.

    Columns: ``source_id``, ``patient_id``, ``label``, ``predicted_a``, ``predicted_b``. :class:`NotPaired`
    when a table lacks the rows, or the two cover different items or disagree on an item's label or patient.
    """
    parts = []
    for name, frame in (("A", a), ("B", b)):
        missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
        if missing:
            raise NotPaired(f"predictions of {name} lack column(s) {missing}")
        part = frame[(frame["split"] == split) & (frame["classifier"] == classifier)]
        if part.empty:
            raise NotPaired(f"predictions of {name} have no {split!r} rows for {classifier!r}")
        if part["source_id"].duplicated().any():
            raise NotPaired(f"predictions of {name} repeat a source_id in {split!r} for {classifier!r}")
        parts.append(part.set_index("source_id"))
    only_a = parts[0].index.difference(parts[1].index)
    only_b = parts[1].index.difference(parts[0].index)
    if len(only_a) or len(only_b):
        raise NotPaired(f"the {split} splits differ: {len(only_a)} patch(es) only in A, {len(only_b)} only in B")
    joined = parts[0].merge(parts[1], left_index=True, right_index=True, suffixes=("_a", "_b"))
    for column in ("label", "patient_id"):
        if (joined[f"{column}_a"].astype(str) != joined[f"{column}_b"].astype(str)).any():
            raise NotPaired(f"the {split} splits disagree on the {column} of some patches")
    return pd.DataFrame({"source_id": joined.index, "patient_id": joined["patient_id_a"].astype(str).to_numpy(),
                         "label": joined["label_a"].to_numpy(), "predicted_a": joined["predicted_a"].to_numpy(),
                         "predicted_b": joined["predicted_b"].to_numpy()}).sort_values("source_id", ignore_index=True)


def paired_difference(pairs: pd.DataFrame, metric: str = "accuracy", n_boot: int = 2000, seed: int = 0,
                      confidence: float = 0.95) -> PairedDifference:
    """Percentile CI of ``metric(B) - metric(A)`` under one patient resampling shared by both models."""
    if metric not in HEADLINE:
        raise ValueError(f"unknown metric {metric!r}; use one of {sorted(HEADLINE)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    fn = HEADLINE[metric]
    y = pairs["label"].to_numpy()
    pred_a, pred_b = pairs["predicted_a"].to_numpy(), pairs["predicted_b"].to_numpy()
    groups = pairs["patient_id"].to_numpy()
    weights = metrics.patient_bootstrap_weights(groups, n_boot, seed)
    diffs = fn.batch(y, pred_b, None, weights) - fn.batch(y, pred_a, None, weights)
    diffs = diffs[np.isfinite(diffs)]
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = (np.percentile(diffs, [tail, 100.0 - tail]) if diffs.size else (np.nan, np.nan))
    return PairedDifference(metric=metric, a=fn(y, pred_a), b=fn(y, pred_b), low=float(low), high=float(high),
                            n_items=len(pairs), n_patients=int(pd.unique(groups).size), n_boot=n_boot,
                            confidence=confidence)


def paired_table(a: pd.DataFrame, b: pd.DataFrame, split: str = "test",
                 classifiers: tuple[str, ...] = ("fusion", "svm", "knn", "rf"), n_boot: int = 2000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[pd.DataFrame, list[str]]:
    """Paired CIs of B - A for every headline metric of every classifier both runs predicted on ``split``.

    Returns (one row per classifier and metric, notes on what could not be paired). A classifier missing
    from either run is a note, not an error; splits that differ leave the table empty with the reason.
    """
    rows, notes = [], []
    for classifier in classifiers:
        try:
            pairs = paired_predictions(a, b, split, classifier)
        except NotPaired as exc:
            notes.append(f"{classifier}: no paired {split} comparison ({exc})")
            continue
        for metric in HEADLINE:
            rows.append(table_row(classifier, paired_difference(pairs, metric, n_boot=n_boot, seed=seed,
                                                                confidence=confidence)))
    return pd.DataFrame(rows), notes


def table_row(model: str, d: PairedDifference) -> dict:
    """One row of a paired table (:func:`paired_table`; ``mammo compare`` adds the detectors' rows)."""
    return {"classifier": model, "metric": d.metric, "a": d.a, "b": d.b, "diff": d.diff, "ci_low": d.low,
            "ci_high": d.high, "confidence": d.confidence, "n_patients": d.n_patients, "n_items": d.n_items,
            "n_boot": d.n_boot, "distinguishable": d.distinguishable}


def paired_metric_difference(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, groups: np.ndarray,
                             metric: str = "accuracy", n_boot: int = 2000, seed: int = 0,
                             confidence: float = 0.95) -> PairedDifference:
    """:func:`paired_difference` for aligned arrays (one row per item, both models' predictions on it)."""
    pairs = pd.DataFrame({"label": np.asarray(y_true), "predicted_a": np.asarray(pred_a),
                          "predicted_b": np.asarray(pred_b), "patient_id": np.asarray(groups).astype(str)})
    return paired_difference(pairs, metric, n_boot=n_boot, seed=seed, confidence=confidence)


def paired_mean_difference(values_a: np.ndarray, values_b: np.ndarray, groups: np.ndarray, metric: str,
                           n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> PairedDifference:
    """Paired CI of ``mean(B) - mean(A)`` for a per-item score (a retrieval query's AP), resampling patients.

    Why: MAP is a mean over queries, so the same patient resampling as for accuracy applies; items whose
    score is undefined in either model (NaN) are left out of both, so both means cover the same items.
    """
    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    if not a.shape == b.shape == groups.shape:
        raise NotPaired(f"per-item scores differ in length: {a.shape}, {b.shape}, patients {groups.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b, groups = a[keep], b[keep], groups[keep]
    nan = float("nan")
    if a.size == 0:
        return PairedDifference(metric, nan, nan, nan, nan, 0, 0, n_boot, confidence)
    weights = metrics.patient_bootstrap_weights(groups, n_boot, seed)
    totals = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        diffs = (weights @ b - weights @ a) / totals
    diffs = diffs[np.isfinite(diffs)]
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = (np.percentile(diffs, [tail, 100.0 - tail]) if diffs.size else (nan, nan))
    return PairedDifference(metric=metric, a=float(a.mean()), b=float(b.mean()), low=float(low), high=float(high),
                            n_items=int(a.size), n_patients=int(pd.unique(groups).size), n_boot=n_boot,
                            confidence=confidence)
