"""An AGNet-style baseline (the paper's Table 1 row): features of two different architectures, fused.

AGNet fuses an AlexNet and a GoogLeNet trained on the same task, so the classifier sees two kinds of
features. Here the two networks are two of the trained single-network baselines (by default VGG16 and
InceptionV3, the closest of ours to AlexNet and GoogLeNet): their pooled penultimate features (the
inputs of their heads, best-validation weights, eval mode) are standardised per network with the
training set's mean and std, each block is scaled by ``1/sqrt(its width)`` so that the wider network
does not dominate by dimension alone, the two blocks are concatenated, and a multinomial logistic
regression is fitted on the training set. Its inverse regularisation ``C`` is picked on the validation
set from ``c_grid`` (ties: the smaller C, the simpler model).

Why a linear classifier on frozen features: it measures what the two feature sets carry together
without a second round of fine-tuning, the same way the fused DenseNet features are probed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression


@dataclass(frozen=True)
class FeatureSplits:
    """One network's pooled features for the train, val and test patches."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class AgnetResult:
    test_predictions: np.ndarray
    test_probabilities: np.ndarray
    chosen_c: float
    val_acc: float
    networks: tuple[str, str]

    def detail(self) -> str:
        a, b = self.networks
        return (f"pooled features of trained {a} + {b}, standardised, concatenated; logistic regression "
                f"C={self.chosen_c:g} chosen on validation (val acc {self.val_acc:.3f})")


def standardised(block: FeatureSplits) -> FeatureSplits:
    """Training-row standardisation, scaled by ``1/sqrt(width)`` so each block has unit total variance.

    Shared by AGNet's concatenation and the Freeze3 + X fusion: neither block may dominate by its width.
    """
    mean = block.train.mean(axis=0)
    std = block.train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)  # a constant feature carries nothing; keep it at zero
    scale = 1.0 / np.sqrt(block.train.shape[1])

    def f(x: np.ndarray) -> np.ndarray:
        return (x - mean) / std * scale

    return FeatureSplits(f(block.train), f(block.val), f(block.test))


def fuse_features(a: FeatureSplits, b: FeatureSplits) -> FeatureSplits:
    """Per-network standardised, width-balanced blocks, concatenated (train statistics only)."""
    for name in ("train", "val", "test"):
        if len(getattr(a, name)) != len(getattr(b, name)):
            raise ValueError(f"{name}: the two networks' features have {len(getattr(a, name))} and "
                             f"{len(getattr(b, name))} rows; they must describe the same patches")
    sa, sb = standardised(a), standardised(b)
    return FeatureSplits(*(np.concatenate([getattr(sa, n), getattr(sb, n)], axis=1) for n in ("train", "val", "test")))


def agnet_fusion(a: FeatureSplits, b: FeatureSplits, y_train: np.ndarray, y_val: np.ndarray,
                 networks: tuple[str, str], *, c_grid: Sequence[float] = (0.1, 1.0, 10.0),
                 seed: int = 0) -> AgnetResult:
    """Fit the fused classifier; returns test predictions and probabilities (columns = sorted train labels)."""
    if networks[0] == networks[1]:
        raise ValueError(f"AGNet fuses two different architectures, got {networks[0]!r} twice")
    fused = fuse_features(a, b)
    best: tuple[float, float, LogisticRegression] | None = None
    for c in sorted(c_grid):
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(fused.train, y_train)
        acc = float((clf.predict(fused.val) == y_val).mean()) if len(y_val) else float("nan")
        if best is None or acc > best[1]:
            best = (c, acc, clf)
    assert best is not None, "c_grid is empty"
    c, acc, clf = best
    return AgnetResult(clf.predict(fused.test).astype(np.int64), clf.predict_proba(fused.test).astype(np.float32),
                       c, acc, networks)
