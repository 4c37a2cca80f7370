"""95 % bootstrap intervals of the detection metrics (AP50, lesion AP50, FROC) over test images.

Why a bootstrap over images (grouped by patient when the caller knows the patients): a test split of a few
dozen mammograms gives AP values that move by several points when a handful of images change, so a
detector row without an interval cannot say whether it beats another. Each resample draws the groups with
replacement (:func:`mammo_core.evaluation.metrics.patient_bootstrap_weights`, the classification tables' resampler) and
recomputes the metric on the drawn images; the percentile interval of those values is reported.

Why not call pycocotools on every resample: one COCOeval call costs a fraction of a second, times three
metrics, three detectors and a thousand resamples. Matching a detection to a box depends on its own image
only, so it is done once per image (:func:`ap_outcomes`, :func:`froc_outcomes`); a resample only changes how
often each image counts, i.e. a weight per detection, and every resample's precision/recall curve is one
weighted cumulative sum. With all weights 1 the AP equals pycocotools' AP at IoU 0.5 (101-point
interpolation, at most 100 detections per image and class; tested against COCOeval) and the FROC equals
:func:`mammo_core.detection.evaluate.froc` (which uses the same outcomes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor
from torchvision.ops import box_iou

from mammo_core.evaluation.metrics import patient_bootstrap_weights
from mammo_core.evaluation.paired_bootstrap import NotPaired, PairedDifference

RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recThrs
TRUE_POSITIVE, DUPLICATE, FALSE_POSITIVE = 1, 0, -1


@dataclass(frozen=True)
class Outcomes:
    """Per-detection results in the order the metric ranks them, and per-image truth counts.

    ``image``: the image each detection belongs to; ``outcome``: TRUE_POSITIVE, DUPLICATE (a second hit on
    an already found box: ignored) or FALSE_POSITIVE; ``truth``: ground-truth boxes per image.
    """

    image: np.ndarray
    outcome: np.ndarray
    truth: np.ndarray


def _match_greedy(ious: np.ndarray, iou: float, coco_ties: bool) -> np.ndarray:
    """Outcome of each detection (rows, already in score order) against the boxes (columns).

    COCO's rule (``coco_ties``): the unmatched box of highest IoU >= ``iou`` (the later box on an exact tie);
    a detection whose only overlaps are matched boxes is a false positive. FROC's rule: the same choice
    among unmatched boxes, but such a detection is a duplicate, not counted.
    """
    n_det, n_box = ious.shape
    found = np.zeros(n_box, dtype=bool)
    out = np.full(n_det, FALSE_POSITIVE, dtype=np.int8)
    for d in range(n_det):
        best, threshold = -1, min(iou, 1 - 1e-10)
        for g in range(n_box):
            if found[g] or ious[d, g] < threshold:
                continue
            if coco_ties or best < 0 or ious[d, g] > ious[d, best]:
                best, threshold = g, (ious[d, g] if coco_ties else threshold)
        if best >= 0:
            found[best] = True
            out[d] = TRUE_POSITIVE
        elif not coco_ties and n_box and (ious[d] >= iou).any():
            out[d] = DUPLICATE
    return out


def _ious(pred_boxes: Tensor, true_boxes: Tensor) -> np.ndarray:
    if len(pred_boxes) and len(true_boxes):
        return box_iou(pred_boxes.float(), true_boxes.float()).numpy().astype(np.float64)
    return np.zeros((len(pred_boxes), len(true_boxes)))


def ap_outcomes(predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]], label: int,
                iou: float = 0.5, max_dets: int = 100) -> tuple[Outcomes, np.ndarray]:
    """COCO's matching of class ``label`` at IoU ``iou``: (outcomes, scores), ranked as COCOeval ranks them.

    Per image: that class's detections by decreasing score (stable), the first ``max_dets`` kept; then all
    images' detections in image order, sorted by decreasing score with a stable sort.
    """
    images, outcomes, scores, truth = [], [], [], []
    for i, (pred, gt) in enumerate(zip(predictions, targets, strict=True)):
        gt_boxes = gt["boxes"][gt["labels"] == label]
        truth.append(len(gt_boxes))
        mine = pred["labels"] == label
        s = pred["scores"][mine].numpy().astype(np.float64)
        order = np.argsort(-s, kind="mergesort")[:max_dets]
        boxes = pred["boxes"][mine][order]
        outcomes.append(_match_greedy(_ious(boxes, gt_boxes), iou, coco_ties=True))
        scores.append(s[order])
        images.append(np.full(len(order), i))
    flat_scores = np.concatenate(scores) if scores else np.zeros(0)
    rank = np.argsort(-flat_scores, kind="mergesort")
    return (Outcomes(np.concatenate(images).astype(np.int64)[rank] if images else np.zeros(0, np.int64),
                     np.concatenate(outcomes)[rank] if outcomes else np.zeros(0, np.int8),
                     np.asarray(truth, dtype=np.float64)), flat_scores[rank])


def froc_outcomes(predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
                  iou: float = 0.5) -> Outcomes:
    """Class-agnostic lesion-level matching, all images' detections by decreasing score (ties: image, index)."""
    entries, per_image, truth = [], [], []
    for i, (pred, gt) in enumerate(zip(predictions, targets, strict=True)):
        truth.append(len(gt["boxes"]))
        s = pred["scores"].numpy().astype(np.float64)
        order = np.lexsort((np.arange(len(s)), -s))
        per_image.append(_match_greedy(_ious(pred["boxes"][order], gt["boxes"]), iou, coco_ties=False))
        entries += [(-float(s[j]), i, int(j), k) for k, j in enumerate(order)]
    entries.sort()
    return Outcomes(np.asarray([e[1] for e in entries], dtype=np.int64),
                    np.asarray([per_image[e[1]][e[3]] for e in entries], dtype=np.int8),
                    np.asarray(truth, dtype=np.float64))


