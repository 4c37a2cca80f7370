"""Patch extraction on a small synthetic curate folder whose lesions and breast are known exactly."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammo_core.data import patches
from mammo_core.data.patches import extract_patches, lesion_crop_box
from mammo_core.storage import h5io

CACHE_H, CACHE_W = 200, 160
SCALE = 0.5  # full resolution is twice the cache
CLASSES = ["NORMAL", "MASS_BENIGN", "MASS_BENIGN_WITHOUT_CALLBACK", "MASS_MALIGNANT", "CALC_BENIGN",
           "CALC_BENIGN_WITHOUT_CALLBACK", "CALC_MALIGNANT"]
# image_id -> (patient, split, [(lesion_id, label, cache box x0 y0 x1 y1)])
LAYOUT = {
    "P_1_LEFT_CC": ("P_1", "train", [("P_1_LEFT_CC_MASS_1", 1, (60, 80, 80, 100))]),
    "P_1_LEFT_MLO": ("P_1", "train", [("P_1_LEFT_MLO_MASS_1", 3, (10, 2, 30, 14)),  # at the top edge
                                      ("P_1_LEFT_MLO_CALC_1", 4, (50, 120, 90, 170))]),
    "P_2_RIGHT_CC": ("P_2", "val", [("P_2_RIGHT_CC_CALC_1", 6, (40, 40, 50, 50))]),
    "P_3_LEFT_CC": ("P_3", "test", [("P_3_LEFT_CC_MASS_1", 2, (70, 60, 110, 84))]),
}


def _breast(shape=(CACHE_H, CACHE_W)) -> np.ndarray:
    """Half ellipse on the chest wall (x = 0), like a CC view."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx / 140.0) ** 2 + ((yy - 100) / 115.0) ** 2 <= 1.0


def _image(boxes, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:CACHE_H, :CACHE_W].astype(np.float64)
    image = np.where(_breast(), 20000.0 + rng.normal(0, 300, (CACHE_H, CACHE_W)), 0.0)
    for x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2 - 0.5, (y0 + y1) / 2 - 0.5  # symmetric about the box (exclusive ends)
        sigma = max(2.0, min(x1 - x0, y1 - y0) / 5)
        image += 40000.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return np.clip(image, 0, 65535).astype(np.uint16)


def make_curate_dir(root, layout=LAYOUT, n_lesions_extra: dict | None = None):
    """A curate-like folder: images.parquet, lesions.parquet, curation_report.json and the PNG cache."""
    (root / "cache" / "images").mkdir(parents=True)
    image_rows, lesion_rows = [], []
    for k, (image_id, (patient, split, lesions)) in enumerate(layout.items()):
        Image.fromarray(_image([b for _, _, b in lesions], seed=k)).save(root / "cache" / "images" / f"{image_id}.png")
        image_rows.append({
            "image_id": image_id, "patient_id": patient, "split": split,
            "height": int(CACHE_H / SCALE), "width": int(CACHE_W / SCALE), "cache_height": CACHE_H,
            "cache_width": CACHE_W, "cache_path": f"images/{image_id}.png", "scale": SCALE,
            "n_lesions": len(lesions) + (n_lesions_extra or {}).get(image_id, 0),
        })
        for lesion_id, label, box in lesions:
            full = [int(v / SCALE) for v in box]
            lesion_rows.append({
                "lesion_id": lesion_id, "image_id": image_id, "patient_id": patient, "split": split,
                "label": label, "class_name": CLASSES[label] if label < len(CLASSES) else "?", "boxes": [full],
                "x0": full[0], "y0": full[1], "x1": full[2], "y1": full[3],
            })
    pd.DataFrame(image_rows).to_parquet(root / "images.parquet")
    pd.DataFrame(lesion_rows).to_parquet(root / "lesions.parquet")
    (root / "curation_report.json").write_text(json.dumps({"classes": CLASSES}))
    return root


@pytest.fixture
def curate_dir(tmp_path):
    return make_curate_dir(tmp_path / "curate")


def _read(path):
    data = h5io.read_datasets(path)
    for key in ("source_id", "patient_id", "image_id"):
        data[key] = h5io.decode_strings(data[key])
    return data


