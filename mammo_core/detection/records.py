"""Per-image detections and ground truth of a split as tables: what Table 8's intervals, the paired detector
verdict, ``mammo promote`` (validation) and ``mammo compare`` (test) are computed from.

Why tables: an interval or a paired comparison (two detectors of one run, or two runs) must be recomputable
from what the stage sealed, not from memory of the run. Images are numbered by their position in the split
and patients by an ordinal (``group``); to pair two runs image by image, the image table also holds
``image_key``/``patient_key``, short sha256 digests of the curated ids
(:func:`mammo_core.detection.data.pseudonym`), never an id itself: CBIS image ids carry patient ids.
Three files per split (``<split>_detections.parquet``, ``<split>_truth.parquet``, ``<split>_images.parquet``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mammo_core.detection.data import DetectionImage
from mammo_core.evaluation.paired_bootstrap import NotPaired
from mammo_core.storage import stage_files
from mammo_core.storage.durable import atomic_path

BOX_COLUMNS = ["x0", "y0", "x1", "y1"]
DETECTION_COLUMNS = ["model", "split", "image", *BOX_COLUMNS, "score", "label"]
TRUTH_COLUMNS = ["split", "image", "group", *BOX_COLUMNS, "label"]
IMAGE_COLUMNS = ["split", "image", "group", "image_key", "patient_key"]


def split_files(split: str) -> tuple[str, str, str]:
    """(detections, truth, images) file names of one split in the detect stage folder."""
    return stage_files.DETECT.split_files(split)


def detections_frame(predictions: Mapping[str, Sequence[Mapping[str, Tensor]]], split: str = "test"
                     ) -> pd.DataFrame:
    """One row per detection of every model: model, split, image position, box, score, 1-based label."""
    parts = []
    for model, per_image in predictions.items():
        for image, pred in enumerate(per_image):
            n = len(pred["scores"])
            boxes = pred["boxes"].reshape(-1, 4).double().numpy()
            parts.append(pd.DataFrame({"model": [model] * n, "split": [split] * n,
                                       "image": np.full(n, image, dtype=np.int64),
                                       **{c: boxes[:, k] for k, c in enumerate(BOX_COLUMNS)},
                                       "score": pred["scores"].double().numpy(),
                                       "label": pred["labels"].numpy().astype(np.int64)}))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=DETECTION_COLUMNS)
    return frame[DETECTION_COLUMNS]


def truth_frames(items: Sequence[DetectionImage], split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(boxes: one row per ground-truth box, images: one row per image with its patient ordinal and keys)."""
    groups = [item.group if item.group is not None else -1 - k for k, item in enumerate(items)]
    rows = [{"split": split, "image": k, "group": groups[k], **dict(zip(BOX_COLUMNS, box, strict=True)),
             "label": int(label)}
            for k, item in enumerate(items)
            for box, label in zip(item.boxes.tolist(), item.labels.tolist(), strict=True)]
    return (pd.DataFrame(rows, columns=TRUTH_COLUMNS),
            pd.DataFrame({"split": [split] * len(items), "image": np.arange(len(items), dtype=np.int64),
                          "group": np.asarray(groups, np.int64),
                          "image_key": [item.image_key for item in items],
                          "patient_key": [item.patient_key for item in items]}, columns=IMAGE_COLUMNS))


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


def write_split(folder: Path, split: str, predictions: Mapping[str, Sequence[Mapping[str, Tensor]]],
                items: Sequence[DetectionImage]) -> list[Path]:
    """The three tables of ``split`` (every model's detections, the truth, the images) in ``folder``."""
    truth, images = truth_frames(items, split)
    names = split_files(split)
    return [write_parquet_atomic(frame, folder / name)
            for frame, name in zip((detections_frame(predictions, split), truth, images), names, strict=True)]


@dataclass(frozen=True)
class SplitRecords:
    """One split's saved detections read back: per model, per image (position order), with truth and keys."""

    split: str
    predictions: dict[str, list[dict[str, Tensor]]]
    targets: list[dict[str, Tensor]]
    groups: np.ndarray  # patient ordinal per image
    image_keys: list[str | None]
    patient_keys: list[str | None]


def read_split(folder: Path, split: str, models: Sequence[str] | None = None) -> SplitRecords:
    """:func:`read_back` of ``split``'s three tables in ``folder`` (``models``: None reads every model saved).

    FileNotFoundError names the missing file (a stage folder of an older version saved test tables only).
    """
    paths = [Path(folder) / name for name in split_files(split)]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in the detect stage folder {folder} (made by a version "
                                    f"that did not save {split} detections?)")
    detections, truth, images = (pd.read_parquet(p) for p in paths)
    names = list(models) if models is not None else list(dict.fromkeys(detections["model"]))
    predictions, targets, groups = read_back(detections, truth, images, names)
    order = images.sort_values("image")
    keys = {c: [None if pd.isna(v) else str(v) for v in order[c]] if c in order.columns else [None] * len(order)
            for c in ("image_key", "patient_key")}
    return SplitRecords(split, predictions, targets, groups, keys["image_key"], keys["patient_key"])


def _same_truth(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return (a["boxes"].shape == b["boxes"].shape and torch.allclose(a["boxes"], b["boxes"], atol=1e-3)
            and torch.equal(a["labels"], b["labels"]))


def paired_records(a: SplitRecords, model_a: str, b: SplitRecords, model_b: str
                   ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]], list[dict[str, Tensor]], list[str]]:
    """(A's predictions, B's predictions in A's image order, the shared targets, patient per image).

    Images are matched on ``image_key``; :class:`~mammo_core.evaluation.paired_bootstrap.NotPaired` when a table has no
    keys, the two cover different images, disagree on an image's boxes or patient, or lack the model.
    """
    for name, rec, model in (("A", a, model_a), ("B", b, model_b)):
        if model not in rec.predictions:
            raise NotPaired(f"{name} has no {rec.split} detections of {model!r}")
        if any(k is None for k in rec.image_keys) or len(set(rec.image_keys)) != len(rec.image_keys):
            raise NotPaired(f"the {rec.split} images of {name} carry no unique image keys (an older detect stage)")
    position = {k: i for i, k in enumerate(b.image_keys)}
    only_a = [k for k in a.image_keys if k not in position]
    only_b = set(b.image_keys) - set(a.image_keys)
    if only_a or only_b:
        raise NotPaired(f"the {a.split} splits differ: {len(only_a)} image(s) only in A, {len(only_b)} only in B")
    order = [position[k] for k in a.image_keys]
    if any(a.patient_keys[i] != b.patient_keys[j] for i, j in enumerate(order)):
        raise NotPaired(f"the {a.split} splits disagree on the patient of some images")
    if not all(_same_truth(a.targets[i], b.targets[j]) for i, j in enumerate(order)):
        raise NotPaired(f"the {a.split} splits disagree on the ground-truth boxes of some images "
                        "(another detector input size or class scheme?)")
    patients = [p if p is not None else f"group-{g}" for p, g in zip(a.patient_keys, a.groups.tolist(), strict=True)]
    return (a.predictions[model_a], [b.predictions[model_b][j] for j in order], a.targets, patients)