def weighted_ap(outcomes: Outcomes, weights: np.ndarray) -> np.ndarray:
    """AP (101-point interpolated, COCO) for each row of image ``weights`` (n_rows, n_images); NaN without truth."""
    weights = np.atleast_2d(weights)
    n_truth = weights @ outcomes.truth
    w = weights[:, outcomes.image]
    tp = np.cumsum(w * (outcomes.outcome == TRUE_POSITIVE), axis=1)
    fp = np.cumsum(w * (outcomes.outcome == FALSE_POSITIVE), axis=1)
    out = np.full(len(weights), np.nan)
    for r in range(len(weights)):
        if n_truth[r] <= 0:
            continue
        if tp.shape[1] == 0:
            out[r] = 0.0
            continue
        recall = tp[r] / n_truth[r]
        precision = np.maximum.accumulate((tp[r] / (tp[r] + fp[r] + np.spacing(1)))[::-1])[::-1]
        at = np.searchsorted(recall, RECALL_POINTS, side="left")
        q = np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)
        out[r] = q.mean()
    return out


def weighted_map(per_class: Sequence[Outcomes], weights: np.ndarray) -> np.ndarray:
    """Mean over the classes that have truth in each resample (COCO's mAP)."""
    values = np.stack([weighted_ap(o, weights) for o in per_class])
    with np.errstate(all="ignore"):
        count = np.sum(~np.isnan(values), axis=0)
        return np.where(count > 0, np.nansum(values, axis=0) / np.maximum(count, 1), np.nan)


def weighted_froc(outcomes: Outcomes, weights: np.ndarray, rate: float) -> np.ndarray:
    """Sensitivity at ``rate`` false positives per image for each row of image ``weights``."""
    weights = np.atleast_2d(weights)
    n_images = weights.sum(axis=1)
    n_truth = weights @ outcomes.truth
    w = weights[:, outcomes.image]
    tp = np.cumsum(w * (outcomes.outcome == TRUE_POSITIVE), axis=1)
    fp = np.cumsum(w * (outcomes.outcome == FALSE_POSITIVE), axis=1)
    tp = np.concatenate([np.zeros((len(weights), 1)), tp], axis=1)  # the curve starts at (0, 0)
    fp = np.concatenate([np.zeros((len(weights), 1)), fp], axis=1)
    with np.errstate(all="ignore"):
        allowed = (fp / n_images[:, None]) <= rate + 1e-12
        last = allowed.sum(axis=1) - 1  # fp only grows along a row: the allowed points are a prefix
        found = tp[np.arange(len(weights)), last] / n_truth
    return np.where((n_images > 0) & (n_truth > 0), found, np.nan)


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        return {k: (None if math.isnan(v) else float(v)) for k, v in
                (("value", self.value), ("low", self.low), ("high", self.high))}


def percentile_interval(value: float, resampled: np.ndarray, confidence: float = 0.95) -> Interval:
    values = resampled[~np.isnan(resampled)]
    if not values.size:
        return Interval(value, math.nan, math.nan)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(value, float(low), float(high))


def _resampled(fn, draws: np.ndarray) -> np.ndarray:
    """``fn`` on every row of ``draws`` in chunks: a (resamples x detections) matrix can be large."""
    return np.concatenate([fn(draws[s:s + 200]) for s in range(0, len(draws), 200)] or [np.zeros(0)])


