"""Classification metrics, patient-level bootstrap confidence intervals, and the paper's diversity tables.

Conventions: labels are integer class indices ``0..K-1``; ``proba`` is (rows, K) with column k for class k;
``class_names[k]`` names class k.

Why the bootstrap resamples patients: a patient contributes several rows (both views, several lesions),
and those rows are correlated; resampling rows would treat them as independent and give intervals that
are too narrow. A drawn patient brings all their rows, as many times as drawn.

Why it is vectorised: resampling patients with replacement is the same as giving each row a weight equal
to its patient's draw count. Every metric here is a function of weighted counts (confusion matrix, ranked
positive/negative pairs for the AUC), so all resamples are evaluated at once from a (n_boot, rows) weight
matrix, with exactly the values a loop over duplicated rows would give. Any other metric (a plain
``f(y_true, y_pred, proba) -> float``) still works through a slower loop over the drawn rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

PlainMetric = Callable[[np.ndarray, np.ndarray, np.ndarray | None], float]


# ---------------------------------------------------------------------------------------- weighted counts


def _n_classes(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None) -> int:
    if proba is not None:
        return int(np.asarray(proba).shape[1])
    return int(max(np.max(y_true, initial=0), np.max(y_pred, initial=0))) + 1


def weighted_confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """Confusion matrices (n_boot, K, K), rows = true class, for each row of ``weights`` (n_boot, rows)."""
    cell = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    onehot = np.zeros((cell.size, n_classes * n_classes))
    onehot[np.arange(cell.size), cell] = 1.0
    return (weights @ onehot).reshape(weights.shape[0], n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(values)
    counts = valid.sum(axis=1)
    return _ratio(np.where(valid, values, 0.0).sum(axis=1), counts.astype(np.float64))


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC per weight row: P(score_pos > score_neg) + 0.5 P(tie), pairs weighted by row weights."""
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # tie groups
    w = weights[:, order]
    pos = positive[order]
    pos_w = np.add.reduceat(w * pos, starts, axis=1)
    neg_w = np.add.reduceat(w * ~pos, starts, axis=1)
    neg_below = np.cumsum(neg_w, axis=1) - neg_w
    wins = (pos_w * (neg_below + 0.5 * neg_w)).sum(axis=1)
    return _ratio(wins, pos_w.sum(axis=1) * neg_w.sum(axis=1))


# ------------------------------------------------------------------------------------ batch-able metrics


@dataclass(frozen=True)
class Metric:
    """A metric computable for many bootstrap weightings at once.

    ``metric(y_true, y_pred, proba)`` gives the point value; ``metric.batch(..., weights)`` gives one value
    per weight row. Both share the same code, so the point estimate and the bootstrap agree by construction.
    """

    name: str
    kind: str  # "accuracy" | "macro_f1" | "balanced_accuracy" | "recall" | "auc_ovr_macro" | "auc"
    class_index: int | None = None

    def __call__(self, y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None = None) -> float:
        return float(self.batch(y_true, y_pred, proba, np.ones((1, np.asarray(y_true).size)))[0])

    def batch(self, y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None,
              weights: np.ndarray) -> np.ndarray:
        y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
        k = _n_classes(y_true, y_pred, proba)
        if self.kind in ("auc", "auc_ovr_macro"):
            if proba is None:
                raise ValueError(f"{self.name} needs class probabilities")
            proba = np.asarray(proba, dtype=np.float64)
            classes = [self.class_index] if self.kind == "auc" else auc_classes(y_true, k)
            if not classes:
                return np.full(weights.shape[0], np.nan)
            per_class = np.stack([_weighted_auc(proba[:, c], y_true == c, weights) for c in classes], axis=1)
            return _nanmean_rows(per_class)
        conf = weighted_confusion(y_true, y_pred, k, weights)
        tp = np.diagonal(conf, axis1=1, axis2=2)
        support = conf.sum(axis=2)
        predicted = conf.sum(axis=1)
        if self.kind == "accuracy":
            return _ratio(tp.sum(axis=1), conf.sum(axis=(1, 2)))
        if self.kind == "recall":
            return _ratio(tp[:, self.class_index], support[:, self.class_index])
        if self.kind == "balanced_accuracy":  # mean recall over the classes present in y_true (as sklearn)
            return _nanmean_rows(_ratio(tp, support))
        if self.kind == "macro_f1":  # over the classes in y_true or y_pred (sklearn's default labels)
            return _nanmean_rows(_ratio(2 * tp, support + predicted))
        raise ValueError(f"unknown metric kind {self.kind!r}")


