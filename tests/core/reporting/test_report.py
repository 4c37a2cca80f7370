"""The report reads only stage artifacts: fake stage folders with known numbers must come out verbatim."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammo_core.evaluation import seed_summary
from mammo_core.reporting.report import build_report
from mammo_core.reporting.report_render import format_value
from mammo_core.storage.store import file_sha256

CLASSES = ["NORMAL", "MASS_BENIGN", "CALC_MALIGNANT"]
BRANCHES = ("freeze1", "freeze2", "freeze3")
KEYS = {"curate": "c" * 24, "patches": "p" * 24, "train": "t" * 24, "features": "f" * 24, "hashing": "h" * 24,
        "classify": "k" * 24, "detect": "d" * 24, "baselines": "b" * 24}
NEW_STAGES = ("detect", "baselines")  # optional for the report: absent -> "not run"
NO_CIS = "  |" * 8  # Tables 1/6/7: the interval columns, empty when no per-patch predictions were saved


def _png(path: Path, shade: int) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (shade, 40, 90)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def _seal(folder: Path, stage: str, metrics: dict, params: dict, upstream: dict) -> None:
    files = [{"path": p.name, "sha256": file_sha256(p), "size": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.name != "manifest.json"]
    manifest = {"key": KEYS[stage], "stage": stage, "metrics": metrics, "params": params, "upstream": upstream,
                "files": files, "mlflow_run_id": f"run-{stage}"}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def make_store(root: Path, with_new_stages: bool = True) -> dict[str, Path]:
    """Stage folders laid out like a finished run's, holding small known numbers.

    ``with_new_stages=False`` leaves out the detect and baselines folders (a run of a pipeline without them).
    """
    dirs = {s: root / s / k for s, k in KEYS.items() if with_new_stages or s not in NEW_STAGES}
    for d in dirs.values():
        d.mkdir(parents=True)

    d = dirs["curate"]
    _write_json(d / "curation_report.json", {
        "classes": CLASSES, "images_per_split": {"train": 31, "val": 7, "test": 9},
        "patients_per_split": {"train": 12, "val": 3, "test": 4},
        "lesions_per_class_and_split": {"train": {"MASS_BENIGN": 14, "CALC_MALIGNANT": 19},
                                        "val": {"MASS_BENIGN": 5, "CALC_MALIGNANT": 2},
                                        "test": {"MASS_BENIGN": 6, "CALC_MALIGNANT": 3}},
        "quarantined": 3, "quarantined_per_reason": {"unreadable DICOM": 2, "mask size mismatch": 1}})
    _seal(d, "curate", {}, {"curate": {"split_seed": 0}}, {"acquire": "a" * 24})

    d = dirs["patches"]
    _write_json(d / "patches_summary.json", {
        "class_names": CLASSES, "skipped": [{"item": "L1", "reason": "box outside image"}],
        "counts": {"train": {"NORMAL": 31, "MASS_BENIGN": 14, "CALC_MALIGNANT": 19},
                   "val": {"NORMAL": 7, "MASS_BENIGN": 5, "CALC_MALIGNANT": 2},
                   "test": {"NORMAL": 9, "MASS_BENIGN": 6, "CALC_MALIGNANT": 3}}})
    _seal(d, "patches", {}, {"patches": {"size": 32}}, {"curate": KEYS["curate"]})

    d = dirs["train"]
    history = {b: [{"epoch": e, "val_acc": {x: v for x, v in zip(BRANCHES, vals, strict=True)}}
                   for e, vals in ((1, (0.1875, 0.2125, 0.2375)), (2, (0.3125, 0.3375, 0.3625)))]
               for b in BRANCHES}
    _write_json(d / "history.json", history)
    counts = {"freeze1": (4309366, 662186), "freeze2": (3520566, 1450986), "freeze3": (1306099, 3665453)}
    _write_json(d / "model_config.json", {"class_names": CLASSES, "num_classes": 3, "parameter_counts": {
        b: {"frozen": f, "trainable": t} for b, (f, t) in counts.items()}})
    for i, b in enumerate(BRANCHES):
        matrix = np.array([[11 + i, 1, 0], [2, 13, 1], [0, 3, 17]])
        np.savetxt(d / f"confusion_{b}.csv", matrix, fmt="%d", delimiter=",", header=",".join(CLASSES))
        _png(d / f"confusion_{b}.png", 10 + i)
    _png(d / "val_curves.png", 60)
    train_metrics = {f"train/{b}/test_acc": acc for b, acc in zip(BRANCHES, (0.3125, 0.4375, 0.5625), strict=True)}
    _seal(d, "train", train_metrics, {"train": {"epochs": 2}}, {"patches": KEYS["patches"]})

    d = dirs["features"]
    _write_json(d / "fusion.json", {"weights": [0.25, 0.25, 0.5], "mode": "search"})
    pd.DataFrame({"w_freeze1": [0.0, 0.25], "w_freeze2": [0.5, 0.25], "w_freeze3": [0.5, 0.5],
                  "val_acc": [0.4062, 0.6094]}).to_csv(d / "fusion_grid.csv", index=False)
    _png(d / "fusion_grid.png", 90)
    feat_metrics = {"features/freeze1/test_acc": 0.5313, "features/freeze2/test_acc": 0.5469,
                    "features/freeze3/test_acc": 0.5781, "features/fused/test_acc": 0.6875}
    _seal(d, "features", feat_metrics, {"features": {"grid_step": 0.25}},
          {"train": KEYS["train"], "patches": KEYS["patches"]})

    d = dirs["hashing"]
    by_seed = pd.DataFrame({"bits": [12] * 3 + [48] * 3, "seed": [0, 1, 2] * 2,
                            "hash_map": [0.4321, 0.4521, 0.4121, 0.4567, 0.4467, 0.4667],
                            "hash_p@10": [0.41] * 3 + [0.43] * 3,
                            "fc_map": [0.3456, 0.3356, 0.3556, 0.3789, 0.4789, 0.2789],
                            "fc_p@10": [0.31] * 3 + [0.33] * 3})
    by_seed["hash_minus_fc_map"] = by_seed["hash_map"] - by_seed["fc_map"]
    by_seed.to_csv(d / "table4_map_by_seed.csv", index=False)
    seed_summary.paired_seed_summary(by_seed, "bits", "hash_map", "fc_map", extra_means=("hash_p@10", "fc_p@10")
                                     ).to_csv(d / "table4_map.csv", index=False)
    pd.DataFrame({"decoder": ["hash", "fc"], "bits": [12, 12], "fraction_binary": [0.0152, 0.0],
                  "bit_balance": [0.0871, 0.0682]}).to_csv(d / "bit_statistics.csv", index=False)
    _png(d / "table4_map.png", 120)
    _seal(d, "hashing", {}, {"hashing": {"bits": [12, 48]}}, {"features": KEYS["features"]})

    d = dirs["classify"]
    pd.DataFrame([
        {"classifier": "knn", "test_acc": 0.6125, "test_acc_ci_low": 0.4125, "test_acc_ci_high": 0.7625,
         "macro_f1": 0.55, "balanced_acc": 0.58, "auc_ovr_macro": 0.71, "recall/NORMAL": 0.9,
         "recall/MASS_BENIGN": 0.45, "recall/CALC_MALIGNANT": 0.35},
        {"classifier": "fusion", "test_acc": 0.7125, "test_acc_ci_low": 0.5125, "test_acc_ci_high": 0.8125,
         "macro_f1": 0.66, "balanced_acc": 0.67, "auc_ovr_macro": 0.77, "recall/NORMAL": 0.95,
         "recall/MASS_BENIGN": 0.55, "recall/CALC_MALIGNANT": 0.5},
        {"classifier": "stacking", "note": "not fitted: too few samples"},
    ]).to_csv(d / "table5_classifiers.csv", index=False)
    pairs = pd.DataFrame([[0.8182, 0.5, 0.22727272727272727], [0.9091, 0.6667, 0.5]],
                         index=["freeze1", "freeze1+freeze2"], columns=CLASSES)
    pairs.to_csv(d / "table2_pairs.csv")
    errors = pd.DataFrame([[12, 2, 3, 1, 6, 0], [16, 4, 17, 23, 44, 1]], index=["NORMAL", "all"],
                          columns=["n_samples", "wrong_only_freeze1", "wrong_only_freeze2", "wrong_only_freeze3",
                                   "wrong_in_exactly_one", "wrong_in_all"])
    errors.to_csv(d / "table3_errors.csv")
    _write_json(d / "classifier.json", {"weights": {"svm": 0.4, "knn": 0.3, "rf": 0.3}, "class_names": CLASSES})
    _png(d / "confusion_fusion.png", 150)
    _seal(d, "classify", {"classify/fusion/test_acc": 0.7125}, {"classify": {"n_boot": 200, "codes": "hash@48"}},
          {"hashing": KEYS["hashing"], "train": KEYS["train"]})
    if with_new_stages:
        _make_detect(dirs["detect"])
        _make_baselines(dirs["baselines"])
    return dirs


def _make_detect(d: Path) -> None:
    """A detect folder following the stage's contract (detection.json, table8_detection.csv, examples_*.png)."""
    rows = [
        {"model": "ours", "map50": 0.4375, "map": 0.1875, "ar100": 0.5625, "latency_ms": 41.25,
         "froc": {"0.5": 0.25, "1": 0.375, "2": 0.5}, "per_class_ap50": {"MASS_BENIGN": 0.5, "CALC_MALIGNANT": 0.375},
         "weights": "train:tttt", "params_m": 7.125, "epochs": 3},
        {"model": "ours_nohash", "map50": 0.40625, "map": 0.15625, "ar100": 0.53125, "latency_ms": 39.5,
         "froc": {"0.5": 0.125, "1": 0.25, "2": 0.4375}, "per_class_ap50": {"MASS_BENIGN": 0.4375,
                                                                            "CALC_MALIGNANT": 0.375},
         "weights": "train:tttt", "params_m": 7.0625, "epochs": 3},
        {"model": "frcnn_r50", "map50": 0.3125, "map": 0.125, "ar100": 0.46875, "lesion_ap50": 0.375,
         "latency_ms": 123.5,
         "froc": {"0.5": 0.0625, "1": 0.125, "2": 0.25}, "per_class_ap50": {"MASS_BENIGN": 0.25,
                                                                           "CALC_MALIGNANT": 0.375},
         "weights": "none (random init)", "params_m": 41.3, "epochs": 3},
    ]
    _write_json(d / "detection.json", {
        "classes": ["MASS_BENIGN", "CALC_MALIGNANT"], "input_size": 384, "rows": rows,
        "fast_rcnn": "superseded by Faster R-CNN; selective search is not available offline",
        "lesion_sizes": {"median_px": 21.5}, "dropped_boxes": {"degenerate box": 2, "outside image": 1},
        "training": {"epochs": 3, "train_crop": 256, "train_backbone": False}})
    pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows]).to_csv(
        d / "table8_detection.csv", index=False)
    _png(d / "examples_ours.png", 180)
    _png(d / "examples_frcnn_r50.png", 200)
    _seal(d, "detect", {"detect/ours/map50": 0.4375, "detect/ours/latency_ms": 41.25}, {"detect": {"epochs": 3}},
          {"curate": KEYS["curate"], "train": KEYS["train"]})


