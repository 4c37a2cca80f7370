"""Detection figures: lesion-size distribution and predicted-vs-true boxes (matplotlib, Agg, atomic writes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import Tensor  # noqa: E402

from mammo_core.evaluation.figures import save_figure  # noqa: E402


def lesion_sizes_figure(sizes: np.ndarray, anchor_sizes: Sequence[int], path: Path) -> Path:
    """Histogram of lesion box sizes (sqrt of area, detector-input pixels) with the anchor sizes marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(sizes):
        ax.hist(sizes, bins=min(30, max(5, len(sizes) // 3)), color="#4c72b0")
    for s in anchor_sizes:
        ax.axvline(s, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_xlabel("lesion box size, sqrt(w*h) in detector-input pixels (dashed: anchor sizes)")
    ax.set_ylabel("lesions")
    ax.set_title(f"Lesion sizes (n={len(sizes)})")
    return save_figure(fig, path)


def example_figure(image: Tensor, truth: Mapping[str, Tensor], predicted: Mapping[str, Tensor],
                   classes: Sequence[str], path: Path, min_score: float = 0.3) -> Path:
    """The detector input with true boxes (green) and predictions scoring >= ``min_score`` (red, class:score)."""
    fig, ax = plt.subplots(figsize=(4, 6))
    ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
    for box, label in zip(truth["boxes"].tolist(), truth["labels"].tolist(), strict=True):
        ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, color="#55a868"))
        ax.text(box[0], box[3] + 2, classes[label - 1], color="#55a868", fontsize=6, va="top")
    for box, label, score in zip(predicted["boxes"].tolist(), predicted["labels"].tolist(),
                                 predicted["scores"].tolist(), strict=True):
        if score < min_score:
            continue
        ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, color="#c44e52"))
        ax.text(box[0], box[1] - 2, f"{classes[label - 1]}:{score:.2f}", color="#c44e52", fontsize=6)
    ax.set_axis_off()
    ax.set_title("green: truth, red: predicted", fontsize=8)
    return save_figure(fig, path)
