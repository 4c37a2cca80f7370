"""Detection metrics: COCO (pycocotools COCOeval) and FROC sensitivity at fixed false positives per image.

COCO: AP at IoU 0.5 (the paper's mAP), AP over IoU 0.5:0.95, AR with 100 detections, and per-class AP at
0.5. A class with no ground-truth box in the evaluated images has no AP: it is reported as NaN, not 0.

FROC (the mammography convention): class-agnostic, lesion level. Detections of all images are taken in
decreasing score; one that overlaps a not-yet-found lesion (IoU >= ``iou``) finds it, one that overlaps only
already-found lesions is a duplicate and not counted, any other is a false positive. Sensitivity at r FP
per image is the highest fraction of lesions found while FP / images <= r.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from mammo_core.detection import bootstrap

FROC_RATES = (0.5, 1.0, 2.0)


def _to_coco(predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
             n_classes: int) -> tuple[dict, list[dict]]:
    images, annotations, detections = [], [], []
    for i, (pred, gt) in enumerate(zip(predictions, targets, strict=True)):
        images.append({"id": i + 1})
        for box, label in zip(gt["boxes"].tolist(), gt["labels"].tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label),
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist(),
                                     strict=True):
            detections.append({"image_id": i + 1, "category_id": int(label), "score": float(score),
                               "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    dataset = {"images": images, "annotations": annotations,
               "categories": [{"id": k} for k in range(1, n_classes + 1)]}
    return dataset, detections


def coco_metrics(predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
                 classes: Sequence[str]) -> dict:
    """{"map50", "map", "ar100", "per_class_ap50": {class: AP}}; labels are 1-based indices into ``classes``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    nan = float("nan")
    dataset, detections = _to_coco(predictions, targets, len(classes))
    if not dataset["annotations"]:
        return {"map50": nan, "map": nan, "ar100": nan, "per_class_ap50": {c: nan for c in classes}}
    if not detections:
        present = {a["category_id"] for a in dataset["annotations"]}
        return {"map50": 0.0, "map": 0.0, "ar100": 0.0,
                "per_class_ap50": {c: 0.0 if k + 1 in present else nan for k, c in enumerate(classes)}}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # (iou, recall, class, area, maxdets)
    per_class = {}
    for k, name in enumerate(classes):
        p = precision[0, :, k, 0, -1]
        p = p[p > -1]
        per_class[name] = float(p.mean()) if p.size else nan
    stats = [float(s) if s > -1 else nan for s in ev.stats]
    return {"map50": stats[1], "map": stats[0], "ar100": stats[8], "per_class_ap50": per_class}


def class_agnostic(items: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Predictions or targets with every label set to 1: "is there a lesion here", whatever its class.

    Why: AP per class mixes two skills, finding a lesion and naming its type and pathology; the lesion
    AP50 of these relabelled boxes isolates the first (FROC, the mammography convention, is class-agnostic too).
    """
    return [dict(item, labels=torch.ones_like(item["labels"])) for item in items]


def lesion_ap50(predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]) -> float:
    """AP at IoU 0.5 of the :func:`class_agnostic` boxes: how well lesions are found, whatever their class."""
    return coco_metrics(class_agnostic(predictions), class_agnostic(targets), ["lesion"])["map50"]


def froc(predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
         rates: Sequence[float] = FROC_RATES, iou: float = 0.5) -> dict[str, float]:
    """Sensitivity at each rate of false positives per image, keyed ``"0.5"``, ``"1"``, ``"2"``.

    The matching is :func:`mammo_core.detection.bootstrap.froc_outcomes`, the one its bootstrap intervals use.
    """
    keys = [f"{r:g}" for r in rates]
    if len(targets) == 0 or sum(len(t["boxes"]) for t in targets) == 0:
        return {k: float("nan") for k in keys}
    outcomes = bootstrap.froc_outcomes(predictions, targets, iou)
    ones = np.ones((1, len(targets)))
    return {key: float(bootstrap.weighted_froc(outcomes, ones, rate)[0]) for key, rate in zip(keys, rates, strict=True)}


def finite_or_none(value: float) -> float | None:
    """For JSON consumers that reject NaN."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def mean_ignoring_nan(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")