def _make_baselines(d: Path) -> None:
    """A baselines folder following the stage's contract (baselines.json, val_curves.json, the Figure 10 PNG)."""
    nets = {"vgg16": (0.5625, 0.375, 0.6875, 0.5, 12.5, 134.3), "inception_v3": (0.59375, 0.40625, 0.71875, 0.55,
                                                                                  9.75, 21.8),
            "resnet50": (0.625, 0.4375, 0.75, 0.6, 8.25, 23.5), "densenet121": (0.65625, 0.46875, 0.78125, 0.625,
                                                                                 10.5, 7.0)}
    rows = [{"network": n, "test_acc": a, "ci_low": lo, "ci_high": hi, "balanced_acc": b, "latency_ms": ms,
             "params_m": pm, "weights": "none", "input_size": 32, "epochs": 2}
            for n, (a, lo, hi, b, ms, pm) in nets.items()]
    classic = [{"method": "sift_bovw_svm", "test_acc": 0.40625, "ci_low": 0.25, "ci_high": 0.5625,
                "detail": "dense SIFT, 64 visual words, RBF SVM"},
               {"method": "agnet", "test_acc": 0.46875, "ci_low": 0.3125, "ci_high": 0.625,
                "detail": "attention-gated CNN, 2 epochs"}]
    _write_json(d / "baselines.json", {"classes": CLASSES, "majority_rate": 0.34375, "rows": rows,
                                       "classic": classic})
    _write_json(d / "val_curves.json", {n: [{"epoch": e, "val_acc": v, "train_loss": 1.0 / e}
                                            for e, v in ((1, 0.28125 + i / 32), (2, 0.40625 + i / 32))]
                                        for i, n in enumerate(nets)})
    _png(d / "figure10_val_curves.png", 220)
    _seal(d, "baselines", {f"baselines/{n}/test_acc": r[0] for n, r in nets.items()}, {"baselines": {"epochs": 2}},
          {"augment": "g" * 24, "patches": KEYS["patches"]})


