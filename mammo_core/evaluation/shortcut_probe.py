"""Shortcut probe: can statistics of a patch that say nothing about its tissue predict its class?

Why: a CNN learns whatever separates the classes most cheaply. If lesion patches differ from NORMAL ones by
black padded margins, brightness or crop scale (how they were cut, not what they show), a CNN's accuracy
can come from that cut, not from the lesion. The probe fits simple classifiers (a logistic regression and
a depth-3 tree) on five content-blind statistics per patch, on the training split, and scores them on the
test split: lesion vs NORMAL, and the task's classes. A probe far above chance names a shortcut; a CNN
whose accuracy is within the probe's interval has shown nothing beyond it.

The statistics (:data:`FEATURES`): the share of the crop outside its image (zero padding, exact from the
geometry), the share of black pixels in the stored patch (padding or background outside the breast), the
mean and standard deviation of the patch's intensity, and the crop's side in cache pixels before resizing.
Two feature sets (:data:`FEATURE_SETS`): ``cut`` holds only what the cutting decides (padding, black
pixels, side), so a probe above chance on it is a shortcut by construction; ``cut+intensity`` adds the mean
and spread of intensity, which a shortcut can hide in (windowing, background) but which also carry some
content (a bright mass raises a patch's spread), so a probe above chance there is a flag to look at, not a
proof.

Intervals are 95 % percentile intervals of a patient bootstrap over the test split
(:func:`mammo_core.evaluation.metrics.bootstrap_ci`), as for every other accuracy of the report. Nothing is chosen
on test: both probe models are reported, neither is picked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from mammo_core.data import labels
from mammo_core.evaluation import metrics
from mammo_core.storage import h5io

FEATURES = ("padded_fraction", "black_fraction", "mean_intensity", "std_intensity", "crop_side")
FEATURE_SETS = {"cut": ("padded_fraction", "black_fraction", "crop_side"), "cut+intensity": FEATURES}
PADDING_THRESHOLD = 0.05  # "a patch with more than 5 % padded pixels", the yardstick
SPLIT_TRAIN, SPLIT_TEST = 0, 2  # mammo_core.data.patches.SPLIT_CODES
BLOCK_ROWS = 4096


def patch_statistics(images: np.ndarray, boxes: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """(N, len(FEATURES)) float64 statistics of N patches: ``images`` (N, [1,] S, S) uint8, ``boxes`` (N, 4)
    crop boxes x0 y0 x1 y1, ``padded`` (N,) share of each crop outside its image."""
    flat = np.asarray(images).reshape(len(images), -1).astype(np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.column_stack([
        np.asarray(padded, dtype=np.float64),
        (flat == 0).mean(axis=1),
        flat.mean(axis=1),
        flat.std(axis=1),
        boxes[:, 2] - boxes[:, 0],
    ])


def _models(seed: int) -> dict[str, Any]:
    # class_weight "balanced": a probe that only answers the majority class would find no shortcut
    return {
        "logistic_regression": make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced",
                                                                                   max_iter=2000)),
        "tree_depth3": DecisionTreeClassifier(max_depth=3, min_samples_leaf=5, class_weight="balanced",
                                              random_state=seed),
    }


def _ci(metric: metrics.Metric, y: np.ndarray, pred: np.ndarray, groups: np.ndarray, n_boot: int,
        seed: int) -> tuple[float | None, float | None]:
    if n_boot <= 0:
        return None, None
    low, high = metrics.bootstrap_ci(metric, y, pred, None, groups, n_boot, seed)
    return (None if np.isnan(low) else low), (None if np.isnan(high) else high)


def fit_and_score(stats: np.ndarray, y: np.ndarray, split: np.ndarray, groups: np.ndarray, target: str,
                  n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per probe model: trained on the train split's rows, scored on the test split's rows.

    A target the data cannot probe (fewer than two classes in train, no test row) gives rows whose
    ``note`` says why and whose numbers are None, instead of an error: the rest of the stage goes on.
    """
    train, test = split == SPLIT_TRAIN, split == SPLIT_TEST
    y_test, g_test = y[test], np.asarray(groups)[test]
    base = {"target": target, "n_train": int(train.sum()), "n_test": int(test.sum()),
            "n_classes_test": int(np.unique(y_test).size)}
    if test.any():
        majority = np.bincount(y_test).max() / y_test.size
        base |= {"majority_rate": float(majority), "chance_balanced_acc": 1.0 / np.unique(y_test).size}
    why = ("fewer than two classes among the training patches" if np.unique(y[train]).size < 2 else
           "no test patch" if not test.any() else "")
    rows = []
    for name, model in _models(seed).items():
        row: dict[str, Any] = {**base, "model": name}
        if why:
            rows.append(row | {"test_acc": None, "note": why})
            continue
        model.fit(stats[train], y[train])
        pred = model.predict(stats[test])
        low, high = _ci(metrics.ACCURACY, y_test, pred, g_test, n_boot, seed)
        b_low, b_high = _ci(metrics.BALANCED_ACCURACY, y_test, pred, g_test, n_boot, seed)
        rows.append(row | {"test_acc": metrics.ACCURACY(y_test, pred), "test_acc_ci_low": low,
                           "test_acc_ci_high": high, "balanced_acc": metrics.BALANCED_ACCURACY(y_test, pred),
                           "balanced_acc_ci_low": b_low, "balanced_acc_ci_high": b_high})
    return rows


