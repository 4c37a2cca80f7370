"""Verdicts on the paper's claims: the rule on synthetic predictions, then through the report on fake stage folders."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from mammo_core.evaluation import metrics
from mammo_core.evaluation.paired_bootstrap import paired_mean_difference, paired_metric_difference
from mammo_core.reporting import verdicts as vd
from mammo_core.reporting.report import build_report
from tests.core.reporting.test_report import CLASSES, KEYS, _reseal, _write_json, make_store, sections_of

N_PATIENTS, PER_PATIENT = 40, 3
N = N_PATIENTS * PER_PATIENT


def _labels() -> tuple[np.ndarray, np.ndarray]:
    y = np.random.default_rng(3).integers(0, len(CLASSES), N)
    groups = np.repeat([f"P{i:03d}" for i in range(N_PATIENTS)], PER_PATIENT)
    return y, groups


def _right_where(y: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Predictions equal to ``y`` where ``right`` is True, a wrong class elsewhere."""
    return np.where(right, y, (y + 1) % len(CLASSES))


def test_a_clear_win_is_reproduced_a_clear_loss_contradicted_and_a_tiny_difference_noise():
    y, groups = _labels()
    idx = np.arange(N)
    strong, weak = _right_where(y, idx % 5 != 4), _right_where(y, idx % 5 < 2)  # 80 % vs 40 % right
    win = paired_metric_difference(y, weak, strong, groups)  # claim: strong beats weak
    assert win.diff == pytest.approx(0.4) and win.low > 0
    assert vd.verdict_of(win) == vd.REPRODUCED
    loss = paired_metric_difference(y, strong, weak, groups)  # claim: weak beats strong
    assert loss.high < 0 and vd.verdict_of(loss) == vd.CONTRADICTED
    almost = strong.copy()
    almost[np.flatnonzero(idx % 5 == 4)[0]] = y[np.flatnonzero(idx % 5 == 4)[0]]  # one more patch right
    tiny = paired_metric_difference(y, strong, almost, groups)
    assert tiny.diff == pytest.approx(1 / N) and tiny.low <= 0 <= tiny.high
    assert vd.verdict_of(tiny) == vd.NOISE
    assert vd.verdict_of(None) == vd.NOT_TESTED


def test_a_claim_of_several_parts_needs_every_part():
    R, C, Z, T = vd.REPRODUCED, vd.CONTRADICTED, vd.NOISE, vd.NOT_TESTED
    assert vd.combined([R, R]) == R
    assert vd.combined([R, C, Z]) == C
    assert vd.combined([R, Z]) == Z
    assert vd.combined([R, T]) == T  # "every branch" is not shown when one branch was not tested
    assert vd.combined([]) == T


def test_per_query_scores_pair_by_patient_and_skip_undefined_items():
    _, groups = _labels()
    a = np.full(N, 0.5)
    b = a + 0.25
    b[0] = np.nan  # undefined for one query: left out of both means
    d = paired_mean_difference(a, b, groups, "MAP")
    assert d.n_items == N - 1 and d.diff == pytest.approx(0.25)
    assert d.low == pytest.approx(0.25) and d.high == pytest.approx(0.25)
    assert vd.verdict_of(d) == vd.REPRODUCED


def test_unpaired_intervals_and_timings_follow_their_stated_rules():
    assert vd.interval_comparison("a", "b", "mAP", 0.5, 0.3, (0.45, 0.55), (0.2, 0.4), "x").verdict == vd.REPRODUCED
    assert vd.interval_comparison("a", "b", "mAP", 0.3, 0.5, (0.2, 0.4), (0.45, 0.55), "x").verdict == \
        vd.CONTRADICTED
    assert vd.interval_comparison("a", "b", "mAP", 0.5, 0.45, (0.4, 0.6), (0.35, 0.5), "x").verdict == vd.NOISE
    assert vd.interval_comparison("a", "b", "mAP", 0.5, 0.45, None, (0.35, 0.5), "x").verdict == vd.NOT_TESTED
    assert vd.speed_comparison("a", "b", 40.0, 120.0, "x").verdict == vd.REPRODUCED
    assert vd.speed_comparison("a", "b", 150.0, 120.0, "x").verdict == vd.CONTRADICTED
    assert vd.speed_comparison("a", "b", 118.0, 120.0, "x").verdict == vd.NOISE