def sections_of(md: str) -> dict[str, str]:
    """Markdown section text by the label its heading starts with ("Table 5", "Figure 11", "Data summary")."""
    out = {}
    for chunk in md.split("\n## ")[1:]:
        heading = chunk.split("\n", 1)[0]
        out[heading.split(":")[0]] = chunk
    return out


@pytest.fixture
def built(tmp_path: Path) -> tuple[dict[str, Path], Path, str]:
    dirs = make_store(tmp_path / "stages")
    out = tmp_path / "report"
    build_report(dirs, out, {"params": {"classify": {"n_boot": 200}}, "code_version": "abc1234",
                             "stage_keys": KEYS})
    return dirs, out, (out / "report.md").read_text(encoding="utf-8")


def test_every_paper_heading_is_present_in_order(built):
    _, _, md = built
    labels = list(sections_of(md))
    expected = ["Data summary", *(f"Table {i}" for i in range(1, 9)), *(f"Figure {i}" for i in range(9, 15))]
    assert [x for x in labels if x in expected] == expected


def test_numbers_come_out_as_written_in_their_source_files(built):
    _, _, md = built
    s = sections_of(md)
    # Table 5: our row with its CI, next to the paper's claim for the same row.
    # accuracy, CI, balanced accuracy, its CI, macro AUC, its CI (no predictions.csv here: empty), macro F1, claim
    assert "| fusion | 0.7125 | 0.5125 | 0.8125 | 0.67 |  |  | 0.77 |  |  | 0.66 | 91.49 |  |" in s["Table 5"]
    assert "| knn | 0.6125 | 0.4125 | 0.7625 | 0.58 |  |  | 0.71 |  |  | 0.55 | 83.50 |  |" in s["Table 5"]
    assert "not fitted: too few samples" in s["Table 5"]
    assert "95% patient-bootstrap percentile interval (200 resamples)" in s["Table 5"]
    assert "| svm | 0.4 |" in s["Table 5"]  # fusion weight from classifier.json
    # Table 4: hash and FC MAP per bits beside the paper's claims.
    # bits, seeds, hash mean, sd, claim, FC mean, sd, claim, paired hash - FC mean, sd, min, max, wins, P@10s
    assert ("| 12 | 3 | 0.4321 | 0.02 | 0.899 | 0.3456 | 0.01 | 0.877 | 0.0865 | 0.03 | 0.0565 | 0.1165 | 3 "
            "| 0.41 | 0.31 |") in s["Table 4"]
    assert ("| 48 | 3 | 0.4567 | 0.01 | 0.923 | 0.3789 | 0.1 | 0.912 | 0.0778 | 0.11 | -0.0322 | 0.1878 | 2 "
            "| 0.43 | 0.33 |") in s["Table 4"]
    assert "| 48 | 2 | 0.4667 | 0.43 | 0.2789 | 0.33 | 0.1878 |" in s["Table 4"]  # the per-seed rows beside
    assert "spread over seeds" not in s["Table 4"]  # three seeds: no warning
    assert "| hash | 12 | 0.0152 | 0.0871 |" in s["Table 4"]
    # Table 2 in the paper's layout (rows: classes), a long float shown to 4 decimals.
    assert "| MASS_BENIGN | 0.5 | 0.6667 |" in s["Table 2"]
    assert "| CALC_MALIGNANT | 0.2273 | 0.5 |" in s["Table 2"]
    assert "| 1 | 90.55 | 89.60 | 92.06 | 92.30 | 93.05 | 93.05 |" in s["Table 2"]  # claims, separate table
    assert "| all | 16 | 4 | 17 | 23 | 44 | 1 |" in s["Table 3"]
    # Table 7: parameter counts (model_config.json), head accuracy (train), probe accuracy (features).
    # (the eight interval columns are empty: this store has no train/predictions.h5)
    assert "| freeze1 | 4309366 | 662186 | 4.76M | 0.3125 |" + NO_CIS + " 0.5313 | 93.01 |" in s["Table 7"]
    assert "| freeze3 | 1306099 | 3665453 | 0.95M | 0.5625 |" + NO_CIS + " 0.5781 | 91.88 |" in s["Table 7"]
    assert "| fused |  |  | - |  |" + NO_CIS + " 0.6875 | 94.48 |" in s["Table 7"]
    # Figure 9: curves per epoch, chosen weights vs the paper's, best grid row first.
    assert "| 2 | 0.3125 | 0.3375 | 0.3625 |" in s["Figure 9"]
    assert "| freeze3 | 0.5 | 0.3 |" in s["Figure 9"]
    assert s["Figure 9"].index("| 0.25 | 0.25 | 0.5 | 0.6094 |") < s["Figure 9"].index("| 0 | 0.5 | 0.5 | 0.4062 |")
    # Figures 11-13: the confusion matrices as written by the train stage.
    assert "| NORMAL | 11 | 1 | 0 |" in s["Figure 11"]
    assert "| NORMAL | 13 | 1 | 0 |" in s["Figure 13"]
    assert "| CALC_MALIGNANT | 0 | 3 | 17 |" in s["Figure 12"]
    # Data summary: per split, per class and split, quarantine per reason, skipped patches.
    data = s["Data summary"]
    assert "| test | 9 | 4 | 9 |" in data and "| total | 47 | 19 | 49 |" in data
    assert "| CALC_MALIGNANT | 19 | 2 | 3 | 24 |" in data
    assert "| NORMAL | 31 | 7 | 9 | 47 |" in data
    assert "| unreadable DICOM | 2 |" in data and "| mask size mismatch | 1 |" in data
    assert "| box outside image | 1 |" in data
    assert "abc1234" in md


