"""Freeze3 fused with another architecture (paper section 4.7), beside the three-branch fusion.

The paper fuses its best branch (Freeze3) with VGGNet, Inception or ResNet by a weighted sum of
features and finds the three-branch fusion still better. Here both sides use the classifier head the
features stage scores the three-branch fusion with (:func:`mammo_core.codes.fusion.linear_probe`: standardised
features, ridge classifier), fitted on the same rows (the patches' train split), the fusion weight
chosen on validation, scored once on test.

A weighted sum needs the two feature vectors in one space, and two architectures' pooled features are
neither the same width (DenseNet Freeze3: 512, VGG16 pooled: 512, ResNet50 / InceptionV3: 2048) nor
aligned coordinate by coordinate: adding coordinate i of one to coordinate i of the other would mix
unrelated features and lose information (a straw man). So each block is standardised with its
training rows' statistics, scaled by ``1/sqrt(width)`` (the wider network does not dominate by
dimension alone), and mapped isometrically into one common space of ``width_a + width_b`` dimensions by
two fixed, seeded embeddings with orthogonal ranges: ``E_a(x) = R [x, 0]`` and ``E_b(y) = R [0, y]``
with one seeded orthogonal ``R`` (random signs, a random permutation, then the orthonormal DCT: a
random rotation applied in O(D log D), where a dense random orthogonal matrix took seconds to draw).
The fused vector is ``w * E_a(freeze3) + (1 - w) * E_b(other)``. Nothing is lost, and because ``R``
mixes both blocks into every coordinate, the probe's own standardisation cannot undo ``w`` (it would
for a plain concatenation). The weight of Freeze3 is chosen on validation from an
interior grid (0 and 1 would be one network alone; ties go to the most even weight).

Scores: the ridge classifier has no probabilities, so the per-class scores are the softmax of its
decision function (monotone per class: what a one-vs-rest AUC needs; argmax = its prediction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.fft import dct

from mammo_core.baselines import agnet
from mammo_core.baselines.agnet import FeatureSplits
from mammo_core.codes.fusion import linear_probe

WEIGHT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class ProbeOutcome:
    """Test predictions and per-class scores of one fused feature set, with what validation chose."""

    name: str
    test_predictions: np.ndarray  # int64 (N,)
    test_scores: np.ndarray  # float32 (N, C), rows sum to 1
    val_acc: float
    weight: float | None  # Freeze3's weight in the sum (None: the three-branch fusion's own weights)


def class_scores(probe, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Softmax of the probe's decision function, one column per class 0..n_classes-1 (absent ones 0)."""
    decision = np.asarray(probe.decision_function(x), dtype=np.float64)
    if decision.ndim == 1:  # two classes: sklearn returns the score of the second one
        decision = np.stack([-decision, decision], axis=1)
    decision = decision - decision.max(axis=1, keepdims=True)
    exp = np.exp(decision)
    seen = exp / exp.sum(axis=1, keepdims=True)
    out = np.zeros((len(x), n_classes), np.float32)
    out[:, np.asarray(probe.classes_, dtype=np.int64)] = seen
    return out


def standardised(block: FeatureSplits) -> FeatureSplits:
    """:func:`agnet.standardised` in float32 (the fusion mixes the two blocks in one float32 space)."""
    scaled = agnet.standardised(block)
    return FeatureSplits(*(x.astype(np.float32) for x in (scaled.train, scaled.val, scaled.test)))


@dataclass(frozen=True)
class Rotation:
    """A seeded orthogonal map of R^D: random signs, a random permutation, then the orthonormal DCT."""

    signs: np.ndarray
    order: np.ndarray

    @classmethod
    def seeded(cls, dim: int, seed: int = 0) -> Rotation:
        rng = np.random.default_rng(seed)
        return cls(rng.choice(np.array([-1.0, 1.0], np.float32), size=dim), rng.permutation(dim))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return dct((x * self.signs)[:, self.order], norm="ortho", axis=1).astype(np.float32)


def weighted_sum(a: np.ndarray, b: np.ndarray, w: float, rotation: Rotation) -> np.ndarray:
    """``w * E_a(a) + (1 - w) * E_b(b)`` with ``E_a(x) = R [x, 0]``, ``E_b(y) = R [0, y]`` (R linear)."""
    return rotation(np.concatenate([w * a, (1.0 - w) * b], axis=1))


def _check_rows(a: FeatureSplits, b: FeatureSplits) -> None:
    for split in ("train", "val", "test"):
        if len(getattr(a, split)) != len(getattr(b, split)):
            raise ValueError(f"{split}: {len(getattr(a, split))} Freeze3 rows but {len(getattr(b, split))} rows of "
                             f"the other network; both must describe the same patches")


def _fit_and_score(name: str, x: FeatureSplits, y_train: np.ndarray, y_val: np.ndarray, n_classes: int,
                   seed: int, weight: float | None) -> ProbeOutcome:
    probe = linear_probe(x.train, y_train, seed)
    val_acc = float((probe.predict(x.val) == y_val).mean()) if len(y_val) else float("nan")
    scores = class_scores(probe, x.test, n_classes) if len(x.test) else np.zeros((0, n_classes), np.float32)
    return ProbeOutcome(name, scores.argmax(axis=1).astype(np.int64), scores, val_acc, weight)


def fuse_with_freeze3(name: str, freeze3: FeatureSplits, other: FeatureSplits, y_train: np.ndarray,
                      y_val: np.ndarray, n_classes: int, *, grid: Sequence[float] = WEIGHT_GRID,
                      seed: int = 0) -> ProbeOutcome:
    """Weighted sum of Freeze3's and ``other``'s embedded features, the weight chosen on validation."""
    _check_rows(freeze3, other)
    if len(freeze3.train) < 2:
        raise ValueError(f"{name}: {len(freeze3.train)} training rows; the fusion needs at least 2")
    rotation = Rotation.seeded(freeze3.train.shape[1] + other.train.shape[1], seed)
    a, b = standardised(freeze3), standardised(other)
    best: ProbeOutcome | None = None
    for w in sorted(grid, key=lambda v: (abs(v - 0.5), v)):  # ties: the most even weight first
        fused = FeatureSplits(*(weighted_sum(getattr(a, s), getattr(b, s), w, rotation)
                                for s in ("train", "val", "test")))
        outcome = _fit_and_score(name, fused, y_train, y_val, n_classes, seed, float(w))
        if best is None or outcome.val_acc > best.val_acc:
            best = outcome
    if best is None:
        raise ValueError("the weight grid is empty")
    return best


def probe_fused(name: str, fused: FeatureSplits, y_train: np.ndarray, y_val: np.ndarray, n_classes: int,
                seed: int = 0) -> ProbeOutcome:
    """The same head on already fused features (the three-branch fusion, with the features stage's weights)."""
    return _fit_and_score(name, fused, y_train, y_val, n_classes, seed, None)