# ------------------------------------------------------------------------------- through the report


def _proba(pred: np.ndarray) -> np.ndarray:
    proba = np.full((len(pred), len(CLASSES)), 0.1)
    proba[np.arange(len(pred)), pred] = 0.8
    return proba


def add_predictions(dirs: dict[str, Path], freeze3_fusion: bool = True) -> dict[str, np.ndarray]:
    """Per-patch test predictions in the stages' formats, with known right/wrong patterns (see below)."""
    y, groups = _labels()
    idx = np.arange(N)
    ids = np.array([f"{g}_patch_{i}" for i, g in enumerate(groups)])
    preds = {
        "fusion": _right_where(y, idx % 5 != 4),  # 80 %
        "freeze1": _right_where(y, idx % 5 < 3),  # 60 %: fusion beats it
        "freeze2": _right_where(y, idx % 5 == 0),  # 20 %: freeze1 beats it
        "freeze3": _right_where(y, idx % 5 == 0),  # same as freeze2: no difference
        "svm": _right_where(y, (idx % 5 != 4) & (idx != 0)),  # one patch worse than fusion: noise
        "knn": _right_where(y, idx % 5 != 4),  # equal to fusion
        "rf": y.copy(),  # 100 %: contradicts "fusion beats each classifier"
        "Freeze1+Freeze2+Freeze3": _right_where(y, idx % 5 != 4),  # the three branches under the X rows' head
        "Freeze3": _right_where(y, idx % 5 == 0),
        "Freeze3+VGG16": _right_where(y, idx % 5 == 0),  # the three-branch row clearly better
        "Freeze3+ResNet50": y.copy(),  # fusion clearly worse
        "vgg16": _right_where(y, idx % 3 != 0),
    }
    with h5py.File(dirs["patches"] / "patches.h5", "w") as fh:
        fh["split"] = np.full(N, 2, dtype=np.int8)
        fh["source_id"] = ids.astype("S")
        fh["patient_id"] = groups.astype("S")
        fh["labels"] = y
    _reseal(dirs["patches"], "patches")
    with h5py.File(dirs["train"] / "predictions.h5", "w") as fh:
        fh.attrs["class_names"] = json.dumps(CLASSES)
        fh["test/labels"] = y
        for b in ("freeze1", "freeze2", "freeze3"):
            fh[f"test/{b}/predictions"] = preds[b]
            fh[f"test/{b}/probabilities"] = _proba(preds[b])
    _reseal(dirs["train"], "train")
    parts = []
    for name in ("fusion", "svm", "knn", "rf"):
        frame = pd.DataFrame({"split": "test", "classifier": name, "source_id": ids, "patient_id": groups,
                              "label": y, "predicted": preds[name]})
        for i, c in enumerate(CLASSES):
            frame[f"proba/{c}"] = _proba(preds[name])[:, i]
        parts.append(frame)
    pd.concat(parts).to_csv(dirs["classify"] / "predictions.csv", index=False)
    _reseal(dirs["classify"], "classify")
    if freeze3_fusion:
        rows, frames = [], []
        for name in ("Freeze1+Freeze2+Freeze3", "Freeze3", "Freeze3+VGG16", "Freeze3+ResNet50"):
            p = preds[name]
            rows.append({"name": name, "accuracy": metrics.ACCURACY(y, p), "accuracy_ci": [0.1, 0.3],
                         "balanced_accuracy": metrics.BALANCED_ACCURACY(y, p), "macro_auc": 0.6, "n_test": N})
            frame = pd.DataFrame({"name": name, "patch_id": ids, "patient_id": groups, "y_true": y, "y_pred": p})
            for i, c in enumerate(CLASSES):
                frame[f"proba_{c}"] = _proba(p)[:, i]
            frames.append(frame)
        vgg = pd.DataFrame({"name": "vgg16", "patch_id": ids, "patient_id": groups, "y_true": y,
                            "y_pred": preds["vgg16"]})
        for i, c in enumerate(CLASSES):
            vgg[f"proba_{c}"] = _proba(preds["vgg16"])[:, i]
        vgg.to_csv(dirs["baselines"] / "predictions.csv", index=False)
        _write_json(dirs["baselines"] / "freeze3_fusion.json", rows)
        pd.concat(frames).to_csv(dirs["baselines"] / "freeze3_fusion_predictions.csv", index=False)
        _reseal(dirs["baselines"], "baselines")
    return {"y": y, "groups": groups, **preds}