def test_each_measured_section_names_its_source_files(built):
    _, _, md = built
    s = sections_of(md)
    expected = {
        "Data summary": ["curate/curation_report.json", "patches/patches_summary.json"],
        "Table 2": ["classify/table2_pairs.csv"], "Table 3": ["classify/table3_errors.csv"],
        "Table 4": ["hashing/table4_map.csv", "hashing/table4_map_by_seed.csv", "hashing/bit_statistics.csv",
                    "hashing/table4_map.png"],
        "Table 5": ["classify/table5_classifiers.csv", "classify/classifier.json"],
        "Table 7": ["train/model_config.json", "train/manifest.json", "features/manifest.json"],
        "Figure 9": ["train/val_curves.png", "train/history.json", "features/fusion_grid.png",
                     "features/fusion_grid.csv", "features/fusion.json"],
        "Figure 11": ["train/confusion_freeze1.png", "train/confusion_freeze1.csv"],
        "Figure 12": ["train/confusion_freeze2.csv"], "Figure 13": ["train/confusion_freeze3.csv"],
        "Figure 14": ["classify/confusion_fusion.png"],
    }
    for label, files in expected.items():
        for name in files:
            stage = name.split("/")[0]
            assert f"Source: {name} (key {KEYS[stage]}" in s[label], (label, name)
    assert "Source: the paper" in s["Table 5"]


