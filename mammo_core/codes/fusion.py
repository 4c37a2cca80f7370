"""Choosing the fusion weights of the three branches (the paper's Figure 9 idea), measured honestly.

Each candidate weight triple on a simplex grid is scored by the validation accuracy of the same linear
probe (standardised features, ridge-regression classifier: closed form, so a 66-point grid costs
seconds, not minutes, and no iteration limit decides the result) fitted on the training features. The
same probe scores each branch alone, so the gain of fusion over each branch is a measured number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import RidgeClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mammo_core.codes.classifiers import simplex_grid
from mammo_core.codes.features import BRANCH_DATASETS, fuse


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0):
    """A standardised ridge classifier: cheap, deterministic, no tuning to hide behind (``seed`` unused)."""
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=1.0))
    return probe.fit(train_x, train_y)


def probe_accuracy(train_x, train_y, eval_sets: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int = 0):
    probe = linear_probe(train_x, train_y, seed)
    return {name: float((probe.predict(x) == y).mean()) if len(y) else float("nan")
            for name, (x, y) in eval_sets.items()}


@dataclass
class FusionSearch:
    weights: tuple[float, float, float]
    table: pd.DataFrame  # one row per grid point: w_freeze1, w_freeze2, w_freeze3, val_acc


def search_weights(
    train: Mapping[str, np.ndarray], val: Mapping[str, np.ndarray], step: float = 0.1, seed: int = 0
) -> FusionSearch:
    """Best weights by validation accuracy; ties go to the most uniform triple (then grid order)."""
    rows = []
    for w in map(tuple, simplex_grid(len(BRANCH_DATASETS), step)):
        acc = probe_accuracy(fuse(train, w), train["labels"], {"val": (fuse(val, w), val["labels"])}, seed)["val"]
        rows.append({**{f"w_{b}": wb for b, wb in zip(BRANCH_DATASETS, w, strict=True)}, "val_acc": acc})
    table = pd.DataFrame(rows)
    spread = table[[f"w_{b}" for b in BRANCH_DATASETS]].std(axis=1)
    order = table.assign(_spread=spread).sort_values(["val_acc", "_spread"], ascending=[False, True], kind="stable")
    best = order.iloc[0]
    return FusionSearch(tuple(float(best[f"w_{b}"]) for b in BRANCH_DATASETS), table)


def check_weights(weights: Sequence[float]) -> tuple[float, float, float]:
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fusion weights must be three non-negative numbers, got {list(weights)}")
    return tuple(float(w) for w in weights)  # type: ignore[return-value]