def _verdicts(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    md = (out / "report.md").read_text(encoding="utf-8")
    summary = pd.read_csv(out / "tables" / "verdicts_summary.csv").set_index("paper claim")["verdict"]
    parts = pd.read_csv(out / "tables" / "verdicts.csv")
    return summary, parts, md


def test_the_report_opens_with_verdicts_computed_from_the_saved_predictions(tmp_path):
    dirs = make_store(tmp_path / "stages")
    known = add_predictions(dirs)
    build_report(dirs, tmp_path / "report", {})
    summary, parts, md = _verdicts(tmp_path / "report")
    assert summary["fusion beats every branch"] == vd.REPRODUCED
    part = parts.set_index("comparison")
    assert part.loc["fusion - freeze1", "verdict"] == vd.REPRODUCED
    assert part.loc["fusion - freeze1", "difference"] == pytest.approx(0.2)
    assert part.loc["fusion - freeze1", "patients"] == N_PATIENTS
    assert part.loc["freeze1 - freeze2", "verdict"] == vd.REPRODUCED
    assert part.loc["freeze2 - freeze3", "verdict"] == vd.NOISE
    assert summary["Freeze1 > Freeze2 > Freeze3"] == vd.NOISE
    assert part.loc["fusion - svm", "verdict"] == vd.NOISE
    assert part.loc["fusion - rf", "verdict"] == vd.CONTRADICTED
    assert summary["classifier fusion beats each classifier"] == vd.CONTRADICTED
    f3 = parts[parts["paper claim"] == "three-branch fusion beats Freeze3 + another network"].set_index("comparison")
    assert list(f3.index) == ["Freeze1+Freeze2+Freeze3 - Freeze3+VGG16", "Freeze1+Freeze2+Freeze3 - Freeze3+ResNet50"]
    assert f3.filter(like="Freeze3+VGG16", axis=0)["verdict"].item() == vd.REPRODUCED
    assert f3.filter(like="Freeze3+ResNet50", axis=0)["verdict"].item() == vd.CONTRADICTED
    assert summary["divide-and-encode beats FC at every q"] == vd.NOT_TESTED  # no hashing/codes.h5 here
    # detection.json has no bootstrap interval: the accuracy half is not tested, the speed half is measured
    det = parts[parts["paper claim"].str.contains("detector")].set_index("metric")
    assert det.loc["mAP@0.5", "verdict"] == vd.NOT_TESTED
    assert det.filter(like="latency", axis=0)["verdict"].item() == vd.REPRODUCED
    assert summary["our detector is faster and more accurate than Faster R-CNN"] == vd.NOT_TESTED
    # fusion - freeze1 matches an independent count on the known predictions
    y = known["y"]
    assert part.loc["fusion - freeze1", "claimed better (ours)"] == pytest.approx(np.mean(known["fusion"] == y))
    # the verdicts come before the table of contents and every provenance table
    assert md.index("## What this report measured") < md.index("## Verdicts") < md.index("- [Run: stages")
    assert md.index("## Verdicts") < md.index("## Run: stages")
    assert f"Source: classify/predictions.csv (key {KEYS['classify']}" in sections_of(md)["Verdicts"]
    # a single network's intervals come from the baselines stage's per-patch predictions when it saves them
    t1 = pd.read_csv(tmp_path / "report" / "tables" / "table1_methods.csv").set_index("method")
    low, high = metrics.bootstrap_ci(metrics.BALANCED_ACCURACY, y, known["vgg16"], None, known["groups"],
                                     n_boot=200, seed=0)
    assert (t1.loc["vgg16", "balanced_acc ci_low"], t1.loc["vgg16", "balanced_acc ci_high"]) == (low, high)
    assert np.isnan(t1.loc["resnet50", "balanced_acc ci_low"])  # no predictions of it in the file
    # Table 6 shows the Freeze3 + X rows with intervals computed from their predictions
    t6 = pd.read_csv(tmp_path / "report" / "tables" / "table6_single_networks.csv").set_index("method")
    assert t6.loc["Freeze3+ResNet50", "balanced_acc"] == pytest.approx(1.0)
    assert t6.loc["Freeze3+ResNet50", "macro AUC ci_low"] == pytest.approx(1.0)  # from its proba_<class> columns
    assert t6.loc["Freeze3", "kind"] == "same head as the Freeze3 + X rows (section 4.7)"
    assert t6.loc["Freeze3+VGG16", "test_acc"] == pytest.approx(np.mean(known["Freeze3+VGG16"] == y))


def test_intervals_beside_accuracy_are_the_patient_bootstrap_of_the_saved_predictions(tmp_path):
    dirs = make_store(tmp_path / "stages")
    known = add_predictions(dirs, freeze3_fusion=False)
    build_report(dirs, tmp_path / "report", {})
    y, groups = known["y"], known["groups"]
    t5 = pd.read_csv(tmp_path / "report" / "tables" / "table5_classifiers.csv").set_index("classifier")
    low, high = metrics.bootstrap_ci(metrics.BALANCED_ACCURACY, y, known["knn"], None, groups, n_boot=200, seed=0)
    assert (t5.loc["knn", "balanced_acc ci_low"], t5.loc["knn", "balanced_acc ci_high"]) == (low, high)
    assert low < metrics.BALANCED_ACCURACY(y, known["knn"]) < high
    low, high = metrics.bootstrap_ci(metrics.AUC_OVR_MACRO, y, known["knn"], _proba(known["knn"]), groups,
                                     n_boot=200, seed=0)
    assert (t5.loc["knn", "macro AUC ci_low"], t5.loc["knn", "macro AUC ci_high"]) == (low, high)
    t7 = pd.read_csv(tmp_path / "report" / "tables" / "table7_branches.csv").set_index("model")
    assert t7.loc["freeze2", "balanced_acc"] == pytest.approx(metrics.BALANCED_ACCURACY(y, known["freeze2"]))
    auc = t7.loc["freeze2", ["macro AUC ci_low", "macro AUC", "macro AUC ci_high"]].to_numpy()
    assert auc[0] < auc[1] < auc[2]
    summary, parts, md = _verdicts(tmp_path / "report")
    assert summary["three-branch fusion beats Freeze3 + another network"] == vd.NOT_TESTED
    assert "the baselines stage wrote no freeze3_fusion.json" in md


def test_the_detector_claim_reads_the_detect_stages_bootstrap_intervals(tmp_path):
    dirs = make_store(tmp_path / "stages")
    det = json.loads((dirs["detect"] / "detection.json").read_text(encoding="utf-8"))
    intervals = {"ours": (0.40, 0.47), "ours_nohash": (0.3, 0.5), "frcnn_r50": (0.25, 0.35)}
    for row in det["rows"]:
        low, high = intervals[row["model"]]
        row["ci95"] = {"map50": {"value": row["map50"], "low": low, "high": high}}
    det["latency_threads"], det["latency_omp_wait"] = 2, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}
    det["latency_ratio_vs_r50_1_thread"] = 0.4567
    next(row for row in det["rows"] if row["model"] == "ours")["latency_branch_workers"] = 2
    _write_json(dirs["detect"] / "detection.json", det)
    _reseal(dirs["detect"], "detect")
    build_report(dirs, tmp_path / "report", {})
    summary, parts, _ = _verdicts(tmp_path / "report")
    assert summary["our detector is faster and more accurate than Faster R-CNN"] == vd.REPRODUCED
    row = parts.set_index("metric").loc["mAP@0.5"]
    assert (row["claimed better (ours)"], row["other (ours)"]) == (0.4375, 0.3125)
    assert "ours [0.4000, 0.4700], frcnn_r50 [0.2500, 0.3500]" in row["from"]
    speed = parts.set_index("metric").filter(like="latency", axis=0)["from"].item()
    # what moves a CPU latency is said
    assert "2 threads, OMP_WAIT_POLICY=PASSIVE, ours on 2 one-thread workers, on 1 thread 0.46)" in speed
    det["device"] = "cuda:0"  # on a GPU neither applies, and the verdict does not claim them
    _write_json(dirs["detect"] / "detection.json", det)
    _reseal(dirs["detect"], "detect")
    build_report(dirs, tmp_path / "report_gpu", {})
    _, parts, _ = _verdicts(tmp_path / "report_gpu")
    speed = parts.set_index("metric").filter(like="latency", axis=0)["from"].item()
    assert "latency_ms (measured side by side in one process)" in speed


