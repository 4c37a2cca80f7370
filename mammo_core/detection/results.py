"""Table 8 as plain functions: a detector's test row, its flat CSV form, the paired differences for
``detection.json`` and the stage's MLflow metric names.

Why here and not in the detect stage: the stage decides what is trained and where files go; what a row
holds (COCO metrics, lesion AP50, FROC, parameter counts, intervals) is the ``detection.json`` / ``table8.csv``
contract that the report and ``mammo promote`` / ``mammo compare`` read, so it is written once, in the
library, beside the evaluation that fills it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammo_core.detection import bootstrap, builders, evaluate
from mammo_core.detection.data import DetectionImage
from mammo_core.storage.durable import atomic_path


def lesion_sizes(items: Sequence[DetectionImage]) -> tuple[np.ndarray, dict]:
    """(sqrt(w*h) of every box, its count and quantiles in detector-input pixels)."""
    sizes = np.asarray([math.sqrt(float((b[2] - b[0]) * (b[3] - b[1]))) for it in items for b in it.boxes],
                       dtype=float)
    qs = {f"q{int(q * 100):02d}": float(np.quantile(sizes, q)) for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)} \
        if sizes.size else {}
    return sizes, {"count": int(sizes.size), "quantiles_px": qs, "measure": "sqrt(w*h), detector-input pixels"}


def result_row(name: str, predictions: list[dict], targets: list[dict], classes: Sequence[str],
               model: torch.nn.Module, weights: str, initialisation: dict[str, Any], **training: Any) -> dict[str, Any]:
    """A detector's Table 8 row from its test predictions: COCO mAP50/mAP/AR100, lesion AP50, FROC, per-class
    AP50, where its weights came from, parameter counts, then ``training`` (epochs, best epoch, ...) in the
    order given; ``latency_ms`` is NaN until the detectors are timed side by side."""
    coco = evaluate.coco_metrics(predictions, targets, classes)
    return {"model": name, "map50": coco["map50"], "map": coco["map"], "ar100": coco["ar100"],
            "lesion_ap50": evaluate.lesion_ap50(predictions, targets), "latency_ms": float("nan"),
            "froc": evaluate.froc(predictions, targets), "per_class_ap50": coco["per_class_ap50"],
            "weights": weights, "initialisation": initialisation, "parameters": builders.parameter_counts(model),
            "params_m": round(builders.parameter_millions(model), 3), **training}


def flatten_row(row: dict) -> dict:
    """A row as flat CSV columns: nested FROC, per-class AP50, intervals, parameters and initialisation spread."""
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    flat.update({f"froc_{k}fp": v for k, v in row["froc"].items()})
    flat.update({f"ap50_{k}": v for k, v in row["per_class_ap50"].items()})
    flat.update({f"{k}_ci95_{end}": v[end] for k, v in row.get("ci95", {}).items() for end in ("low", "high")})
    flat.update({f"{k}_params": v for k, v in row.get("parameters", {}).items()})
    init = row.get("initialisation", {})
    flat.update({"init_source": init.get("source"), "init_file": init.get("file"), "init_sha256": init.get("sha256")})
    return flat


def write_table(rows: Sequence[dict], path: Path) -> None:
    """Table 8 as CSV, one flat row per detector, columns in first-seen order; written atomically."""
    flat = [flatten_row(r) for r in rows]
    fields = list(dict.fromkeys(k for f in flat for k in f))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)


def paired_dict(d: bootstrap.PairedDifference) -> dict[str, Any]:
    """A paired difference for detection.json (NaN as None), with its verdict on "B beats A"."""
    values = {"a": d.a, "b": d.b, "diff": d.diff, "low": d.low, "high": d.high}
    return {**{k: evaluate.finite_or_none(v) for k, v in values.items()}, "n_images": d.n_items,
            "n_patients": d.n_patients, "n_boot": d.n_boot, "confidence": d.confidence,
            "distinguishable": d.distinguishable}


def paired_against_ours(predictions: Mapping[str, list[dict]], targets: list[dict], num_classes: int,
                        groups: Sequence[str], names: Sequence[str], n_boot: int, seed: int) -> dict[str, dict]:
    """``"ours - <baseline>"`` -> metric -> :func:`paired_dict`, for every name but ``ours`` (B - A = ours -
    baseline, both scored on the same patient resamples of the test images)."""
    return {f"ours - {name}": {metric: paired_dict(d) for metric, d in bootstrap.paired_detection_differences(
        predictions[name], predictions["ours"], targets, num_classes, groups, n_boot=n_boot, seed=seed).items()}
            for name in names if name != "ours"}


def metric_values(rows: Sequence[dict], times: Mapping[str, float], paired_test: Mapping[str, dict],
                  n_test: int, size_summary: dict, dropped: Mapping[str, int]) -> dict[str, float]:
    """The detect stage's MLflow metrics (``detect/...``) from the timed rows and paired differences; NaN ones
    are left out (MLflow would store them, and a NaN never equals itself in a comparison)."""
    metrics: dict[str, float] = {}
    for row in rows:
        prefix = f"detect/{row['model']}"
        for key in ("map50", "map", "ar100", "lesion_ap50", "latency_ms"):
            metrics[f"{prefix}/{key}"] = row[key]
        for rate, value in row["froc"].items():
            metrics[f"{prefix}/froc_{rate.replace('.', '_')}fp"] = value
    if "frcnn_r50" in times:
        metrics["detect/ours/latency_ratio_vs_r50"] = times["ours"] / times["frcnn_r50"]
    for pair, by_metric in paired_test.items():
        for metric in ("map50", "lesion_ap50"):
            for end in ("diff", "low", "high"):
                if by_metric[metric][end] is not None:
                    metrics[f"detect/paired/{pair.replace(' - ', '_minus_')}/{metric}_{end}"] = by_metric[metric][end]
    metrics["detect/images_test"] = n_test
    for name, value in size_summary["quantiles_px"].items():
        metrics[f"detect/lesion_size_{name}"] = value
    for reason, n in dropped.items():
        metrics[f"detect/dropped/{reason}"] = n
    return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