def metric_functions(predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
                     n_classes: int, froc_rates: Sequence[float] = (0.5, 1.0, 2.0)):
    """``{metric: f(weights) -> values}`` for ``map50``, ``lesion_ap50`` and ``froc_<rate>`` of one detector.

    The matching is done here, once; each function only reweights images (rows of ``weights``).
    """
    per_class = [ap_outcomes(predictions, targets, k)[0] for k in range(1, n_classes + 1)]
    agnostic = ap_outcomes([dict(p, labels=p["labels"].new_ones(p["labels"].shape)) for p in predictions],
                           [dict(t, labels=t["labels"].new_ones(t["labels"].shape)) for t in targets], 1)[0]
    found = froc_outcomes(predictions, targets)
    out = {"map50": lambda w: weighted_map(per_class, w), "lesion_ap50": lambda w: weighted_ap(agnostic, w)}
    for rate in froc_rates:
        out[f"froc_{rate:g}"] = lambda w, rate=rate: weighted_froc(found, w, rate)
    return out


def _groups(targets: Sequence, groups: Sequence | None) -> np.ndarray:
    group_ids = np.arange(len(targets)) if groups is None else np.asarray(groups)
    if group_ids.shape != (len(targets),):
        raise ValueError(f"{group_ids.size} group ids for {len(targets)} images")
    return group_ids


def detection_intervals(predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]],
                        n_classes: int, groups: Sequence[int] | None = None, n_boot: int = 1000, seed: int = 0,
                        confidence: float = 0.95, froc_rates: Sequence[float] = (0.5, 1.0, 2.0)
                        ) -> dict[str, Interval]:
    """Point value and percentile interval of ``map50``, ``lesion_ap50`` and ``froc_<rate>`` (rates as ``%g``).

    ``groups``: one id per image (its patient); images of one group are drawn together. None: every image
    is its own group. Labels are 1-based class indices (torchvision's convention).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prediction sets for {len(targets)} images")
    group_ids = _groups(targets, groups)
    ones = np.ones((1, len(targets)))
    draws = patient_bootstrap_weights(group_ids, n_boot, seed) if len(targets) else np.zeros((0, 0))
    return {name: percentile_interval(float(fn(ones)[0]), _resampled(fn, draws), confidence)
            for name, fn in metric_functions(predictions, targets, n_classes, froc_rates).items()}


def paired_detection_differences(predictions_a: Sequence[Mapping[str, Tensor]],
                                 predictions_b: Sequence[Mapping[str, Tensor]],
                                 targets: Sequence[Mapping[str, Tensor]], n_classes: int,
                                 groups: Sequence | None = None, n_boot: int = 1000, seed: int = 0,
                                 confidence: float = 0.95, froc_rates: Sequence[float] = (0.5, 1.0, 2.0)
                                 ) -> dict[str, PairedDifference]:
    """Paired bootstrap of B - A for every detection metric: both detectors scored on the same resamples.

    Why paired: the two detectors saw the same images, so hard and easy patients are shared; each resample
    draws patients (``groups``; None: images) once and recomputes both detectors' AP50, lesion AP50 and FROC
    on it, and the percentile interval is that of the difference itself
    (:class:`mammo_core.evaluation.paired_bootstrap.PairedDifference`: distinguishable when it excludes 0).
    """
    if not len(predictions_a) == len(predictions_b) == len(targets):
        raise NotPaired(f"{len(predictions_a)} and {len(predictions_b)} prediction sets for {len(targets)} images")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    group_ids = _groups(targets, groups)
    ones = np.ones((1, len(targets)))
    draws = patient_bootstrap_weights(group_ids, n_boot, seed) if len(targets) else np.zeros((0, 0))
    fa = metric_functions(predictions_a, targets, n_classes, froc_rates)
    fb = metric_functions(predictions_b, targets, n_classes, froc_rates)
    tail = (1.0 - confidence) / 2.0 * 100.0
    out = {}
    for name in fa:
        diffs = _resampled(fb[name], draws) - _resampled(fa[name], draws)
        diffs = diffs[np.isfinite(diffs)]
        low, high = np.percentile(diffs, [tail, 100.0 - tail]) if diffs.size else (math.nan, math.nan)
        out[name] = PairedDifference(metric=name, a=float(fa[name](ones)[0]), b=float(fb[name](ones)[0]),
                                     low=float(low), high=float(high), n_items=len(targets),
                                     n_patients=int(np.unique(group_ids).size), n_boot=n_boot,
                                     confidence=confidence, unit="images")
    return out