@pytest.mark.parametrize("ours_finds, verdict", [("90 %", vd.REPRODUCED), ("the same", vd.NOISE)])
def test_the_detector_claim_is_a_paired_bootstrap_over_the_saved_test_detections(tmp_path, ours_finds, verdict):
    """With the detect stage's per-image test tables, ours - frcnn_r50 is paired over test patients."""
    from mammo_core.detection import records
    from tests.helpers import detection_cases as cases

    n = 40
    truth = cases.targets(n)
    r50_found = [i % 10 < 3 for i in range(n)]  # 30 % of the lesions
    ours_found = [i % 10 != 9 for i in range(n)] if ours_finds == "90 %" else r50_found
    dirs = make_store(tmp_path / "stages")
    det = json.loads((dirs["detect"] / "detection.json").read_text(encoding="utf-8"))
    det["classes"] = cases.CLASSES
    _write_json(dirs["detect"] / "detection.json", det)
    records.write_split(dirs["detect"], "test", {"ours": cases.detections(truth, ours_found),
                                                 "frcnn_r50": cases.detections(truth, r50_found)},
                        cases.items(truth, "test"))
    _reseal(dirs["detect"], "detect")
    build_report(dirs, tmp_path / "report", {})
    summary, parts, md = _verdicts(tmp_path / "report")
    claim = "our detector is faster and more accurate than Faster R-CNN"
    assert summary[claim] == verdict  # the speed half is reproduced (41.25 vs 123.5 ms) in both cases
    part = parts[parts["paper claim"] == claim].set_index("metric")
    assert list(part.index[:3]) == ["mAP@0.5", "lesion AP@0.5 (any class)", "FROC sensitivity @1 FP/img"]
    assert part.filter(like="latency", axis=0)["verdict"].item() == vd.REPRODUCED
    lesion = part.loc["lesion AP@0.5 (any class)"]
    expected = 91 / 101 if ours_finds == "90 %" else 31 / 101
    assert (lesion["claimed better (ours)"], lesion["other (ours)"]) == pytest.approx((expected, 31 / 101))
    assert lesion["patients"] == n // 2 and "test_detections.parquet" in lesion["from"]
    assert "paired bootstrap over test patients" in lesion["from"]
    for metric in ("mAP@0.5", "lesion AP@0.5 (any class)", "FROC sensitivity @1 FP/img"):
        row = part.loc[metric]
        assert row["verdict"] == verdict, metric
        if verdict == vd.REPRODUCED:
            assert 0 < row["CI low"] < row["difference"] < row["CI high"], metric
        else:
            assert row["difference"] == row["CI low"] == row["CI high"] == 0, metric
    assert "Source: detect/test_detections.parquet" in md
