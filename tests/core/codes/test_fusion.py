"""Choosing the branches' fusion weights: the grid search finds the one informative branch, measured on val."""

from __future__ import annotations

import numpy as np
import pytest

from mammo_core.codes import fusion


def _branches(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """freeze2 separates the two classes; freeze1 and freeze3 are loud noise that drowns it when mixed in."""
    labels = rng.integers(0, 2, n)
    signal = (2.0 * labels - 1.0)[:, None] + rng.normal(0, 0.1, (n, 8))
    return {"freeze1": rng.normal(0, 10, (n, 8)).astype(np.float32), "freeze2": signal.astype(np.float32),
            "freeze3": rng.normal(0, 10, (n, 8)).astype(np.float32), "labels": labels}


def test_the_search_puts_all_weight_on_the_informative_branch() -> None:
    rng = np.random.default_rng(0)
    train, val = _branches(rng, 200), _branches(rng, 100)
    found = fusion.search_weights(train, val, step=0.5)
    assert found.weights == (0.0, 1.0, 0.0)
    assert len(found.table) == 6  # the step-0.5 simplex: three vertices, three midpoints
    by_weights = {(r.w_freeze1, r.w_freeze2, r.w_freeze3): r.val_acc for r in found.table.itertuples()}
    assert by_weights[(0.0, 1.0, 0.0)] == 1.0
    assert by_weights[(1.0, 0.0, 0.0)] < 0.7 and by_weights[(0.5, 0.5, 0.0)] < 0.8  # noise alone, noise mixed in


def test_probe_accuracy_scores_each_evaluation_set() -> None:
    rng = np.random.default_rng(1)
    data = _branches(rng, 120)
    scores = fusion.probe_accuracy(data["freeze2"], data["labels"],
                                   {"same": (data["freeze2"], data["labels"]),
                                    "flipped": (data["freeze2"], 1 - data["labels"])})
    assert scores == {"same": 1.0, "flipped": 0.0}


def test_weights_are_checked_before_use() -> None:
    assert fusion.check_weights([1, 2, 1]) == (1.0, 2.0, 1.0)
    for bad in ([0.5, 0.5], [1.0, -0.1, 0.1], [0.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="three non-negative numbers"):
            fusion.check_weights(bad)