def _bright_centre(patch: np.ndarray) -> tuple[float, float]:
    weights = np.clip(patch.astype(np.float64) - np.percentile(patch, 90), 0, None)
    yy, xx = np.mgrid[: patch.shape[0], : patch.shape[1]]
    return float((yy * weights).sum() / weights.sum()), float((xx * weights).sum() / weights.sum())


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_lesion_patch_is_centred_on_its_lesion(curate_dir, tmp_path):
    out = tmp_path / "patches.h5"
    extract_patches(curate_dir, out, size=64, context=0.25, min_size_px=32, normals_per_image=0)
    data = _read(out)
    row = data["source_id"].index("P_1_LEFT_CC_MASS_1")
    assert data["box"][row].tolist() == [54, 74, 86, 106]  # 20 px box -> 30 px with context -> 32 minimum
    cy, cx = _bright_centre(data["images"][row, 0])
    assert abs(cy - 31.5) < 1.0 and abs(cx - 31.5) < 1.0
    assert data["images"][row, 0, 31:33, 31:33].min() >= 250  # the blob is the brightest thing in its breast


def test_context_margin_sets_the_crop_side(curate_dir, tmp_path):
    out = tmp_path / "patches.h5"
    extract_patches(curate_dir, out, size=32, context=0.5, min_size_px=8, normals_per_image=0)
    data = _read(out)
    box = data["box"][data["source_id"].index("P_1_LEFT_MLO_CALC_1")]  # 40 x 50 lesion box
    assert box[2] - box[0] == box[3] - box[1] == 100  # 50 * (1 + 2 * 0.5)
    assert ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2) == (70, 145)


def test_lesion_at_the_image_edge_is_shifted_inside_without_padding(curate_dir, tmp_path):
    out = tmp_path / "patches.h5"
    extract_patches(curate_dir, out, size=64, min_size_px=32, normals_per_image=0)
    data = _read(out)
    row = data["source_id"].index("P_1_LEFT_MLO_MASS_1")
    x0, y0, x1, y1 = data["box"][row]
    assert (x0, y0, x1, y1) == (4, 0, 36, 32)  # centred it would start 8 cache pixels above the image
    assert data["padded_fraction"][row] == 0.0
    patch = data["images"][row, 0]
    assert patch[:16].min() > 0  # tissue where the old policy put 16 patch rows of black padding
    cy, cx = _bright_centre(patch)  # the lesion (cache rows 2-14) is whole, 8 cache rows above the centre
    assert abs(cy - 15.5) < 1.0 and abs(cx - 31.5) < 1.0


def test_crop_policy_shifts_a_crop_inside_and_centres_one_longer_than_the_image():
    shape = (100, 60)  # h, w
    assert patches.fit_crop_box((10, 20, 42, 52), shape) == (10, 20, 42, 52)  # inside: unchanged
    assert patches.fit_crop_box((-8, -5, 24, 27), shape) == (0, 0, 32, 32)  # top-left corner: shifted
    assert patches.fit_crop_box((40, 80, 72, 112), shape) == (28, 68, 60, 100)  # bottom-right: shifted
    # 80 px side: fits the height (shifted inside), longer than the width (centred, 10 px padded each side)
    assert patches.fit_crop_box((-30, 50, 50, 130), shape) == (-10, 20, 70, 100)
    assert patches.padded_fraction((-10, 20, 70, 100), shape) == pytest.approx(20 / 80)
    assert patches.padded_fraction((0, 0, 32, 32), shape) == 0.0
    # NORMAL crops draw their start among the same positions the policy allows a lesion crop
    assert patches.axis_offsets(60, 80).tolist() == [-10]
    assert patches.axis_offsets(60, 32).tolist() == list(range(29))
    image = np.arange(100 * 60, dtype=np.float32).reshape(100, 60) + 1
    crop = patches.cut_crop(image, (-8, -5, 24, 27))
    assert crop.shape == (32, 32) and crop.min() > 0 and crop[0, 0] == image[0, 0]


def test_lesion_and_normal_crops_longer_than_the_image_are_padded_alike(tmp_path):
    layout = {"P_1_LEFT_CC": ("P_1", "train", [("P_1_LEFT_CC_MASS_1", 1, (60, 80, 80, 100))]),
              "P_1_LEFT_MLO": ("P_1", "train", [])}
    folder = make_curate_dir(tmp_path / "curate", layout)
    out = tmp_path / "p.h5"
    extract_patches(folder, out, size=32, min_size_px=180, normals_per_image=1, min_breast_fraction=0.5)
    data = _read(out)
    kinds = {"#normal" in s: i for i, s in enumerate(data["source_id"]) if s.startswith(("P_1_LEFT_CC_M",
                                                                                          "P_1_LEFT_MLO#"))}
    lesion, normal = kinds[False], kinds[True]
    for row in (lesion, normal):  # 180 px crops in a 160 px wide image: centred, 10 px padded either side
        x0, y0, x1, y1 = data["box"][row]
        assert (x0, x1) == (-10, 170) and y0 >= 0 and y1 <= CACHE_H
        assert data["padded_fraction"][row] == pytest.approx(20 / 180)
        patch = data["images"][row, 0]
        assert patch[:, :1].max() == 0 and patch[:, -1:].max() == 0  # the padded bands, both sides


