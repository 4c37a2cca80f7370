"""The report's shortcut-probe section: the probe's numbers as the patches stage wrote them, the CNNs beside."""

from __future__ import annotations

import json
from pathlib import Path

from mammo_core.reporting.report import build_report
from tests.core.reporting.test_report import KEYS, make_store, sections_of

SECTION = "Shortcut probe"


def _row(target: str, model: str, acc: float, low: float, high: float, bal: float, bal_low: float,
         bal_high: float, chance: float, features: str = "cut") -> dict:
    return {"target": target, "model": model, "features": features, "test_acc": acc, "test_acc_ci_low": low,
            "test_acc_ci_high": high,
            "balanced_acc": bal, "balanced_acc_ci_low": bal_low, "balanced_acc_ci_high": bal_high,
            "chance_balanced_acc": chance, "majority_rate": 0.5, "n_test": 18, "n_train": 64}


PROBE = {
    "features": ["padded_fraction", "black_fraction", "mean_intensity", "std_intensity", "crop_side"],
    "protocol": "fit on the train split, scored on the test split; 95% interval of a patient bootstrap",
    "rows": [_row("lesion_vs_normal", "logistic_regression", 0.8125, 0.6875, 0.9375, 0.8, 0.7, 0.9, 0.5),
             _row("lesion_vs_normal", "tree_depth3", 0.5625, 0.375, 0.6875, 0.55, 0.4, 0.7, 0.5),
             _row("lesion_vs_normal", "tree_depth3", 0.625, 0.5625, 0.6875, 0.6, 0.55, 0.65, 0.5, "cut+intensity"),
             _row("task_classes", "logistic_regression", 0.3125, 0.1875, 0.4375, 0.3, 0.2, 0.45, 1 / 3),
             {"target": "task_classes", "model": "tree_depth3", "features": "cut", "test_acc": None,
              "note": "fewer than two classes among the training patches"}],
    "padding": {"lesion": {"test": {"n": 18, "mean": 0.0125, "share_over_5pct": 1 / 18, "max": 0.2},
                           "train": {"n": 33, "mean": 0.0, "share_over_5pct": 0.0, "max": 0.0}},
                "NORMAL": {"train": {"n": 31, "mean": 0.0, "share_over_5pct": 0.0, "max": 0.0}}},
}


def _report(tmp_path: Path, probe: dict | None) -> str:
    dirs = make_store(tmp_path / "stages")
    if probe is not None:
        (dirs["patches"] / "shortcut_probe.json").write_text(json.dumps(probe), encoding="utf-8")
    build_report(dirs, tmp_path / "report", {})
    return sections_of((tmp_path / "report" / "report.md").read_text(encoding="utf-8"))[SECTION]


def test_probe_rows_and_cnn_rows_come_out_as_written_with_their_sources(tmp_path):
    text = _report(tmp_path, PROBE)
    # target, method, acc, CI, balanced acc, its CI, chance, majority rate, n_test, source
    assert ("| lesion vs NORMAL | probe: logistic_regression on cut statistics | 0.8125 | 0.6875 | 0.9375 | 0.8 "
            "| 0.7 | 0.9 | 0.5 | 0.5 | 18 | patches/shortcut_probe.json |") in text
    assert "| task classes | probe: tree_depth3 on cut statistics |" in text and "fewer than two classes" in text
    # the CNNs beside: fused classifier with its CI, the branches, the single networks with theirs
    assert ("| task classes | CNN: fused SVM+kNN+RF on hash codes | 0.7125 | 0.5125 | 0.8125 | 0.67 |"
            in text)
    assert "| task classes | CNN: freeze3 (own head) | 0.5625 |" in text
    assert "| task classes | CNN: resnet50 | 0.625 | 0.4375 | 0.75 | 0.6 |" in text
    for name in ("patches/shortcut_probe.json", "classify/table5_classifiers.csv", "train/manifest.json",
                 "baselines/baselines.json"):
        assert f"Source: {name} (key {KEYS[name.split('/')[0]]}" in text, name
    # verdicts: lesion vs NORMAL is predicted above chance (0.7 > 0.5) from the cut alone: a shortcut; with
    # intensity (0.55 > 0.5) a flag; the task classes are not (0.2 < 1/3)
    assert ("**Warning:** lesion vs NORMAL, cut statistics: the probe predicts it above chance (0.5) on test, "
            "balanced accuracy logistic_regression 0.8 [0.7, 0.9]: part of a CNN's accuracy") in text
    assert "tree_depth3 0.55" not in text
    assert ("**Warning:** lesion vs NORMAL, cut+intensity statistics: the probe predicts it above chance (0.5) on "
            "test, balanced accuracy tree_depth3 0.6 [0.55, 0.65]: a CNN may take the same route") in text
    assert "task classes, cut statistics: no probe's balanced-accuracy interval lies above chance (0.3333)" in text
    assert "| NORMAL | train | 31 | 0 | 0 | 0 |" in text
    assert text.index("| lesion | train | 33 |") < text.index("| lesion | test | 18 | 0.0125 | 0.0556 | 0.2 |")


def test_a_run_without_the_probe_artifact_says_it_is_missing(tmp_path):
    text = _report(tmp_path, None)
    assert "**Missing:** patches/shortcut_probe.json is missing" in text
    assert "| CNN:" not in text
