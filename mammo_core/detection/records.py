"""Per-image test detections and ground truth as tables: the artifact Table 8's intervals are computed from.

Why tables: an interval (or a later paired comparison of two runs) must be recomputable from what the
stage sealed, not from memory of the run. Images are named by their position in the test split and
patients by an ordinal (``group``), never by an id: CBIS image ids carry patient ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mammo_core.detection.data import DetectionImage
from mammo_core.storage.durable import atomic_path

BOX_COLUMNS = ["x0", "y0", "x1", "y1"]
DETECTION_COLUMNS = ["model", "image", *BOX_COLUMNS, "score", "label"]
TRUTH_COLUMNS = ["image", "group", *BOX_COLUMNS, "label"]
IMAGE_COLUMNS = ["image", "group"]


def detections_frame(predictions: Mapping[str, Sequence[Mapping[str, Tensor]]]) -> pd.DataFrame:
    """One row per detection of every model: model, test image position, box, score, 1-based label."""
    parts = []
    for model, per_image in predictions.items():
        for image, pred in enumerate(per_image):
            n = len(pred["scores"])
            boxes = pred["boxes"].reshape(-1, 4).double().numpy()
            parts.append(pd.DataFrame({"model": [model] * n, "image": np.full(n, image, dtype=np.int64),
                                       **{c: boxes[:, k] for k, c in enumerate(BOX_COLUMNS)},
                                       "score": pred["scores"].double().numpy(),
                                       "label": pred["labels"].numpy().astype(np.int64)}))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=DETECTION_COLUMNS)
    return frame[DETECTION_COLUMNS]


def truth_frames(items: Sequence[DetectionImage]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(boxes: one row per ground-truth box, images: one row per test image with its patient ordinal)."""
    groups = [item.group if item.group is not None else -1 - k for k, item in enumerate(items)]
    rows = [{"image": k, "group": groups[k], **dict(zip(BOX_COLUMNS, box, strict=True)), "label": int(label)}
            for k, item in enumerate(items)
            for box, label in zip(item.boxes.tolist(), item.labels.tolist(), strict=True)]
    return (pd.DataFrame(rows, columns=TRUTH_COLUMNS),
            pd.DataFrame({"image": np.arange(len(items), dtype=np.int64), "group": np.asarray(groups, np.int64)}))


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def read_back(detections: pd.DataFrame, truth: pd.DataFrame, images: pd.DataFrame, models: Sequence[str]
              ) -> tuple[dict[str, list[dict[str, Tensor]]], list[dict[str, Tensor]], np.ndarray]:
    """(predictions of each of ``models``, targets, patient ordinal per image) from the three tables.

    A model without a row made no detection on any image (it gets empty predictions).
    """
    n_images = len(images)
    order = images.sort_values("image")
    if order["image"].tolist() != list(range(n_images)):
        raise ValueError("test image table must number its images 0..n-1")

    def boxes_of(frame: pd.DataFrame, image: int) -> pd.DataFrame:
        return frame[frame["image"] == image]

    targets = []
    for image in range(n_images):
        rows = boxes_of(truth, image)
        targets.append({"boxes": torch.tensor(rows[BOX_COLUMNS].to_numpy(np.float32)).reshape(-1, 4),
                        "labels": torch.tensor(rows["label"].to_numpy(np.int64))})
    predictions: dict[str, list[dict[str, Tensor]]] = {}
    for model in models:
        frame = detections[detections["model"] == model]
        predictions[model] = [
            {"boxes": torch.tensor(rows[BOX_COLUMNS].to_numpy(np.float32)).reshape(-1, 4),
             "scores": torch.tensor(rows["score"].to_numpy(np.float32)),
             "labels": torch.tensor(rows["label"].to_numpy(np.int64))}
            for rows in (boxes_of(frame, image) for image in range(n_images))]
    return predictions, targets, order["group"].to_numpy()