ACCURACY = Metric("accuracy", "accuracy")
MACRO_F1 = Metric("macro_f1", "macro_f1")
BALANCED_ACCURACY = Metric("balanced_accuracy", "balanced_accuracy")
AUC_OVR_MACRO = Metric("auc_ovr_macro", "auc_ovr_macro")


def recall_of(class_index: int, name: str | None = None) -> Metric:
    return Metric(name or f"recall_{class_index}", "recall", class_index)


def auc_classes(y_true: np.ndarray, n_classes: int) -> list[int]:
    """Classes whose one-vs-rest AUC is defined on ``y_true``: present, and not the only class present."""
    present = set(np.unique(np.asarray(y_true)).tolist())
    if len(present) < 2:
        return []
    return [c for c in range(n_classes) if c in present]


# -------------------------------------------------------------------------------------------- the report


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) integer counts, rows = true class, columns = predicted class."""
    w = np.ones((1, np.asarray(y_true).size))
    return np.rint(weighted_confusion(y_true, y_pred, n_classes, w)[0]).astype(np.int64)


def classification_report_dict(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None,
                                class_names: Sequence[str]) -> dict:
    """Accuracy, macro F1, balanced accuracy, per-class recall and one-vs-rest AUC.

    ``auc_ovr_macro`` averages the classes whose AUC is defined; the classes absent from ``y_true`` are
    listed in ``auc_skipped`` (their AUC has no positives). Recall of an absent class is NaN.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    names = list(class_names)
    k = len(names)
    if proba is not None and np.asarray(proba).shape != (y_true.size, k):
        raise ValueError(f"proba has shape {np.asarray(proba).shape}, expected ({y_true.size}, {k})")
    report: dict = {
        "n": int(y_true.size),
        "accuracy": ACCURACY(y_true, y_pred, proba),
        "macro_f1": MACRO_F1(y_true, y_pred, proba),
        "balanced_accuracy": BALANCED_ACCURACY(y_true, y_pred, proba),
        "recall": {names[c]: recall_of(c)(y_true, y_pred, proba) for c in range(k)},
        "confusion": confusion_matrix(y_true, y_pred, k).tolist(),
    }
    if proba is not None:
        valid = auc_classes(y_true, k)
        report["auc_ovr_macro"] = AUC_OVR_MACRO(y_true, y_pred, proba)
        report["auc"] = {names[c]: Metric("auc", "auc", c)(y_true, y_pred, proba) for c in valid}
        report["auc_skipped"] = [names[c] for c in range(k) if c not in valid]
    return report


# --------------------------------------------------------------------------------------------- bootstrap