def test_single_networks_and_classic_methods_fill_tables_1_and_6_with_claims_beside(built):
    _, _, md = built
    s = sections_of(md)
    t1 = s["Table 1"]
    # accuracy and CI, balanced accuracy and CI, macro AUC and CI, the paper's row and claim, the source
    assert ("| sift_bovw_svm | classic | 0.4062 | 0.25 | 0.5625 |  |  |  |  |  |  | SIFT-BoVW | 89.05 | "
            "baselines/baselines.json |") in t1
    assert "| densenet121 | single network | 0.6562 | 0.4688 | 0.7812 | 0.625 |  |  |  |  |  | DenseNet | 93.70 |" in t1
    assert "| resnet50 | single network | 0.625 | 0.4375 | 0.75 | 0.6 |  |  |  |  |  |  |  |" in t1  # no paper row
    assert "| freeze2 | our branch (own head) | 0.4375 |  |  |  |  |  |  |  |  |  |  | train/manifest.json |" in t1
    assert ("| fusion | ours: fused SVM+kNN+RF on hash codes | 0.7125 | 0.5125 | 0.8125 | 0.67 |  |  | 0.77 |  |  "
            "| Our | 94.68 |") in t1
    assert "Majority-class rate on the test split: 0.3438" in t1
    assert "not run" not in t1
    t6 = s["Table 6"]
    # a baselines.json without the frozen-layer fields (an older stage) leaves those four columns empty
    assert ("| vgg16 | single network | 0.5625 | 0.375 | 0.6875 | 0.5 |  |  |  |  |  | 12.5 | 134.3 | 32 | 2 | none "
            "|  |  |  |  | 90.09 | 6.062 |") in t6
    assert ("| fusion | ours: fused DenseNets + hash decoder + SVM/kNN/RF | 0.7125 | 0.5125 | 0.8125 | 0.67 |  |  "
            "| 0.77 |  |  |  |  |  |  |  |  |  |  |  | 94.48 | 15.052 |") in t6
    assert "classify/latency.json is missing: the fused model's time was not measured" in t6
    curves = s["Figure 10"]
    assert "| 2 | 0.4062 | 0.4375 | 0.4688 | 0.5 |" in curves
    assert "](figures/baselines_figure10_val_curves.png)" in curves
    for label in ("Table 1", "Table 6", "Figure 10"):
        assert f"Source: baselines/baselines.json (key {KEYS['baselines']}" in s[label] or label == "Figure 10"
    assert f"Source: baselines/val_curves.json (key {KEYS['baselines']}" in curves
    assert f"Source: train/manifest.json (key {KEYS['train']}" in t1
    assert f"Source: classify/table5_classifiers.csv (key {KEYS['classify']}" in t6


def _reseal(folder: Path, stage: str) -> None:
    """Rewrite a fake stage folder's manifest after adding files (keeps its metrics, params and upstream)."""
    old = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    (folder / "manifest.json").unlink()
    _seal(folder, stage, old["metrics"], old["params"], old["upstream"])


def test_table6_times_the_trained_chain_beside_the_single_networks_from_one_process(tmp_path):
    dirs = make_store(tmp_path / "stages")
    ours = "ours (fused DenseNets + hash decoder + SVM/kNN/RF fusion, trained)"
    rows = [{"model": m, "batch_size": b, "ms_per_batch": ms * b, "ms_per_image": ms}
            for m, per_batch in ((ours, {1: 17.375, 32: 4.25}), ("vgg16", {1: 9.5, 32: 2.125}))
            for b, ms in per_batch.items()]
    _write_json(dirs["classify"] / "latency.json", {"device": "cpu", "repeats": 5, "batch_sizes": [1, 32],
                                                    "ours": ours, "rows": rows})
    _reseal(dirs["classify"], "classify")
    build_report(dirs, tmp_path / "report", {})
    t6 = sections_of((tmp_path / "report" / "report.md").read_text(encoding="utf-8"))["Table 6"]
    # ms per image at batch 1 and batch 32 beside each other; the baselines stage's own time is not shown
    assert "| vgg16 | single network | 0.5625 | 0.375 | 0.6875 | 0.5 |  |  |  |  |  | 9.5 | 2.125 | 134.3 |" in t6
    assert "| inception_v3 | single network | 0.5938 | 0.4062 | 0.7188 | 0.55 |  |  |  |  |  |  |  | 21.8 |" in t6
    assert ("| fusion | ours: fused DenseNets + hash decoder + SVM/kNN/RF | 0.7125 | 0.5125 | 0.8125 | 0.67 |  |  "
            "| 0.77 |  |  | 17.375 | 4.25 |") in t6
    assert "ms/image batch 1 | ms/image batch 32" in t6 and "12.5" not in t6
    assert "classify/table5_classifiers.csv, classify/latency.json |" in t6
    assert f"Source: classify/latency.json (key {KEYS['classify']}" in t6
    assert "every model timed in one process on cpu at batch sizes [1, 32]" in t6
    assert "is missing" not in t6.replace("classify/predictions.csv is missing", "")