def test_normal_sides_come_from_the_training_lesions_only(curate_dir, tmp_path):
    out = tmp_path / "p.h5"
    extract_patches(curate_dir, out, size=32, context=0.25, min_size_px=32, normals_per_image=5)
    data = _read(out)
    train_sides = {32, 75}  # the train lesions' crop sides; val has 32, test 60
    sides = {(data["image_id"][i], int(data["box"][i][2] - data["box"][i][0]))
             for i, s in enumerate(data["source_id"]) if "#normal" in s}
    assert {side for _, side in sides} <= train_sides
    assert any(image_id == "P_3_LEFT_CC" for image_id, _ in sides)  # the test image has NORMAL patches
    assert h5io.read_attrs(out)["crop_policy"].endswith("training lesions' crop sides")


def test_normal_patches_lie_in_the_breast_away_from_every_lesion(curate_dir, tmp_path):
    out = tmp_path / "patches.h5"
    summary = extract_patches(curate_dir, out, size=32, context=0.25, min_size_px=32, normals_per_image=5)
    data = _read(out)
    breast = _breast()
    normal_rows = [i for i, s in enumerate(data["source_id"]) if "#normal" in s]
    assert len(normal_rows) >= 15  # a few big crops may find no spot left; they are counted, not faked
    assert len(normal_rows) + sum(summary.normals_without_spot.values()) == 20
    assert summary.normals_requested == {"train": 10, "val": 5, "test": 5}
    train_sides = {b[2] - b[0] for _, split, lesions in LAYOUT.values() if split == "train"
                   for b in (lesion_crop_box(box, 0.25, 32) for _, _, box in lesions)}
    for i in normal_rows:
        assert data["labels"][i] == 0
        image_id = data["image_id"][i]
        patient, split, lesions = LAYOUT[image_id]
        box = data["box"][i].tolist()
        for _, _, lesion_box in lesions:
            assert not _overlap(box, lesion_crop_box(lesion_box, 0.25, 32)), (image_id, box)
        for j in normal_rows:
            if j != i and data["image_id"][j] == image_id:
                assert not _overlap(box, data["box"][j].tolist())
        assert min(box[0], box[1]) >= 0 and box[2] <= CACHE_W and box[3] <= CACHE_H
        assert breast[box[1]:box[3], box[0]:box[2]].mean() >= 0.9
        assert box[2] - box[0] in train_sides  # the crop sizes of the training lesions
        assert (data["images"][i, 0] == 0).mean() <= 0.06  # tissue; at most a sliver of background


def test_split_patient_and_label_are_carried_over(curate_dir, tmp_path):
    out = tmp_path / "patches.h5"
    summary = extract_patches(curate_dir, out, size=32, normals_per_image=1)
    data = _read(out)
    codes = h5io.read_attrs(out)["split_codes"]
    for i, source in enumerate(data["source_id"]):
        image_id = data["image_id"][i]
        patient, split, lesions = LAYOUT[image_id]
        assert data["patient_id"][i] == patient
        assert data["split"][i] == codes[split]
        expected = {lid: label for lid, label, _ in lesions}.get(source, 0)
        assert data["labels"][i] == expected
    attrs = h5io.read_attrs(out)
    assert attrs["class_names"] == CLASSES and attrs["size"] == 32
    assert attrs["counts"] == summary.counts
    assert summary.counts["train"] == {**dict.fromkeys(CLASSES, 0), "NORMAL": 2, "MASS_BENIGN": 1,
                                       "MASS_MALIGNANT": 1, "CALC_BENIGN": 1}
    assert summary.n_patches == len(data["labels"]) == 9
    assert summary.metrics()["train/n"] == 5.0
    assert data["images"].shape == (9, 1, 32, 32) and data["images"].dtype == np.uint8


