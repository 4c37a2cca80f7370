"""Paired bootstrap of two detectors on the same images, and the saved per-image tables it reads (item 14.5/6)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammo_core.detection import bootstrap, evaluate, records
from mammo_core.evaluation.paired_bootstrap import NotPaired
from mammo_core.reporting import compare as cmp
from mammo_core.reporting import verdicts as vd
from tests.helpers import detection_cases as cases

N = 60  # 30 patients of 2 images


def test_a_clearly_better_detector_has_a_paired_interval_above_zero():
    truth = cases.targets(N)
    weak = cases.detections(truth, [i % 10 < 3 for i in range(N)])  # finds 30 % of the lesions
    strong = cases.detections(truth, [i % 10 != 9 for i in range(N)])  # finds 90 %
    found = bootstrap.paired_detection_differences(weak, strong, truth, 4, cases.patients(N), n_boot=500)
    lesion = found["lesion_ap50"]
    # class-agnostic: each found lesion outranks every false positive, so precision is 1 up to recall r =
    # the fraction found, and COCO's 101-point AP is (100 r + 1) / 101
    assert (lesion.a, lesion.b) == pytest.approx((31 / 101, 91 / 101))
    assert lesion.b == pytest.approx(evaluate.lesion_ap50(strong, truth), abs=1e-12)
    assert found["map50"].b == pytest.approx(evaluate.coco_metrics(strong, truth, cases.CLASSES)["map50"], abs=1e-12)
    assert found["froc_1"].diff == pytest.approx(0.6)
    for metric in ("map50", "lesion_ap50", "froc_1"):
        d = found[metric]
        assert 0 < d.low < d.diff < d.high, metric
        assert d.distinguishable and vd.verdict_of(d) == vd.REPRODUCED
        assert (d.n_items, d.n_patients, d.unit) == (N, N // 2, "images")
    # the other way round: the claim "weak beats strong" is contradicted
    back = bootstrap.paired_detection_differences(strong, weak, truth, 4, cases.patients(N), n_boot=500)
    assert back["map50"].high < 0 and vd.verdict_of(back["map50"]) == vd.CONTRADICTED


def test_identical_detectors_are_not_distinguishable_and_one_more_lesion_is_noise():
    truth = cases.targets(N)
    found = [i % 3 != 0 for i in range(N)]
    same = bootstrap.paired_detection_differences(cases.detections(truth, found), cases.detections(truth, found),
                                                  truth, 4, cases.patients(N), n_boot=300)
    for d in same.values():
        assert d.diff == 0 and d.low == 0 == d.high and not d.distinguishable
        assert vd.verdict_of(d) == vd.NOISE
    one_more = list(found)
    one_more[0] = True
    tiny = bootstrap.paired_detection_differences(cases.detections(truth, found), cases.detections(truth, one_more),
                                                  truth, 4, cases.patients(N), n_boot=300)["lesion_ap50"]
    assert 0 < tiny.diff < 0.03 and tiny.low <= 0 <= tiny.high and vd.verdict_of(tiny) == vd.NOISE


def test_a_pair_is_resampled_by_patient_not_by_image():
    truth = cases.targets(N)
    a = cases.detections(truth, [i % 4 == 0 for i in range(N)])
    b = cases.detections(truth, [i % 2 == 0 for i in range(N)])
    by_image = bootstrap.paired_detection_differences(a, b, truth, 4, None, n_boot=300)["lesion_ap50"]
    by_patient = bootstrap.paired_detection_differences(a, b, truth, 4, cases.patients(N), n_boot=300)["lesion_ap50"]
    assert by_image.diff == by_patient.diff and (by_image.low, by_image.high) != (by_patient.low, by_patient.high)
    assert (by_image.n_patients, by_patient.n_patients) == (N, N // 2)
    with pytest.raises(NotPaired):
        bootstrap.paired_detection_differences(a[:-1], b, truth, 4)


def test_saved_split_tables_read_back_with_keys_and_pair_two_runs_by_image_key(tmp_path):
    truth = cases.targets(12)
    ours = cases.detections(truth, [i % 2 == 0 for i in range(12)])
    other = cases.detections(truth, [True] * 12)
    a = cases.write_detect_folder(tmp_path / "a", {"val": (truth, {"ours": ours}), "test": (truth, {"ours": ours})})
    reversed_order = list(range(12))[::-1]  # run B listed the same images in another order
    b = cases.write_detect_folder(tmp_path / "b", {"test": (truth, {"ours": other})}, order=reversed_order)
    assert {p.name for p in a.glob("*.parquet")} == {f"{s}_{k}.parquet" for s in ("val", "test")
                                                     for k in ("detections", "truth", "images")}
    images = pd.read_parquet(a / "val_images.parquet")
    assert list(images.columns) == records.IMAGE_COLUMNS and set(images["split"]) == {"val"}
    assert images["image_key"].str.len().eq(16).all() and images["patient_key"].nunique() == 6
    rec_a, rec_b = records.read_split(a, "test"), records.read_split(b, "test")
    assert list(rec_a.predictions) == ["ours"] and rec_a.groups.tolist() == cases.patients(12)
    pred_a, pred_b, targets, patients = records.paired_records(rec_a, "ours", rec_b, "ours")
    assert all(len(p["scores"]) == 2 for p in pred_b)  # B's detections, reordered onto A's images
    assert [t["labels"].tolist() for t in targets] == [t["labels"].tolist() for t in truth]
    assert len(set(patients)) == 6
    table, notes = cmp.detector_paired_table(rec_a, rec_b, 4, n_boot=200)
    row = table.set_index(["classifier", "metric"]).loc[("detector ours", "lesion_ap50")]
    assert (row["a"], row["b"], row["diff"]) == pytest.approx((51 / 101, 1.0, 50 / 101)) and row["n_patients"] == 6
    assert any("ours_nohash" in n for n in notes)  # a model neither run saved is named, not invented
    with pytest.raises(FileNotFoundError, match="val_detections.parquet"):
        records.read_split(b, "val")
    shorter = cases.write_detect_folder(tmp_path / "c", {"test": (truth[:10], {"ours": ours[:10]})})
    with pytest.raises(NotPaired, match="2 image\\(s\\) only in A"):
        records.paired_records(rec_a, "ours", records.read_split(shorter, "test"), "ours")
    moved = [dict(t, boxes=t["boxes"] + 5) for t in truth]
    with pytest.raises(NotPaired, match="ground-truth boxes"):
        records.paired_records(rec_a, "ours",
                               records.read_split(cases.write_detect_folder(tmp_path / "d", {"test": (moved, {
                                   "ours": ours})}), "test"), "ours")
    old = records.read_split(a, "test")
    old = records.SplitRecords("test", old.predictions, old.targets, old.groups, [None] * 12, [None] * 12)
    with pytest.raises(NotPaired, match="no unique image keys"):
        records.paired_records(old, "ours", rec_b, "ours")


def test_intervals_from_the_shared_metric_functions_keep_their_values():
    truth = cases.targets(N)
    preds = cases.detections(truth, [i % 5 != 0 for i in range(N)])
    ci = bootstrap.detection_intervals(preds, truth, 4, cases.patients(N), n_boot=200)
    assert ci["lesion_ap50"].value == pytest.approx(81 / 101) and ci["froc_1"].value == pytest.approx(0.8)
    assert ci["lesion_ap50"].low < 81 / 101 < ci["lesion_ap50"].high
    assert np.isfinite([ci[k].low for k in ci]).all()