def patient_bootstrap_weights(groups: np.ndarray, n_boot: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """(n_boot, rows) weights: each row's weight is how many times its patient was drawn in that resample.

    Each resample draws as many patients as there are, with replacement; all rows of one patient always
    share one weight, which is what "resampling patients" means.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    _, patient_of_row = np.unique(np.asarray(groups), return_inverse=True)
    n_patients = int(patient_of_row.max()) + 1 if patient_of_row.size else 0
    draws = rng.integers(0, n_patients, size=(n_boot, n_patients))
    flat = (draws + (np.arange(n_boot) * n_patients)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_boot * n_patients).reshape(n_boot, n_patients)
    return counts[:, patient_of_row].astype(np.float64)


def bootstrap_distribution(metric_fn: Metric | PlainMetric, y_true: np.ndarray, y_pred: np.ndarray,
                           proba: np.ndarray | None, groups: np.ndarray | None, n_boot: int = 1000,
                           seed: int = 0) -> np.ndarray:
    """The metric on each of ``n_boot`` patient resamples (NaN where undefined in a resample).

    ``groups`` holds the patient id of each row; ``None`` treats every row as its own patient.
    A :class:`Metric` is evaluated on all resamples at once; any other callable is called per resample
    on the drawn rows (each drawn patient's rows repeated by its draw count).
    """
    y_true = np.asarray(y_true)
    groups = np.arange(y_true.size) if groups is None else np.asarray(groups)
    if groups.shape != y_true.shape:
        raise ValueError(f"groups have shape {groups.shape}, expected {y_true.shape}")
    weights = patient_bootstrap_weights(groups, n_boot, seed)
    if isinstance(metric_fn, Metric):
        return metric_fn.batch(y_true, np.asarray(y_pred), proba, weights)
    y_pred = np.asarray(y_pred)
    out = np.empty(n_boot)
    for b in range(n_boot):
        rows = np.repeat(np.arange(y_true.size), weights[b].astype(np.int64))
        out[b] = metric_fn(y_true[rows], y_pred[rows], None if proba is None else np.asarray(proba)[rows])
    return out


def bootstrap_ci(metric_fn: Metric | PlainMetric, y_true: np.ndarray, y_pred: np.ndarray,
                 proba: np.ndarray | None, groups: np.ndarray | None, n_boot: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile confidence interval ``(low, high)`` of a metric under patient resampling.

    Resamples where the metric is undefined (e.g. no positive for an AUC) are dropped; if none is left the
    interval is ``(nan, nan)``.
    """
    values = bootstrap_distribution(metric_fn, y_true, y_pred, proba, groups, n_boot, seed)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def report_with_ci(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None, class_names: Sequence[str],
                   groups: np.ndarray | None, n_boot: int = 1000, seed: int = 0) -> dict:
    """:func:`classification_report_dict` plus ``ci``: ``metric -> (low, high)`` for the headline metrics."""
    report = classification_report_dict(y_true, y_pred, proba, class_names)
    headline = [ACCURACY, MACRO_F1, BALANCED_ACCURACY] + ([AUC_OVR_MACRO] if proba is not None else [])
    headline += [recall_of(c, f"recall/{name}") for c, name in enumerate(class_names)]
    report["ci"] = {m.name: bootstrap_ci(m, y_true, y_pred, proba, groups, n_boot, seed) for m in headline}
    return report


# ----------------------------------------------------------------------------------- the paper's tables


def _check_branches(probas: Mapping[str, np.ndarray], y_true: np.ndarray, class_names: Sequence[str]) -> None:
    for name, p in probas.items():
        if np.asarray(p).shape != (y_true.size, len(class_names)):
            raise ValueError(f"branch {name}: proba shape {np.asarray(p).shape}, "
                             f"expected ({y_true.size}, {len(class_names)})")


def _per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> list[float]:
    correct = y_true == y_pred
    return [float(correct[y_true == c].mean()) if (y_true == c).any() else float("nan") for c in range(n_classes)]


def branch_pair_accuracy_table(probas: Mapping[str, np.ndarray], y_true: np.ndarray,
                               class_names: Sequence[str]) -> pd.DataFrame:
    """The paper's Table 2: accuracy per class (and overall) of each branch and each pair of branches.

    A pair is fused by averaging its two probability arrays. Rows: the branches in the given order, then
    the pairs as ``"A+B"``; columns: the class names then ``overall``.
    """
    y_true = np.asarray(y_true)
    _check_branches(probas, y_true, class_names)
    k = len(class_names)
    rows: dict[str, np.ndarray] = {name: np.asarray(p, dtype=np.float64) for name, p in probas.items()}
    for a, b in itertools.combinations(list(probas), 2):
        rows[f"{a}+{b}"] = (rows[a] + rows[b]) / 2.0
    records = {}
    for label, p in rows.items():
        pred = np.argmax(p, axis=1)
        records[label] = [*_per_class_accuracy(y_true, pred, k), float((pred == y_true).mean())]
    return pd.DataFrame.from_dict(records, orient="index", columns=[*class_names, "overall"])


def branch_error_table(probas: Mapping[str, np.ndarray], y_true: np.ndarray,
                       class_names: Sequence[str]) -> pd.DataFrame:
    """The paper's Table 3: per class, samples wrong in exactly one branch (split by branch) and in all.

    Columns: ``n_samples``, ``wrong_only_<branch>`` for each branch, ``wrong_in_exactly_one`` (their sum),
    ``wrong_in_all``; one row per class plus ``all``. Many samples wrong in exactly one branch and few wrong
    in all is the diversity that makes fusion pay.
    """
    y_true = np.asarray(y_true)
    _check_branches(probas, y_true, class_names)
    names = list(probas)
    wrong = np.stack([np.argmax(np.asarray(probas[n]), axis=1) != y_true for n in names], axis=1)  # (N, B)
    n_wrong = wrong.sum(axis=1)
    masks = {cls: y_true == c for c, cls in enumerate(class_names)}
    masks["all"] = np.ones_like(y_true, dtype=bool)
    records = {}
    for label, mask in masks.items():
        only = [int((mask & (n_wrong == 1) & wrong[:, i]).sum()) for i in range(len(names))]
        records[label] = [int(mask.sum()), *only, int(sum(only)), int((mask & (n_wrong == len(names))).sum())]
    columns = ["n_samples", *[f"wrong_only_{n}" for n in names], "wrong_in_exactly_one", "wrong_in_all"]
    return pd.DataFrame.from_dict(records, orient="index", columns=columns)
