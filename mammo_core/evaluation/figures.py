"""Figures shared by stages and the report: confusion matrices and validation curves (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mammo_core.storage.durable import atomic_path


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write a figure atomically (temporary sibling, then rename) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def confusion_matrix_figure(confusion: np.ndarray, class_names: Sequence[str], title: str, path: Path) -> Path:
    """Counts with row-normalised colour (recall per true class), so small classes stay readable."""
    confusion = np.asarray(confusion)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.7 * n))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=8)
    ax.set_xticks(range(n), [c.replace("_", "\n") for c in class_names], fontsize=6)
    ax.set_yticks(range(n), class_names, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def curves_figure(
    curves: Mapping[str, Sequence[float]], title: str, path: Path, ylabel: str = "validation accuracy"
) -> Path:
    """One line per series (e.g. per branch), x = epoch (1-based)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def series_figure(
    series: Mapping[str, Sequence[float]], x: Sequence[float], title: str, path: Path, xlabel: str, ylabel: str
) -> Path:
    """One line per series over shared x values (e.g. MAP by code length)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in series.items():
        ax.plot(list(x), list(values), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