def test_detection_fills_table_8_with_claims_and_the_reason_fast_rcnn_is_absent(built):
    _, out, md = built
    t8 = sections_of(md)["Table 8"]
    assert ("| ours | 0.4375 | 0.1875 | 0.5625 |  | 0.25 | 0.375 | 0.5 | 41.25 | 7.125 | 3 | train:tttt | 75.01 | 105 |"
            in t8)
    assert ("| ours_nohash | 0.4062 | 0.1562 | 0.5312 |  | 0.125 | 0.25 | 0.4375 | 39.5 | 7.0625 | 3 | train:tttt "
            "|  |  |") in t8
    assert "| frcnn_r50 | 0.3125 | 0.125 | 0.4688 | 0.375 |" in t8 and "| 70.03 | 325 |" in t8
    assert ("Fast R-CNN (paper claim: mAP 60.50 %, 534 ms) has no row of ours; the detect stage records why: "
            "superseded by Faster R-CNN") in t8
    assert "| MASS_BENIGN | 0.5 | 0.4375 | 0.25 |" in t8  # AP50 per class and model
    assert "| degenerate box | 2 |" in t8
    assert ("Training regime of every row (detection.json training): epochs 3, train_backbone False, "
            "train_crop 256") in t8
    assert "](figures/detect_examples_ours.png)" in t8 and "](figures/detect_examples_frcnn_r50.png)" in t8
    assert f"Source: detect/detection.json (key {KEYS['detect']}" in t8
    t8_csv = pd.read_csv(out / "tables" / "table8_detection.csv").set_index("model")
    assert t8_csv.loc["ours_nohash", "mAP@0.5"] == 0.40625  # full precision in the CSV


def test_stages_not_in_this_pipeline_say_so_and_show_no_value_of_ours(tmp_path):
    dirs = make_store(tmp_path / "stages", with_new_stages=False)
    build_report(dirs, tmp_path / "report", {})
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    s = sections_of(md)
    for label, stage in (("Table 1", "baselines"), ("Table 6", "baselines"), ("Table 8", "detect"),
                         ("Figure 10", "baselines")):
        assert f"not run: no {stage} stage folder was given to this report" in s[label]
        assert "Source: " not in s[label].replace("Source: the paper", "")  # nothing of ours was read
    assert "| Our | 94.68 |" in s["Table 1"]  # the claim, in a table labelled as claims
    assert "| Faster RCNN | 70.03 | 325 |" in s["Table 8"]


def test_html_is_self_contained_with_embedded_figures(built):
    _, out, _ = built
    page = (out / "report.html").read_text(encoding="utf-8")
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    # val curves, fusion grid, MAP plot, three branch and one fusion confusion matrix, Figure 10, two detections
    assert len(images) == 10
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    lowered = page.lower()
    for forbidden in ("<script", "<link", "<iframe", "@import", "url(", "src=\"http", "href=\"http"):
        assert forbidden not in lowered, forbidden
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', page))
    assert "<h2>Table 5: classifiers" in page and "<td>0.7125</td>" in page


def test_tables_are_written_as_csv_at_full_precision(built):
    _, out, md = built
    names = {p.stem for p in (out / "tables").glob("*.csv")}
    assert {"table2_pairwise_fusion", "table3_wrong_by_one_branch", "table4_map", "table5_classifiers",
            "table7_branches", "figure9_val_acc", "confusion_freeze1", "table1_methods", "table6_single_networks",
            "table8_detection", "figure10_val_acc"} <= names
    pairs = pd.read_csv(out / "tables" / "table2_pairwise_fusion.csv", index_col=0)
    assert pairs.loc["CALC_MALIGNANT", "freeze1"] == 0.22727272727272727  # the md shows 0.2273
    t5 = pd.read_csv(out / "tables" / "table5_classifiers.csv")
    assert t5.set_index("classifier").loc["fusion", "test_acc_ci_high"] == 0.8125
    for png in ("figures/train_val_curves.png", "figures/classify_confusion_fusion.png"):
        assert (out / png).is_file() and f"]({png})" in md


