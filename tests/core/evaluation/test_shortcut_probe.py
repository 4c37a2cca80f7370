"""The shortcut probe finds a shortcut planted in synthetic patches and stays near chance without one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mammo_core.data.patches import extract_patches
from mammo_core.evaluation import shortcut_probe
from tests.core.data.test_patches import make_curate_dir

SIZE = 16


def _patches(n: int, seed: int, lesion_margin: bool, side_by_class: bool = False):
    """n patches (half NORMAL, half lesion of classes 1-3) of the same noisy tissue, two per patient.

    ``lesion_margin``: lesion patches get a black band (as zero padding made them); ``side_by_class``: the
    crop side before resizing grows with the class (a scale shortcut to the task classes).
    """
    rng = np.random.default_rng(seed)
    y = np.where(np.arange(n) % 2 == 0, 0, 1 + (np.arange(n) // 2) % 3)
    images = np.clip(rng.normal(120, 30, (n, SIZE, SIZE)) + rng.normal(0, 10, (n, 1, 1)), 1, 255).astype(np.uint8)
    padded = np.zeros(n)
    if lesion_margin:
        lesion = y > 0
        images[lesion, :, :4] = 0
        padded[lesion] = 4 / SIZE
    sides = rng.choice([32, 48, 64, 96], n).astype(np.float64)
    if side_by_class:
        sides = 32.0 + 16 * y + rng.integers(0, 4, n)
    boxes = np.column_stack([np.zeros(n), np.zeros(n), sides, sides])
    stats = shortcut_probe.patch_statistics(images, boxes, padded)
    split = np.where(np.arange(n) < n // 2, 0, 2)  # first half train, second half test (patients disjoint)
    groups = np.array([f"P_{i // 2}" for i in range(n)])
    return stats, y, split, groups


def _rows(stats, y, split, groups, target):
    return {r["model"]: r for r in shortcut_probe.fit_and_score(stats, y, split, groups, target, n_boot=200)}


def test_statistics_measure_padding_black_pixels_intensity_and_side():
    images = np.full((2, 4, 4), 100, dtype=np.uint8)
    images[1, :, :1] = 0
    stats = shortcut_probe.patch_statistics(images, np.array([[0, 0, 40, 40], [-5, 0, 35, 40]]), np.array([0, 0.125]))
    assert stats.shape == (2, len(shortcut_probe.FEATURES))
    assert stats[:, 0].tolist() == [0, 0.125] and stats[:, 1].tolist() == [0, 0.25]
    assert stats[:, 2].tolist() == [100, 75] and stats[0, 3] == 0 and stats[1, 3] > 40
    assert stats[:, 4].tolist() == [40, 40]


def test_probe_finds_a_planted_padding_shortcut():
    stats, y, split, groups = _patches(400, seed=1, lesion_margin=True)
    for name, row in _rows(stats, (y > 0).astype(np.int64), split, groups, "lesion_vs_normal").items():
        assert row["test_acc"] > 0.95 and row["balanced_acc"] > 0.95, name
        assert row["test_acc_ci_low"] > 0.9 and row["test_acc_ci_low"] <= row["test_acc"] <= row["test_acc_ci_high"]
        assert row["n_train"] == row["n_test"] == 200


def test_probe_finds_a_planted_scale_shortcut_to_the_task_classes():
    stats, y, split, groups = _patches(400, seed=2, lesion_margin=False, side_by_class=True)
    rows = _rows(stats, y, split, groups, "task_classes")
    assert rows["tree_depth3"]["balanced_acc"] > 0.95
    assert rows["logistic_regression"]["balanced_acc"] > 0.8  # linear in the side: the classes are ordered
    assert rows["tree_depth3"]["chance_balanced_acc"] == 0.25


def test_probe_stays_near_chance_without_a_shortcut():
    stats, y, split, groups = _patches(600, seed=3, lesion_margin=False)
    for target, labels, chance in (("lesion_vs_normal", (y > 0).astype(np.int64), 0.5), ("task_classes", y, 0.25)):
        for name, row in _rows(stats, labels, split, groups, target).items():
            assert abs(row["balanced_acc"] - chance) < 0.1, (target, name, row["balanced_acc"])
            assert row["balanced_acc_ci_low"] < chance + 0.05, (target, name)


def test_a_target_with_one_training_class_is_reported_not_raised():
    stats, y, split, groups = _patches(40, seed=4, lesion_margin=True)
    rows = _rows(stats, np.zeros_like(y), split, groups, "lesion_vs_normal")
    assert all(r["test_acc"] is None and "fewer than two classes" in r["note"] for r in rows.values())


def test_probe_of_a_patches_file_summarises_padding_per_kind(tmp_path):
    folder = make_curate_dir(tmp_path / "curate")
    out = tmp_path / "p.h5"
    summary = extract_patches(folder, out, size=32, normals_per_image=3)
    probe = shortcut_probe.probe_patches_file(out, summary.class_names, n_boot=50)
    json.dumps(probe)  # what the stage writes: plain JSON
    padding = probe["padding"]
    assert padding["lesion"]["all"]["n"] == 5 and padding["NORMAL"]["all"]["n"] == sum(
        c["NORMAL"] for c in summary.counts.values())
    assert padding["lesion"]["all"]["max"] == 0.0 and padding["NORMAL"]["all"]["max"] == 0.0  # all shifted inside
    assert {(r["target"], r["model"]) for r in probe["rows"]} == {
        (t, m) for t in ("lesion_vs_normal", "task_classes") for m in ("logistic_regression", "tree_depth3")}
    assert probe["features"] == list(shortcut_probe.FEATURES)
    assert {r["features"] for r in probe["rows"]} == set(shortcut_probe.FEATURE_SETS) and len(probe["rows"]) == 8
    from mlflow.utils.validation import validate_param_and_metric_name

    from tasks.stages.patches import probe_metrics

    tracked = probe_metrics(probe)  # one metric per row and score, every name one MLflow accepts
    assert len([k for k in tracked if k.startswith("patches/probe/")]) == 16
    assert all(validate_param_and_metric_name(k) for k in tracked), sorted(tracked)
    assert tracked["patches/padded_over_5pct/lesion"] == 0.0


def test_no_bootstrap_gives_no_interval():
    stats, y, split, groups = _patches(100, seed=5, lesion_margin=True)
    row = shortcut_probe.fit_and_score(stats, (y > 0).astype(np.int64), split, groups, "lesion_vs_normal",
                                       n_boot=0)[0]
    assert row["test_acc"] > 0.9 and row["test_acc_ci_low"] is None


def test_padded_pixels_are_distributed_alike_for_lesion_and_normal_patches_of_the_smoke_run(smoke_store):
    from scipy.stats import ks_2samp

    from mammo_core.storage import h5io

    (folder,) = [p.parent for p in (smoke_store / "stages" / "patches").glob("*/manifest.json")]
    data = h5io.read_datasets(folder / "patches.h5", ["labels", "padded_fraction", "images"])
    lesion = data["labels"] != 0
    padded = data["padded_fraction"].astype(np.float64)
    assert lesion.sum() >= 20 and (~lesion).sum() >= 20
    for rows in (lesion, ~lesion):  # the old policy padded lesion crops leaving the image, never NORMAL ones
        assert (padded[rows] > shortcut_probe.PADDING_THRESHOLD).mean() < 0.02
    assert abs(padded[lesion].mean() - padded[~lesion].mean()) < 0.005
    assert ks_2samp(padded[lesion], padded[~lesion]).statistic < 0.1
    probe = json.loads((folder / "shortcut_probe.json").read_text(encoding="utf-8"))
    summary = probe["padding"]
    assert summary["lesion"]["all"]["n"] == int(lesion.sum()) and summary["NORMAL"]["all"]["n"] == int((~lesion).sum())
    assert summary["lesion"]["all"]["mean"] == pytest.approx(padded[lesion].mean(), abs=1e-6)
    assert {r["target"] for r in probe["rows"]} == {"lesion_vs_normal", "task_classes"}