def test_same_seed_same_file_other_seed_other_normals(curate_dir, tmp_path):
    runs = {}
    for name, seed, workers in (("a", 3, 1), ("b", 3, 2), ("c", 4, 1)):
        extract_patches(curate_dir, tmp_path / f"{name}.h5", size=32, normals_per_image=3, seed=seed,
                        workers=workers)
        runs[name] = _read(tmp_path / f"{name}.h5")
    for key in runs["a"]:
        assert np.array_equal(np.asarray(runs["a"][key]), np.asarray(runs["b"][key])), key
    def boxes(run, normal: bool):
        return {(s, tuple(b)) for s, b in zip(run["source_id"], run["box"].tolist(), strict=True)
                if ("#normal" in s) == normal}

    assert boxes(runs["a"], normal=True) != boxes(runs["c"], normal=True)
    assert boxes(runs["a"], normal=False) == boxes(runs["c"], normal=False)


def test_missing_and_corrupt_cache_images_are_skipped_with_reasons(curate_dir, tmp_path):
    (curate_dir / "cache" / "images" / "P_2_RIGHT_CC.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (curate_dir / "cache" / "images" / "P_3_LEFT_CC.png").unlink()
    out = tmp_path / "patches.h5"
    summary = extract_patches(curate_dir, out, size=32, normals_per_image=1)
    reasons = dict(summary.skipped)
    assert reasons["P_3_LEFT_CC"] == "cache image missing"
    assert reasons["P_2_RIGHT_CC"].startswith("cache image unreadable")
    data = _read(out)
    assert set(data["image_id"]) == {"P_1_LEFT_CC", "P_1_LEFT_MLO"}
    assert summary.images_used == 2 and summary.counts["val"] == dict.fromkeys(CLASSES, 0)


def test_degenerate_and_off_image_boxes_are_skipped_with_reasons(tmp_path):
    layout = {
        "P_1_LEFT_CC": ("P_1", "train", [("P_1_LEFT_CC_MASS_1", 1, (60, 80, 80, 100)),
                                         ("P_1_LEFT_CC_MASS_2", 1, (30, 30, 30, 40)),
                                         ("P_1_LEFT_CC_MASS_3", 3, (170, 10, 190, 20)),
                                         ("P_1_LEFT_CC_CALC_1", 9, (20, 20, 30, 30))]),
    }
    folder = make_curate_dir(tmp_path / "curate", layout)
    summary = extract_patches(folder, tmp_path / "p.h5", size=32, normals_per_image=0)
    reasons = dict(summary.skipped)
    assert reasons["P_1_LEFT_CC_MASS_2"].startswith("degenerate lesion box")
    assert "off the 320x400 image" in reasons["P_1_LEFT_CC_MASS_3"]
    assert reasons["P_1_LEFT_CC_CALC_1"] == "label 9 is not a lesion class of 7 classes"
    assert _read(tmp_path / "p.h5")["source_id"] == ["P_1_LEFT_CC_MASS_1"]


def test_image_with_uncurated_lesions_gives_no_normal_patch(tmp_path):
    folder = make_curate_dir(tmp_path / "curate", n_lesions_extra={"P_1_LEFT_CC": 1})
    summary = extract_patches(folder, tmp_path / "p.h5", size=32, normals_per_image=2)
    data = _read(tmp_path / "p.h5")
    assert [s for s in data["source_id"] if s.startswith("P_1_LEFT_CC")] == ["P_1_LEFT_CC_MASS_1"]
    assert "P_1_LEFT_CC#normal" in dict(summary.skipped)
    assert summary.counts["train"]["NORMAL"] == 2  # the other train image still gives its two


def test_no_usable_image_is_an_error_and_leaves_no_file(curate_dir, tmp_path):
    for png in (curate_dir / "cache" / "images").iterdir():
        png.unlink()
    with pytest.raises(RuntimeError, match="no patch could be extracted"):
        extract_patches(curate_dir, tmp_path / "p.h5", size=32)
    assert not (tmp_path / "p.h5").exists()


def test_valid_positions_respect_breast_fraction_and_forbidden_boxes():
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, :6] = True
    valid = patches.valid_normal_positions(mask, 3, [(0, 0, 2, 2)], 1.0)
    assert valid.shape == (8, 8)
    assert not valid[:, 4:].any()  # would reach past column 5, outside the breast
    assert not valid[0:2, 0:2].any() and valid[2, 0] and valid[0, 2]


def test_global_intensity_is_a_plain_division(curate_dir, tmp_path):
    extract_patches(curate_dir, tmp_path / "p.h5", size=32, normals_per_image=1, intensity="global")
    data = _read(tmp_path / "p.h5")
    normal = [i for i, s in enumerate(data["source_id"]) if "#normal" in s]
    assert abs(float(data["images"][normal, 0].mean()) - 20000 / 257) < 3