def test_missing_artifacts_are_named_and_the_rest_still_reported(tmp_path):
    dirs = make_store(tmp_path / "stages")
    (dirs["classify"] / "table3_errors.csv").unlink()
    (dirs["train"] / "confusion_freeze2.png").unlink()
    dirs["features"] = None  # stage folder not given at all
    out = tmp_path / "report"
    build_report(dirs, out, {})
    s = sections_of((out / "report.md").read_text(encoding="utf-8"))
    assert "**Missing:** classify/table3_errors.csv is missing" in s["Table 3"]
    assert "| 1 | 1172 | 58 | 44 | 31 | 0 |" in s["Table 3"]  # the claims table stays
    assert "**Missing:** train/confusion_freeze2.png is missing" in s["Figure 12"]
    assert "| CALC_MALIGNANT | 0 | 3 | 17 |" in s["Figure 12"]  # the matrix from its CSV still shown
    assert "features/manifest.json: no features stage folder was given" in s["Table 7"]
    assert "| freeze1 | 4309366 | 662186 | 4.76M | 0.3125 |" + NO_CIS + "  | 93.01 |" in s["Table 7"]
    assert "features/fusion.json: no features stage folder" in s["Figure 9"]
    assert "| fusion | 0.7125 | 0.5125 | 0.8125 |" in s["Table 5"]
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'class="note missing"' in html


def test_a_malformed_artifact_breaks_only_its_section(tmp_path):
    dirs = make_store(tmp_path / "stages")
    (dirs["hashing"] / "table4_map.csv").write_text("something,else\n1,2\n", encoding="utf-8")
    out = tmp_path / "report"
    build_report(dirs, out, {})
    md = (out / "report.md").read_text(encoding="utf-8")
    s = sections_of(md)
    assert "Table 4" in s and "could not be built" in md.split("\n## Table 4", 1)[1].split("\n", 1)[0]
    assert "KeyError" in s["Table 4"]
    assert "| fusion | 0.7125 |" in s["Table 5"]


def test_an_artifact_changed_after_sealing_and_a_mixed_chain_are_flagged(tmp_path):
    dirs = make_store(tmp_path / "stages")
    (dirs["classify"] / "classifier.json").write_text(json.dumps({"weights": {"svm": 1.0}}), encoding="utf-8")
    manifest = json.loads((dirs["features"] / "manifest.json").read_text(encoding="utf-8"))
    manifest["upstream"]["train"] = "x" * 24
    (dirs["features"] / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    out = tmp_path / "report"
    build_report(dirs, out, {"stage_keys": {**KEYS, "hashing": "y" * 24}})
    s = sections_of((out / "report.md").read_text(encoding="utf-8"))
    assert "**Warning:** classify/classifier.json differs from the file sealed in its manifest" in s["Table 5"]
    run = s["Run"]
    assert f"features was computed from train key {'x' * 24}, but this report reads train key {KEYS['train']}" in run
    assert f"run_info names hashing key {'y' * 24}, but the folder read has key {KEYS['hashing']}" in run


@pytest.mark.parametrize(("value", "text"), [
    (4309366.0, "4309366"), (np.int64(17), "17"), (0.22727272727272727, "0.2273"), (0.5, "0.5"),
    (float("nan"), ""), (None, ""), ("83.50", "83.50"), (0.99996, "1"), (-0.00001, "0"),
])
def test_format_value(value, text):
    assert format_value(value) == text


def test_report_stage_logs_to_its_run_and_the_parent_run(tmp_path):
    """The stage through the real runtime: sealed folder, child run artifacts, and the parent run's copy."""
    from mlflow.tracking import MlflowClient

    from mammo_core.config import Params
    from tasks import runtime, tracking
    from tasks.stages import report as report_stage

    dirs = make_store(tmp_path / "stages")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "report-test", tmp_path / "artifacts")
    parent = tracking.start_run(client, experiment, "mammo run", tags={})
    params = Params()
    ctx = runtime.RunContext(store=str(tmp_path / "store"), params=params, params_file="x",
                             tracking_uri=uri, experiment_id=experiment, parent_run_id=parent, flow_run_id="flow",
                             git_commit="deadbeef42")
    upstream = {s: runtime.StageResult(stage=s, key=KEYS[s], path=str(dirs[s]), metrics={}, mlflow_run_id=None,
                                       parent_run_id=None, seconds=0.0, ran=False) for s in report_stage.UPSTREAM}
    assert report_stage.SPEC.params_of(params) == {}
    key = report_stage.SPEC.key(params, {s: KEYS[s] for s in report_stage.UPSTREAM})
    result = runtime.execute(report_stage.SPEC, ctx, key, upstream)

    folder = Path(result.path)
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert "deadbeef42" in md and f"Report stage key: {key}" in md
    assert "| fusion | 0.7125 | 0.5125 | 0.8125 |" in md
    assert json.loads((folder / "manifest.json").read_text())["metrics"]["report/tables"] >= 15
    for run_id in (result.mlflow_run_id, parent):
        logged = {a.path for a in client.list_artifacts(run_id, "report")}
        assert {"report/report.md", "report/report.html", "report/tables", "report/figures"} <= logged
        tables = {a.path for a in client.list_artifacts(run_id, "report/tables")}
        assert "report/tables/table5_classifiers.csv" in tables


