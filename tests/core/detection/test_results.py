"""Table 8's rows, CSV form and metric names (mammo_core.detection.results) on small synthetic values."""

from __future__ import annotations

import csv
import math

import torch

from mammo_core.detection.data import DetectionImage
from mammo_core.detection.results import flatten_row, lesion_sizes, metric_values, write_table


def _row(model: str, map50: float) -> dict:
    return {"model": model, "map50": map50, "map": 0.1, "ar100": 0.2, "lesion_ap50": 0.3, "latency_ms": 12.0,
            "froc": {"0.5": 0.4, "1.0": 0.5}, "per_class_ap50": {"MASS": 0.6},
            "parameters": {"total": 10, "trainable": 4}, "initialisation": {"source": "random", "file": None,
                                                                            "sha256": None},
            "ci95": {"map50": {"low": 0.01, "high": 0.9}}, "epochs": 2}


def test_flatten_row_spreads_nested_values_into_named_columns(tmp_path):
    flat = flatten_row(_row("ours", 0.5))
    assert flat["froc_0.5fp"] == 0.4 and flat["ap50_MASS"] == 0.6 and flat["map50_ci95_high"] == 0.9
    assert flat["total_params"] == 10 and flat["init_source"] == "random" and "froc" not in flat
    write_table([_row("ours", 0.5), _row("frcnn_r50", 0.25)], tmp_path / "table8.csv")
    with open(tmp_path / "table8.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == ["ours", "frcnn_r50"] and rows[1]["map50"] == "0.25"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_metric_values_name_rows_pairs_sizes_and_leave_nan_out():
    rows = [_row("ours", 0.5), _row("frcnn_r50", math.nan)]
    paired = {"ours - frcnn_r50": {"map50": {"diff": 0.1, "low": None, "high": 0.3},
                                   "lesion_ap50": {"diff": 0.0, "low": -0.1, "high": 0.2}}}
    values = metric_values(rows, {"ours": 10.0, "frcnn_r50": 40.0}, paired, 7, {"quantiles_px": {"q50": 21.0}},
                           {"degenerate box": 2})
    assert values["detect/ours/map50"] == 0.5 and "detect/frcnn_r50/map50" not in values
    assert values["detect/ours/froc_0_5fp"] == 0.4
    assert values["detect/ours/latency_ratio_vs_r50"] == 0.25
    assert values["detect/paired/ours_minus_frcnn_r50/map50_diff"] == 0.1
    assert "detect/paired/ours_minus_frcnn_r50/map50_low" not in values
    assert values["detect/images_test"] == 7 and values["detect/lesion_size_q50"] == 21.0
    assert values["detect/dropped/degenerate box"] == 2


def test_lesion_sizes_are_square_roots_of_box_areas():
    boxes = torch.tensor([[0.0, 0.0, 4.0, 9.0], [10.0, 10.0, 20.0, 20.0]])
    item = DetectionImage.__new__(DetectionImage)
    object.__setattr__(item, "boxes", boxes)
    sizes, summary = lesion_sizes([item])
    assert sizes.tolist() == [6.0, 10.0]
    assert summary["count"] == 2 and summary["quantiles_px"]["q00"] == 6.0 and summary["quantiles_px"]["q100"] == 10.0
