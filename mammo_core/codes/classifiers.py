"""Classic classifiers on the binary hash codes and their weighted soft-voting fusion (DESIGN.md §7).

The paper fits an SVM, a kNN and a random forest on the q-bit codes and fuses their class probabilities
by a weighted sum whose weights are chosen on validation. This module builds those estimators from a
params mapping, optionally searches a small grid on validation, fuses them (:class:`FusedClassifier`),
chooses the fusion weights on a grid over the simplex, and builds scikit-learn's learned combiners
(soft ``VotingClassifier`` and ``StackingClassifier``) so the hand-tuned weights face a learned rival.

Why each choice:

- SVM probabilities come from ``CalibratedClassifierCV(SVC(), ensemble=False)``: ``SVC(probability=True)``
  is deprecated in scikit-learn 1.9 and that is the replacement its deprecation message names (one SVC
  fitted on all rows, a sigmoid fitted on out-of-fold decision values).
- kNN uses the Hamming distance, the natural metric on binary codes, with brute force by default: the
  codes are short, and a tree index would add types that skops does not trust by default.
- Codes are unpacked bits, shape (N, q), values 0/1; labels are integers. Every fit validates both
  (:func:`validate_codes`) so a single-class train split or a code length mismatch fails with a clear
  message instead of deep inside scikit-learn.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier, StackingClassifier, VotingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterGrid
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC

from mammo_core.errors import ParamsError

CLASSIFIER_NAMES: tuple[str, ...] = ("svm", "knn", "rf")

DEFAULT_HYPERPARAMS: dict[str, dict[str, Any]] = {
    "svm": {"C": 1.0, "kernel": "rbf", "gamma": "scale", "class_weight": None, "calibration": "sigmoid", "cv": 5},
    "knn": {"n_neighbors": 5, "weights": "distance", "algorithm": "brute"},
    "rf": {"n_estimators": 300, "max_depth": None, "min_samples_leaf": 1, "class_weight": None, "n_jobs": 1},
}

# Small grids for ``search=True``: a handful of fits each, enough to see whether the defaults are far off.
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "svm": {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.01, 0.1]},
    "knn": {"n_neighbors": [3, 5, 9, 15]},
    "rf": {"n_estimators": [100, 300], "max_depth": [None, 12]},
}

_TOP_LEVEL_KEYS = {"seed", "grid", *CLASSIFIER_NAMES}


# --------------------------------------------------------------------------------------------- validation


def validate_codes(codes: np.ndarray, labels: np.ndarray | None = None, *, n_bits: int | None = None) -> np.ndarray:
    """Check a code matrix (and its labels) and return it as uint8.

    Raises ValueError with a plain message for: not 2-D, values other than 0/1, a bit count other than
    ``n_bits`` (the model's code length), labels of another length, or labels with a single class (a
    classifier cannot be fitted on one class, and scikit-learn's own message says so only obliquely).
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D (rows, bits) array, got shape {codes.shape}")
    if n_bits is not None and codes.shape[1] != n_bits:
        raise ValueError(f"code length mismatch: the model expects {n_bits} bits, the input has {codes.shape[1]}")
    if codes.size and not np.isin(codes, (0, 1)).all():
        raise ValueError("codes must be unpacked bits (0/1); binarise at 0.5 before classifying")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (codes.shape[0],):
            raise ValueError(f"labels have shape {labels.shape}, expected ({codes.shape[0]},) to match the codes")
        classes = np.unique(labels)
        if classes.size < 2:
            found = classes.tolist()
            raise ValueError(f"training codes hold a single class {found}: at least two classes are needed")
    return codes.astype(np.uint8, copy=False)


# ----------------------------------------------------------------------------------------------- building


def _hyperparams(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    given = dict(params.get(name) or {})
    unknown = set(given) - set(DEFAULT_HYPERPARAMS[name])
    if unknown:
        raise ParamsError(f"classify.{name}: unknown hyper-parameter(s) {sorted(unknown)}; "
                          f"known: {sorted(DEFAULT_HYPERPARAMS[name])}")
    return {**DEFAULT_HYPERPARAMS[name], **given}


def make_classifier(name: str, hyper: Mapping[str, Any], seed: int = 0) -> BaseEstimator:
    """One unfitted estimator from its full hyper-parameter mapping (defaults already merged)."""
    h = dict(hyper)
    if name == "svm":
        svc = SVC(C=float(h["C"]), kernel=h["kernel"], gamma=h["gamma"], class_weight=h["class_weight"],
                  random_state=seed)
        return CalibratedClassifierCV(svc, method=h["calibration"], cv=int(h["cv"]), ensemble=False)
    if name == "knn":
        return KNeighborsClassifier(n_neighbors=int(h["n_neighbors"]), weights=h["weights"],
                                    algorithm=h["algorithm"], metric="hamming")
    if name == "rf":
        return RandomForestClassifier(n_estimators=int(h["n_estimators"]), max_depth=h["max_depth"],
                                      min_samples_leaf=int(h["min_samples_leaf"]),
                                      class_weight=h["class_weight"], n_jobs=h["n_jobs"], random_state=seed)
    raise ParamsError(f"classify: unknown classifier {name!r}; known: {list(CLASSIFIER_NAMES)}")


def make_classifiers(params: Mapping[str, Any] | None = None) -> dict[str, BaseEstimator]:
    """``{"svm", "knn", "rf"} -> unfitted estimator`` from the classify params section.

    ``params`` may hold ``seed`` and one mapping per classifier overriding :data:`DEFAULT_HYPERPARAMS`
    (and ``grid``, used only by :func:`fit_classifiers`); unknown keys raise :class:`ParamsError`.
    """
    params = dict(params or {})
    unknown = set(params) - _TOP_LEVEL_KEYS
    if unknown:
        raise ParamsError(f"classify: unknown key(s) {sorted(unknown)}; known: {sorted(_TOP_LEVEL_KEYS)}")
    seed = int(params.get("seed", 0))
    return {name: make_classifier(name, _hyperparams(params, name), seed) for name in CLASSIFIER_NAMES}


def limit_cv_to_labels(estimator: BaseEstimator, y: np.ndarray) -> BaseEstimator:
    """Return a clone whose internal stratified folds fit the rarest class of ``y``.

    Stratified k-fold needs at least k rows of every class; on a small (smoke) split the default 5 folds
    of the SVM calibration or the stacking would fail. Outer ``cv`` is capped at the rarest class count;
    a ``cv`` nested inside a stacking member sees only (k-1)/k of the rows, so it is capped accordingly.
    """
    counts = np.unique(np.asarray(y), return_counts=True)[1]
    rarest = int(counts.min())
    if rarest < 2:
        raise ValueError(f"a class has only {rarest} training row: at least 2 per class are needed")
    est = clone(estimator)
    all_params = est.get_params(deep=True)
    outer = all_params.get("cv")
    updates: dict[str, int] = {}
    if isinstance(outer, int):
        updates["cv"] = min(outer, rarest)
    outer_k = updates.get("cv")
    inner_limit = max(2, rarest - math.ceil(rarest / outer_k)) if outer_k else rarest
    for key, value in all_params.items():
        if key.endswith("__cv") and isinstance(value, int) and not isinstance(value, bool):
            updates[key] = min(value, inner_limit)
    if updates:
        est.set_params(**updates)
    return est


# ------------------------------------------------------------------------------------------------ fitting


@dataclass
class SearchResult:
    """A validation grid search of one classifier: every point tried and its validation accuracy."""

    name: str
    best_params: dict[str, Any]
    best_score: float
    scores: list[dict[str, Any]] = field(default_factory=list)  # [{**point, "val_accuracy": float}, ...]


@dataclass
class FittedClassifiers:
    """The fitted estimators by name, and the grid searches that chose them (empty without search)."""

    estimators: dict[str, BaseEstimator]
    searches: dict[str, SearchResult] = field(default_factory=dict)


def search_classifier(name: str, hyper: Mapping[str, Any], grid: Mapping[str, Sequence[Any]],
                      X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                      seed: int = 0) -> tuple[BaseEstimator, SearchResult]:
    """Fit every grid point on train, score accuracy on validation, keep the best (first on ties).

    A plain loop rather than ``GridSearchCV``: the split is fixed (train/validation, never the test) and
    the winner stays fitted on train only, so validation remains untouched for the fusion weights.
    """
    best: tuple[float, BaseEstimator | None, dict[str, Any]] = (-1.0, None, {})
    scores: list[dict[str, Any]] = []
    for point in ParameterGrid({k: list(v) for k, v in grid.items()}):
        unknown = set(point) - set(DEFAULT_HYPERPARAMS[name])
        if unknown:
            raise ParamsError(f"classify.grid.{name}: unknown hyper-parameter(s) {sorted(unknown)}")
        est = limit_cv_to_labels(make_classifier(name, {**hyper, **point}, seed), y_train).fit(X_train, y_train)
        score = float(np.mean(est.predict(X_val) == y_val))
        scores.append({**point, "val_accuracy": score})
        if score > best[0]:
            best = (score, est, dict(point))
    assert best[1] is not None, "empty grid"
    return best[1], SearchResult(name=name, best_params=best[2], best_score=best[0], scores=scores)


def fit_classifiers(params: Mapping[str, Any] | None, X_train: np.ndarray, y_train: np.ndarray,
                    X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                    search: bool = False) -> FittedClassifiers:
    """Fit SVM, kNN and RF on the train codes; with ``search`` pick each one's grid point on validation.

    Grids come from ``params["grid"][name]`` when given, else :data:`DEFAULT_GRIDS`.
    """
    params = dict(params or {})
    make_classifiers(params)  # validates the keys before any fit
    X_train = validate_codes(X_train, y_train)
    y_train = np.asarray(y_train)
    seed = int(params.get("seed", 0))
    if not search:
        fitted = {name: limit_cv_to_labels(est, y_train).fit(X_train, y_train)
                  for name, est in make_classifiers(params).items()}
        return FittedClassifiers(estimators=fitted)
    if X_val is None or y_val is None:
        raise ValueError("search=True needs validation codes and labels")
    X_val = validate_codes(X_val, n_bits=X_train.shape[1])
    grids = {**DEFAULT_GRIDS, **dict(params.get("grid") or {})}
    fitted, searches = {}, {}
    for name in CLASSIFIER_NAMES:
        fitted[name], searches[name] = search_classifier(name, _hyperparams(params, name), grids[name],
                                                         X_train, y_train, X_val, np.asarray(y_val), seed)
    return FittedClassifiers(estimators=fitted, searches=searches)


# ------------------------------------------------------------------------------------------------- fusion


def align_proba(proba: np.ndarray, model_classes: Sequence[Any], classes: Sequence[Any]) -> np.ndarray:
    """Place a model's probability columns on the common class list (absent classes get probability 0).

    A model whose training data lacked a class has no column for it; summing unaligned columns would
    silently mix classes.
    """
    classes = np.asarray(classes)
    out = np.zeros((proba.shape[0], classes.size), dtype=np.float64)
    index = {c: i for i, c in enumerate(classes.tolist())}
    for j, c in enumerate(np.asarray(model_classes).tolist()):
        if c not in index:
            raise ValueError(f"model class {c!r} is not in the common class list {classes.tolist()}")
        out[:, index[c]] = proba[:, j]
    return out


def _normalised_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{w.size} fusion weights for {n} estimators")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"fusion weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


class FusedClassifier(ClassifierMixin, BaseEstimator):
    """Weighted soft voting: ``predict_proba`` is the weighted sum of the members' aligned probabilities.

    ``estimators`` is a list of ``(name, estimator)``; ``weights`` (normalised to sum 1) default to uniform;
    ``classes`` is the common class list (default: the union of the members' classes after fitting).
    ``fit`` fits clones of the members; :meth:`from_fitted` wraps members already fitted (the usual path:
    the same fitted models are measured alone and fused). Plain attributes only, so skops can persist it.
    """

    def __init__(self, estimators: list[tuple[str, Any]], weights: Sequence[float] | None = None,
                 classes: Sequence[Any] | None = None):
        self.estimators = estimators
        self.weights = weights
        self.classes = classes

    def fit(self, X: np.ndarray, y: np.ndarray) -> FusedClassifier:
        X = validate_codes(X, y)
        fitted = [(name, limit_cv_to_labels(est, y).fit(X, y)) for name, est in self.estimators]
        return self._set_fitted(fitted, X.shape[1])

    @classmethod
    def from_fitted(cls, estimators: Mapping[str, Any] | list[tuple[str, Any]],
                    weights: Sequence[float] | Mapping[str, float] | None = None,
                    classes: Sequence[Any] | None = None) -> FusedClassifier:
        """Fuse members that are already fitted; ``weights`` may be a ``name -> weight`` mapping."""
        members = list(estimators.items()) if isinstance(estimators, Mapping) else list(estimators)
        if isinstance(weights, Mapping):
            missing = {n for n, _ in members} - set(weights)
            if missing:
                raise ValueError(f"no fusion weight for {sorted(missing)}")
            weights = [float(weights[n]) for n, _ in members]
        fused = cls(members, weights=None if weights is None else list(weights), classes=classes)
        n_features = {int(est.n_features_in_) for _, est in members}
        if len(n_features) != 1:
            raise ValueError(f"members were fitted on different code lengths {sorted(n_features)}")
        return fused._set_fitted(members, n_features.pop())

    def _set_fitted(self, fitted: list[tuple[str, Any]], n_features: int) -> FusedClassifier:
        self.estimators_ = fitted
        self.weights_ = _normalised_weights(self.weights, len(fitted))
        if self.classes is not None:
            self.classes_ = np.asarray(self.classes)
        else:
            self.classes_ = np.unique(np.concatenate([np.asarray(est.classes_) for _, est in fitted]))
        self.n_features_in_ = int(n_features)
        return self

    def member_probas(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Each member's probabilities aligned on ``classes_`` (what the fusion sums)."""
        X = validate_codes(X, n_bits=self.n_features_in_)
        return {name: align_proba(est.predict_proba(X), est.classes_, self.classes_) for name, est in self.estimators_}

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        probas = self.member_probas(X)
        return sum(w * p for w, p in zip(self.weights_, probas.values(), strict=True))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


# ------------------------------------------------------------------------------------ fusion weight choice


@dataclass
class FusionWeights:
    """The chosen weights (name -> weight, sum 1), their validation accuracy, and every grid point scored."""

    weights: dict[str, float]
    val_accuracy: float
    grid: list[dict[str, float]]  # [{name: weight, ..., "val_accuracy": acc}, ...]


def simplex_grid(n: int, step: float) -> np.ndarray:
    """All weight vectors of length ``n`` with entries in multiples of ``step`` summing to 1 (vertices included)."""
    units = round(1.0 / step)
    if units < 1 or not np.isclose(units * step, 1.0):
        raise ValueError(f"grid_step must divide 1 evenly (e.g. 0.1, 0.05), got {step}")
    points = [c for c in itertools.product(range(units + 1), repeat=n) if sum(c) == units]
    return np.asarray(points, dtype=np.float64) / units


def choose_fusion_weights(probas_val: Mapping[str, np.ndarray], y_val: np.ndarray, grid_step: float = 0.1,
                          classes: Sequence[Any] | None = None) -> FusionWeights:
    """Best weights on the simplex by validation accuracy of the fused argmax.

    ``probas_val`` maps each member to its validation probabilities, all aligned on the same class list
    ``classes`` (default ``0..K-1``). Every grid point is scored; the vertices are the single models, so
    the chosen fusion is never worse on validation than the best single member. Ties in accuracy go to
    the most uniform point (smallest squared distance to equal weights): when the data cannot tell
    points apart, spreading the weight is the assumption that bets least on one model; remaining ties go
    to the first point in enumeration order, so the choice is deterministic.
    """
    names = list(probas_val)
    stack = np.stack([np.asarray(probas_val[n], dtype=np.float64) for n in names])  # (M, N, K)
    if stack.ndim != 3:
        raise ValueError("each validation probability array must be (rows, classes)")
    y_val = np.asarray(y_val)
    class_list = np.arange(stack.shape[2]) if classes is None else np.asarray(classes)
    grid = simplex_grid(len(names), grid_step)
    fused = np.einsum("gm,mnk->gnk", grid, stack)
    accuracy = (class_list[np.argmax(fused, axis=2)] == y_val[None, :]).mean(axis=1)
    spread = ((grid - 1.0 / len(names)) ** 2).sum(axis=1)
    best = np.lexsort((np.arange(len(grid)), spread, -np.round(accuracy, 12)))[0]
    table = [{**{n: float(w) for n, w in zip(names, point, strict=True)}, "val_accuracy": float(acc)}
             for point, acc in zip(grid, accuracy, strict=True)]
    return FusionWeights(weights={n: float(w) for n, w in zip(names, grid[best], strict=True)},
                         val_accuracy=float(accuracy[best]), grid=table)


# -------------------------------------------------------------------------------------- learned combiners


def make_learned_combiners(estimators: Mapping[str, BaseEstimator], seed: int = 0,
                           stacking_cv: int = 5) -> dict[str, BaseEstimator]:
    """Unfitted ``voting`` (soft, equal weights) and ``stacking`` (logistic regression on probabilities).

    They are fitted on the same train codes as the members (:func:`fit_learned_combiners`). Voting uses
    equal weights on purpose: with the tuned weights it would merely re-fit our own fusion.
    """
    members = [(name, clone(est)) for name, est in estimators.items()]
    return {
        "voting": VotingClassifier(members, voting="soft"),
        "stacking": StackingClassifier(members, final_estimator=LogisticRegression(max_iter=1000, random_state=seed),
                                       stack_method="predict_proba", cv=stacking_cv),
    }


def fit_learned_combiners(estimators: Mapping[str, BaseEstimator], X_train: np.ndarray, y_train: np.ndarray,
                          seed: int = 0, stacking_cv: int = 5) -> dict[str, BaseEstimator]:
    """Fit the voting and stacking combiners on the train codes (folds capped to the rarest class)."""
    X_train = validate_codes(X_train, y_train)
    return {name: limit_cv_to_labels(est, y_train).fit(X_train, y_train)
            for name, est in make_learned_combiners(estimators, seed, stacking_cv).items()}