def test_the_smoke_reports_first_lines_say_what_was_measured_on_what(smoke_store):
    """The header of a real smoke run's report: data source with counts, every network's initialisation."""
    from mammo_core.sources.weight_sources import resolved_source

    folder = max((p for p in (smoke_store / "stages" / "report").iterdir() if (p / "manifest.json").is_file()),
                 key=lambda p: p.stat().st_mtime)
    md = (folder / "report.md").read_text(encoding="utf-8")
    first, second = md.split("\n## ")[1:3]
    assert first.startswith("What this report measured, and on what")
    assert second.startswith("Verdicts: the paper's comparative claims")
    assert md.index("## What this report measured") < md.index("- [Run: stages")  # before the contents
    curation = json.loads(next((smoke_store / "stages" / "curate").glob("*/curation_report.json")).read_text())
    images, patients = sum(curation["images_per_split"].values()), sum(curation["patients_per_split"].values())
    assert f"Data: the phantom twin (synthetic mammograms generated by this project, not patient data): {images} " \
           f"images of {patients} patients" in first
    assert "Device: cpu" in first and "branches (train): 2 epochs" in first  # params/smoke.yaml
    protocol = json.loads(next((smoke_store / "stages" / "baselines").glob("*/baselines.json")).read_text())[
        "protocol"]
    assert protocol["train_rows"] > 0 and protocol["schedule"]["batch_size"] == 32  # params/smoke.yaml train:
    assert f"single networks (baselines): 2 epochs, batch 32, {protocol['train_rows']} training rows (the train " \
           "section's schedule)" in first  # the branches' schedule, read from what the baselines stage recorded
    assert "the paper's claims on another dataset" in first
    init = pd.read_csv(folder / "tables" / "header_initialisation.csv", keep_default_na=False).set_index("network")
    assert init.loc["Freeze1, Freeze2, Freeze3 (DenseNet-121 branches)", "initialisation"] == "random"
    for network in ("vgg16", "inception_v3", "resnet50", "densenet121"):  # smoke: baselines.weights none
        assert init.loc[network, ["stage", "requested", "initialisation"]].tolist() == ["baselines", "none", "random"]
    r50 = init.loc["frcnn_r50 (Faster R-CNN ResNet-50 FPN)"]
    if r50["sha256"]:  # the ImageNet file is in this machine's torch hub cache: it is named with its digest
        assert resolved_source(r50["file"]) == "sha256:" + r50["sha256"] and r50["initialisation"] == "ImageNet"
    else:
        assert r50["initialisation"].startswith("random (ImageNet requested, no file at ")
    # Tables 4 and 5 hold the single-DenseNet (Freeze3) rows beside the fused ones, each labelled
    s = sections_of(md)
    assert "*Ours, fused features (Freeze1-3): MAP" in s["Table 4"]
    assert "*Ours, single DenseNet (freeze3 features alone" in s["Table 4"]
    assert "*Ours, single DenseNet (freeze3 codes alone" in s["Table 5"]
    single = pd.read_csv(folder / "tables" / "table5_single_freeze3.csv").set_index("classifier")
    assert list(single.index) == ["svm", "knn", "rf", "fusion"]
    assert (single["balanced_acc ci_low"] <= single["balanced_acc"]).all()
    assert len(pd.read_csv(folder / "tables" / "table4_map_single_freeze3.csv")) == 4  # smoke: 12, 24, 32, 48 bits
    latency = pd.read_csv(folder / "tables" / "table6_single_networks.csv").set_index("method")
    assert latency.loc["fusion", "ms/image batch 32"] > 0 and latency.loc["vgg16", "ms/image batch 1"] > 0
    # Table 6 says which shallow layers each single network froze and how many parameters trained
    (baselines_folder,) = (smoke_store / "stages" / "baselines").iterdir()
    for row in json.loads((baselines_folder / "baselines.json").read_text())["rows"]:
        shown = latency.loc[row["network"]]
        assert shown["frozen layers"] == row["frozen_layers"] and shown["train rows"] == row["train_rows"]
        assert shown["frozen params"] == row["frozen_params"] > 0
        assert shown["trainable params"] == row["trainable_params"] > 0
        # intervals from the baselines stage's per-patch predictions (baselines/predictions.csv)
        assert shown["balanced_acc ci_low"] <= shown["balanced_acc"] <= shown["balanced_acc ci_high"]
        assert shown["macro AUC ci_low"] <= shown["macro AUC"] <= shown["macro AUC ci_high"]
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert page.index("<h2>What this report measured") < page.index("<nav>") < page.index("<h2>Run: stages")
    assert "not run in this pipeline version" not in md
