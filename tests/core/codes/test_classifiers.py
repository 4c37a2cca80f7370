"""Classifiers on synthetic hash codes: each beats chance, fusion, weight choice, learned combiners."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mammo_core.codes.classifiers import (
    CLASSIFIER_NAMES,
    FusedClassifier,
    align_proba,
    choose_fusion_weights,
    fit_classifiers,
    fit_learned_combiners,
    limit_cv_to_labels,
    make_classifiers,
    simplex_grid,
    validate_codes,
)
from mammo_core.errors import ParamsError

N_BITS = 48
FAST = {"seed": 0, "rf": {"n_estimators": 40}, "svm": {"cv": 3}}


def synthetic_codes(n: int, seed: int, n_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Each class has its own probability of a 1 in every bit; overlapping enough that no model is perfect."""
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(1234).uniform(0.25, 0.75, size=(n_classes, N_BITS))
    y = rng.integers(0, n_classes, size=n)
    codes = (rng.random((n, N_BITS)) < prototypes[y]).astype(np.uint8)
    return codes, y


@pytest.fixture(scope="module")
def data():
    return {"train": synthetic_codes(300, 0), "val": synthetic_codes(150, 1), "test": synthetic_codes(150, 2)}


@pytest.fixture(scope="module")
def fitted(data):
    X, y = data["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated SVC(probability=True) path is not used
        return fit_classifiers(FAST, X, y).estimators


def test_make_classifiers_uses_params_and_calibrated_svm():
    models = make_classifiers({"knn": {"n_neighbors": 7}, "svm": {"C": 3.0}, "rf": {"n_estimators": 11}})
    assert list(models) == list(CLASSIFIER_NAMES)
    assert models["knn"].get_params()["metric"] == "hamming"
    assert models["knn"].get_params()["n_neighbors"] == 7
    assert models["svm"].get_params()["estimator__C"] == 3.0
    assert models["svm"].get_params()["estimator__probability"] in (False, "deprecated")
    assert models["svm"].get_params()["ensemble"] is False
    assert models["rf"].get_params()["n_estimators"] == 11
    with pytest.raises(ParamsError, match="n_neighbours"):
        make_classifiers({"knn": {"n_neighbours": 3}})
    with pytest.raises(ParamsError, match="mlp"):
        make_classifiers({"mlp": {}})


def test_every_classifier_beats_chance(data, fitted):
    X, y = data["test"]
    for name, est in fitted.items():
        acc = float(np.mean(est.predict(X) == y))
        assert acc > 0.55, (name, acc)  # chance is ~1/3
        proba = est.predict_proba(X)
        assert proba.shape == (len(y), 3)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)


def test_fusion_weights_on_validation(data, fitted):
    X, y = data["val"]
    probas = {n: est.predict_proba(X) for n, est in fitted.items()}
    chosen = choose_fusion_weights(probas, y, grid_step=0.1)
    assert set(chosen.weights) == set(CLASSIFIER_NAMES)
    assert sum(chosen.weights.values()) == pytest.approx(1.0)
    assert len(chosen.grid) == 66  # compositions of 10 into 3 parts
    points = [tuple(round(g[n], 6) for n in CLASSIFIER_NAMES) for g in chosen.grid]
    assert tuple(round(chosen.weights[n], 6) for n in CLASSIFIER_NAMES) in points
    assert chosen.val_accuracy == max(g["val_accuracy"] for g in chosen.grid)
    singles = [float(np.mean(np.argmax(p, axis=1) == y)) for p in probas.values()]
    assert chosen.val_accuracy >= max(singles) >= min(singles)

    fused = FusedClassifier.from_fitted(fitted, chosen.weights)
    fused_acc = float(np.mean(fused.predict(X) == y))
    assert fused_acc == pytest.approx(chosen.val_accuracy)
    assert fused_acc >= min(singles)
    expected = sum(chosen.weights[n] * probas[n] for n in CLASSIFIER_NAMES)
    np.testing.assert_allclose(fused.predict_proba(X), expected, atol=1e-12)


def test_weight_ties_go_to_the_most_uniform_point():
    # Identical members: every grid point has the same accuracy, so the choice is the centre-most point.
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    chosen = choose_fusion_weights({"a": p, "b": p, "c": p}, np.array([0, 1, 1]), grid_step=0.1)
    assert sorted(chosen.weights.values()) == pytest.approx([0.3, 0.3, 0.4])
    chosen2 = choose_fusion_weights({"a": p, "b": p}, np.array([0, 1, 1]), grid_step=0.25)
    assert chosen2.weights == {"a": 0.5, "b": 0.5}