def padding_summary(padded: np.ndarray, is_lesion: np.ndarray, split: np.ndarray,
                    split_codes: dict[str, int]) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """kind (lesion / NORMAL) -> split (and ``all``) -> n, mean padded share, share of patches over 5 %, max."""
    out: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for kind, rows in (("lesion", is_lesion), ("NORMAL", ~is_lesion)):
        out[kind] = {}
        for name, code in [*split_codes.items(), ("all", None)]:
            values = padded[rows & ((split == code) if code is not None else True)]
            out[kind][name] = {
                "n": int(values.size),
                "mean": float(values.mean()) if values.size else None,
                "share_over_5pct": float((values > PADDING_THRESHOLD).mean()) if values.size else None,
                "max": float(values.max()) if values.size else None,
            }
    return out


def probe_patches_file(path: str | Path, class_names: Sequence[str], n_boot: int = 1000, seed: int = 0
                       ) -> dict[str, Any]:
    """The probe's results for a ``patches.h5``: padding per kind and split, and the probe rows for
    lesion-vs-NORMAL and for the task's classes (written by the patches stage as ``shortcut_probe.json``)."""
    path = Path(path)
    names = ["images", "box", "padded_fraction", "labels", "split", "patient_id"]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("stats", "labels", "split", "patient_id", "padded")}
    for _, block in h5io.iter_blocks(path, names, BLOCK_ROWS):
        parts["stats"].append(patch_statistics(block["images"], block["box"], block["padded_fraction"]))
        for key in ("labels", "split", "padded_fraction"):
            parts["padded" if key == "padded_fraction" else key].append(np.asarray(block[key]))
        parts["patient_id"].append(np.asarray(h5io.decode_strings(block["patient_id"]), dtype=object))
    stats, y = np.concatenate(parts["stats"]), np.concatenate(parts["labels"]).astype(np.int64)
    split, groups = np.concatenate(parts["split"]), np.concatenate(parts["patient_id"])
    is_lesion = y != labels.NORMAL_LABEL
    split_codes = h5io.read_attrs(path).get("split_codes") or {"train": 0, "val": 1, "test": 2}
    rows = []
    for target, target_y in (("lesion_vs_normal", is_lesion.astype(np.int64)), ("task_classes", y)):
        for set_name, columns in FEATURE_SETS.items():
            chosen = stats[:, [FEATURES.index(c) for c in columns]]
            rows += [row | {"features": set_name}
                     for row in fit_and_score(chosen, target_y, split, groups, target, n_boot, seed)]
    return {
        "features": list(FEATURES),
        "feature_sets": {k: list(v) for k, v in FEATURE_SETS.items()},
        "class_names": list(class_names),
        "models": {"logistic_regression": "standardised features, logistic regression, balanced class weights",
                   "tree_depth3": "decision tree, depth 3, at least 5 patches per leaf, balanced class weights"},
        "protocol": (f"fit on the train split, scored on the test split; 95% percentile interval of a patient "
                     f"bootstrap over test patients ({n_boot} resamples, seed {seed}); both models reported"),
        "padding": padding_summary(np.concatenate(parts["padded"]), is_lesion, split, dict(split_codes)),
        "rows": rows,
    }