def test_weight_choice_prefers_the_informative_member():
    y = np.array([0, 1, 0, 1])
    good = np.eye(2)[y] * 0.8 + 0.1
    bad = np.eye(2)[1 - y] * 0.9 + 0.05
    chosen = choose_fusion_weights({"good": good, "bad": bad}, y, grid_step=0.1)
    assert chosen.val_accuracy == 1.0
    assert chosen.weights["good"] > chosen.weights["bad"]
    with pytest.raises(ValueError, match="divide 1"):
        simplex_grid(2, 0.3)


def test_fused_classifier_aligns_a_missing_class(data):
    X, y = data["train"]
    keep = y != 2  # the kNN never sees class 2
    knn = make_classifiers(FAST)["knn"].fit(X[keep], y[keep])
    rf = make_classifiers(FAST)["rf"].fit(X, y)
    fused = FusedClassifier.from_fitted({"knn": knn, "rf": rf}, {"knn": 0.5, "rf": 0.5}, classes=[0, 1, 2])
    Xt = data["test"][0]
    proba = fused.predict_proba(Xt)
    expected = 0.5 * rf.predict_proba(Xt)
    expected[:, :2] += 0.5 * knn.predict_proba(Xt)
    np.testing.assert_allclose(proba, expected, atol=1e-12)
    assert set(np.unique(fused.predict(Xt))) <= {0, 1, 2}
    np.testing.assert_array_equal(align_proba(np.array([[0.3, 0.7]]), [0, 2], [0, 1, 2]), [[0.3, 0.0, 0.7]])


def test_fused_classifier_fit_and_bad_inputs(data):
    X, y = data["train"]
    fused = FusedClassifier(list(make_classifiers(FAST).items()), weights=[2, 1, 1]).fit(X, y)
    np.testing.assert_allclose(fused.weights_, [0.5, 0.25, 0.25])
    assert float(np.mean(fused.predict(data["test"][0]) == data["test"][1])) > 0.55
    with pytest.raises(ValueError, match="code length mismatch: the model expects 48 bits, the input has 32"):
        fused.predict_proba(X[:, :32])
    with pytest.raises(ValueError, match="single class"):
        fit_classifiers(FAST, X[y == 0], y[y == 0])
    with pytest.raises(ValueError, match="0/1"):
        validate_codes(X * 3)
    with pytest.raises(ValueError, match="non-negative"):
        FusedClassifier(list(make_classifiers(FAST).items()), weights=[1, -1, 1]).fit(X, y)


def test_search_returns_the_grid_and_scores(data):
    (X, y), (Xv, yv) = data["train"], data["val"]
    grid = {"svm": {"C": [0.1, 1.0]}, "knn": {"n_neighbors": [1, 9]}, "rf": {"max_depth": [2, None]}}
    params = {**FAST, "grid": grid}
    result = fit_classifiers(params, X, y, Xv, yv, search=True)
    for name in CLASSIFIER_NAMES:
        search = result.searches[name]
        assert len(search.scores) == 2
        assert search.best_score == max(s["val_accuracy"] for s in search.scores)
        best_row = next(s for s in search.scores if s["val_accuracy"] == search.best_score)
        assert {k: best_row[k] for k in search.best_params} == search.best_params
        acc = float(np.mean(result.estimators[name].predict(Xv) == yv))
        assert acc == pytest.approx(search.best_score)


def test_learned_combiners_fit(data):
    (X, y), (Xt, yt) = data["train"], data["test"]
    combiners = fit_learned_combiners(make_classifiers(FAST), X, y, stacking_cv=3)
    assert set(combiners) == {"voting", "stacking"}
    assert combiners["voting"].voting == "soft"
    for name, est in combiners.items():
        assert float(np.mean(est.predict(Xt) == yt)) > 0.55, name
        assert est.predict_proba(Xt).shape == (len(yt), 3)


def test_small_classes_cap_internal_folds():
    X, y = synthetic_codes(60, 5)
    y = y.copy()
    y[:4] = 2
    y[4:] = np.where(y[4:] == 2, 0, y[4:])  # class 2 has exactly 4 rows
    combiners = fit_learned_combiners(make_classifiers({**FAST, "rf": {"n_estimators": 5}}), X, y, stacking_cv=5)
    assert combiners["stacking"].get_params()["cv"] == 4
    assert combiners["stacking"].get_params()["svm__cv"] == 3  # 4 - ceil(4 / 4) rows left in a training fold
    assert limit_cv_to_labels(make_classifiers({"svm": {"cv": 5}})["svm"], y).get_params()["cv"] == 4
