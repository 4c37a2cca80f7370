"""Curation end to end on small phantoms: every layout gives the same result; every quirk is survived.

The phantom writes the classic NBIA layout; ``layout_builders`` rebuilds the same data in the
descriptive layout (with and without the retriever's metadata.csv) and in the Kaggle JPEG layout.
Expected values are recomputed here independently of ``mammo_core`` (csv module, pydicom, scipy).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from mammo_core.data import curation, layouts
from mammo_core.sources import phantom
from tests.helpers import layout_builders as lb

N_PATIENTS, SEED, SHAPE = 6, 3, (256, 160)
SETTINGS = curation.CurationSettings(max_side=128, val_fraction=0.2, split_seed=0, workers=1, min_box_area=4)
JPEG_BOX_TOLERANCE = 3  # pixels: lossy JPEG masks snapped back to binary move edges by a pixel or two


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "raw"
    phantom.generate_phantom(root, n_patients=N_PATIENTS, seed=SEED, image_shape=SHAPE)
    return root


@pytest.fixture(scope="module")
def csv_rows(phantom_root) -> list[dict[str, str]]:
    """Every record of the four case CSVs, read with the csv module, plus its lesion and image ids."""
    rows = []
    for path in sorted(phantom_root.glob(lb.CASE_CSV_GLOB)):
        with open(path, newline="", encoding="utf-8") as fh:
            for rec in csv.DictReader(fh):
                kind = "MASS" if "mass" in path.name else "CALC"
                image_id = f"{rec['patient_id']}_{rec['left or right breast']}_{rec['image view']}"
                rows.append({**{k: v.strip() for k, v in rec.items()}, "file": path.name, "type": kind,
                             "image_id": image_id, "lesion_id": f"{image_id}_{kind}_{rec['abnormality id']}"})
    return rows


def run_curate(root: Path, tmp: Path, layout: str | None = None, **overrides) -> curation.CurationResult:
    settings = curation.CurationSettings(**{**SETTINGS.__dict__, **overrides})
    return curation.curate(root, layout or layouts.detect_layout(root), tmp / "cache", settings)


@pytest.fixture(scope="module")
def classic_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("classic")


@pytest.fixture(scope="module")
def classic(phantom_root, classic_dir) -> curation.CurationResult:
    # two workers: the process pool path is the one real runs take
    return run_curate(phantom_root, classic_dir, "classic", workers=2)


def boxes_of(result: curation.CurationResult) -> dict[str, list[list[int]]]:
    return {lid: [list(b) for b in boxes] for lid, boxes in zip(result.lesions["lesion_id"],
                                                                  result.lesions["boxes"], strict=True)}


def splits_of(result: curation.CurationResult) -> dict[str, str]:
    return dict(zip(result.images["image_id"], result.images["split"], strict=True))


def reference_boxes(mask: np.ndarray, min_area: int) -> list[list[int]]:
    """Boxes of the 8-connected regions of ``mask``, computed with scipy alone."""
    labelled, _ = ndimage.label(mask != 0, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labelled.ravel())
    boxes = [[sx.start, sy.start, sx.stop, sy.stop]
             for i, (sy, sx) in enumerate(ndimage.find_objects(labelled), start=1) if areas[i] >= min_area]
    return sorted(boxes, key=lambda b: (b[1], b[0], b[3], b[2]))


# --------------------------------------------------------------------------------------------------
# classic layout


def test_every_listed_lesion_gets_boxes_inside_its_image(classic, csv_rows):
    assert classic.quarantine.empty, classic.quarantine
    assert set(classic.lesions["lesion_id"]) == {r["lesion_id"] for r in csv_rows}
    assert set(classic.images["image_id"]) == {r["image_id"] for r in csv_rows}
    size = classic.images.set_index("image_id")[["height", "width"]]
    assert (size["height"] == SHAPE[0]).all() and (size["width"] == SHAPE[1]).all()
    for lesion in classic.lesions.itertuples():
        assert lesion.n_regions == len(lesion.boxes) >= 1, lesion.lesion_id
        h, w = size.loc[lesion.image_id]
        for x0, y0, x1, y1 in lesion.boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (lesion.lesion_id, lesion.boxes)
        assert [lesion.x0, lesion.y0, lesion.x1, lesion.y1] == [
            min(b[0] for b in lesion.boxes), min(b[1] for b in lesion.boxes),
            max(b[2] for b in lesion.boxes), max(b[3] for b in lesion.boxes)]


def test_boxes_match_the_mask_files(classic, phantom_root):
    for lesion in classic.lesions.itertuples():
        mask_file = lb.mask_file_of(phantom_root, lesion.crop_path, lesion.mask_path, SHAPE)
        mask = pydicom.dcmread(mask_file).pixel_array
        assert [list(b) for b in lesion.boxes] == reference_boxes(mask, SETTINGS.min_box_area), lesion.lesion_id
        assert lesion.mask_area == int((mask != 0).sum())


def test_cache_is_16_bit_downsampled_and_masks_align(classic, classic_dir):
    assert not any(Path(p).is_absolute() for p in classic.images["cache_path"])  # the stage folder moves
    cache_root = classic_dir / "cache"
    for image in classic.images.itertuples():
        with Image.open(cache_root / image.cache_path) as im:
            assert im.mode == "I;16", image.image_id
            assert im.size == (image.cache_width, image.cache_height)
            pixels = np.asarray(im)
        assert max(im.size) <= SETTINGS.max_side
        assert (image.cache_height, image.cache_width) == (128, 80)
        assert pixels.max() > 255, "16-bit range used, not 8-bit values in a 16-bit file"
        assert image.scale == pytest.approx(0.5)
    for lesion in classic.lesions.itertuples():
        with Image.open(cache_root / lesion.mask_cache) as im:
            small = np.asarray(im)
        assert small.shape == (128, 80) and set(np.unique(small)) <= {0, 255}
        ys, xs = np.nonzero(small)
        # the downsampled mask lies where the full-resolution box says (scale 0.5, one pixel of slack)
        assert xs.min() >= lesion.x0 // 2 - 1 and xs.max() <= lesion.x1 // 2 + 1
        assert ys.min() >= lesion.y0 // 2 - 1 and ys.max() <= lesion.y1 // 2 + 1


def test_splits_are_patient_disjoint_and_test_rows_win(classic, csv_rows):
    images = classic.images
    assert set(images["split"]) == {"train", "val", "test"}
    assert images.groupby("patient_id")["split"].nunique().max() == 1
    in_test_file = {r["patient_id"] for r in csv_rows if "_test_" in r["file"]}
    for patient, split in images.groupby("patient_id")["split"].first().items():
        assert (split == "test") == (patient in in_test_file), patient
    lesion_split = classic.lesions["image_id"].map(images.set_index("image_id")["split"])
    assert (classic.lesions["split"] == lesion_split).all()


def test_mass_and_calc_listings_merge_into_one_image(classic, csv_rows):
    types_per_image: dict[str, set[str]] = {}
    for r in csv_rows:
        types_per_image.setdefault(r["image_id"], set()).add(r["type"])
    merged = sorted(i for i, t in types_per_image.items() if t == {"MASS", "CALC"})
    assert merged, "the phantom should list some mammogram as mass and as calc"
    for image_id in merged:
        lesions = classic.lesions[classic.lesions["image_id"] == image_id]
        assert set(lesions["abnormality_type"]) == {"mass", "calc"}
        image = classic.images.set_index("image_id").loc[image_id]
        assert len(image["full_series_uids"]) == 2 and image["n_lesions_ok"] == len(lesions)
    assert classic.report["mass_and_calc_merged_images"] == len(merged)


def test_report_counts_agree_with_the_tables(classic, csv_rows):
    report, images, lesions = classic.report, classic.images, classic.lesions
    assert report["csv_rows"] == len(csv_rows)
    assert report["images_listed"] == report["images"] == len(images) == len({r["image_id"] for r in csv_rows})
    assert report["lesions"] == len(lesions) == len(csv_rows)
    assert report["patients"] == images["patient_id"].nunique() == len({r["patient_id"] for r in csv_rows})
    assert report["images_per_split"] == images["split"].value_counts().reindex(
        ["train", "val", "test"], fill_value=0).to_dict()
    per_class = report["lesions_per_class_and_split"]
    for split in ("train", "val", "test"):
        observed = lesions.loc[lesions["split"] == split, "class_name"].value_counts().to_dict()
        assert {k: v for k, v in per_class[split].items() if v} == observed
    expected = pd.Series([f"{r['type']}_{r['pathology']}" for r in csv_rows]).value_counts().to_dict()
    assert lesions["class_name"].value_counts().to_dict() == expected
    assert report["quarantined"] == 0 and report["quarantined_per_reason"] == {}


# --------------------------------------------------------------------------------------------------
# other layouts give the same result


@pytest.fixture(scope="module", params=["descriptive+metadata", "descriptive", "jpeg"])
def converted(request, phantom_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    if request.param == "jpeg":
        root = lb.to_jpeg(phantom_root, tmp / "root")
    else:
        root = lb.to_descriptive(phantom_root, tmp / "root", with_metadata=request.param.endswith("metadata"))
    return request.param, root, run_curate(root, tmp)


def test_every_layout_is_detected(converted):
    name, root, _ = converted
    assert layouts.detect_layout(root) == name.split("+")[0]


def test_descriptive_join_uses_metadata_csv_when_present(converted, classic):
    name, root, _ = converted
    if not name.startswith("descriptive"):
        pytest.skip("descriptive layout only")
    index = layouts.SeriesIndex.build(root, "descriptive")
    uids = set(classic.lesions["mask_series_uid"]) | set(classic.images["full_series_uid"])
    if name.endswith("metadata"):
        assert uids <= set(index.by_uid), "metadata.csv maps every series UID"
    else:
        assert index.by_uid == {} and len(index.by_suffix) == len(index)


def test_same_images_splits_and_boxes_in_every_layout(converted, classic):
    name, _, result = converted
    assert result.quarantine.empty, result.quarantine
    assert splits_of(result) == splits_of(classic)
    assert result.report["images_per_split"] == classic.report["images_per_split"]
    assert result.report["lesions_per_class_and_split"] == classic.report["lesions_per_class_and_split"]
    assert (result.images[["height", "width"]].to_numpy() == np.array(SHAPE)).all()
    expected = boxes_of(classic)
    got = boxes_of(result)
    assert set(got) == set(expected)
    if name != "jpeg":
        assert got == expected
        return
    # JPEG: the extent of each lesion within a few pixels (ringing may add or split tiny regions)
    extent = classic.lesions.set_index("lesion_id")[["x0", "y0", "x1", "y1"]]
    for lesion in result.lesions.itertuples():
        diff = np.abs(np.array([lesion.x0, lesion.y0, lesion.x1, lesion.y1]) - extent.loc[lesion.lesion_id])
        assert diff.max() <= JPEG_BOX_TOLERANCE, (lesion.lesion_id, diff.tolist())
    assert all(json_meta.startswith("{") for json_meta in result.images["dicom_meta"])


# --------------------------------------------------------------------------------------------------
# quirks: one bad item is quarantined, the rest goes on


@pytest.fixture
def tree(phantom_root, tmp_path) -> Path:
    root = tmp_path / "raw"
    shutil.copytree(phantom_root, root)
    return root


def _lesion(classic, *, several_on_image: bool = False, same_series: bool | None = None) -> pd.Series:
    """A lesion of the baseline, optionally on an image with other lesions / with crop+mask in one series."""
    les = classic.lesions
    pick = les
    if several_on_image:
        pick = pick[pick["image_id"].map(les["image_id"].value_counts()) > 1]
    if same_series is not None:
        pick = pick[(pick["crop_series_uid"] == pick["mask_series_uid"]) == same_series]
    assert len(pick), "the phantom lacks the lesion this test needs"
    return pick.iloc[0]


def _quarantined(result, kind: str) -> dict[str, str]:
    q = result.quarantine
    return dict(zip(q.loc[q["kind"] == kind, "item"], q.loc[q["kind"] == kind, "reason"], strict=True))


def test_roi_files_in_the_other_order_still_give_the_mask(tree, classic, tmp_path):
    swapped = 0
    for *_, series_dir in lb.classic_series(tree):
        files = sorted(series_dir.glob("*.dcm"))
        if len(files) == 2:  # crop + mask: swap their names
            a, b = files
            a.rename(series_dir / "tmp.dcm")
            b.rename(a)
            (series_dir / "tmp.dcm").rename(b)
            swapped += 1
    assert swapped >= 5
    result = run_curate(tree, tmp_path)
    assert result.quarantine.empty
    assert boxes_of(result) == boxes_of(classic)


def test_half_size_mask_is_mapped_to_full_resolution(tree, classic, tmp_path):
    lesion = _lesion(classic)
    mask_file = lb.mask_file_of(tree, lesion.crop_path, lesion.mask_path, SHAPE)
    half = pydicom.dcmread(mask_file).pixel_array[::2, ::2]
    assert half.any()
    lb.rewrite_pixels(mask_file, half)
    result = run_curate(tree, tmp_path)
    assert result.quarantine.empty, result.quarantine
    got = boxes_of(result)
    # full pixel i takes mask pixel i // 2: every region of the half-size mask doubles exactly
    assert got[lesion.lesion_id] == [[2 * v for v in b] for b in reference_boxes(half, 1)]
    assert got[lesion.lesion_id] == reference_boxes(np.kron(half, np.ones((2, 2), half.dtype)), 4)
    assert got[lesion.lesion_id], "the lesion keeps its boxes"
    base = classic.lesions.set_index("lesion_id").loc[lesion.lesion_id]
    row = result.lesions.set_index("lesion_id").loc[lesion.lesion_id]
    assert abs(row.x0 - base.x0) <= 1 and abs(row.y0 - base.y0) <= 1
    assert abs(row.x1 - base.x1) <= 2 and abs(row.y1 - base.y1) <= 2
    others = {k: v for k, v in got.items() if k != lesion.lesion_id}
    assert others == {k: v for k, v in boxes_of(classic).items() if k != lesion.lesion_id}


def test_mask_of_another_aspect_quarantines_that_lesion_only(tree, classic, tmp_path):
    lesion = _lesion(classic, several_on_image=True)
    mask_file = lb.mask_file_of(tree, lesion.crop_path, lesion.mask_path, SHAPE)
    wider = np.pad(pydicom.dcmread(mask_file).pixel_array, ((0, 0), (0, SHAPE[1] // 2)))  # lesion kept
    lb.rewrite_pixels(mask_file, wider)
    result = run_curate(tree, tmp_path)
    bad = _quarantined(result, "lesion")
    assert list(bad) == [lesion.lesion_id]
    assert "aspect" in bad[lesion.lesion_id]
    assert lesion.lesion_id not in set(result.lesions["lesion_id"])
    assert lesion.image_id in set(result.images["image_id"])
    expected = {k: v for k, v in boxes_of(classic).items() if k != lesion.lesion_id}
    assert boxes_of(result) == expected
    n_ok = result.images.set_index("image_id").loc[lesion.image_id, "n_lesions_ok"]
    assert n_ok == (classic.lesions["image_id"] == lesion.image_id).sum() - 1


def test_empty_mask_is_quarantined(tree, classic, tmp_path):
    lesion = _lesion(classic, same_series=True)
    mask_file = lb.mask_file_of(tree, lesion.crop_path, lesion.mask_path, SHAPE)
    lb.rewrite_pixels(mask_file, np.zeros(SHAPE, np.uint8))
    result = run_curate(tree, tmp_path)
    assert _quarantined(result, "lesion") == {lesion.lesion_id: "mask is empty"}
    assert len(result.lesions) == len(classic.lesions) - 1


def test_missing_roi_series_is_named_in_the_reason(tree, classic, tmp_path):
    lesion = _lesion(classic, same_series=True)
    shutil.rmtree(lb.series_dir_of(tree, lesion.mask_path))
    result = run_curate(tree, tmp_path)
    bad = _quarantined(result, "lesion")
    assert list(bad) == [lesion.lesion_id]
    assert "not found" in bad[lesion.lesion_id] and lesion.mask_series_uid in bad[lesion.lesion_id]


def test_missing_full_image_series_quarantines_that_image_only(tree, classic, tmp_path):
    single = classic.images[classic.images["full_series_uids"].str.len() == 1].iloc[0]
    shutil.rmtree(lb.series_dir_of(tree, single.image_path))
    result = run_curate(tree, tmp_path)
    bad = _quarantined(result, "image")
    assert list(bad) == [single.image_id] and "not found" in bad[single.image_id]
    assert set(result.images["image_id"]) == set(classic.images["image_id"]) - {single.image_id}
    assert single.image_id not in set(result.lesions["image_id"])
    assert result.report["images"] == len(classic.images) - 1
    assert result.report["quarantined_per_kind"] == {"image": 1}


def test_merged_image_falls_back_to_its_other_series(tree, classic, tmp_path):
    merged = classic.images[classic.images["full_series_uids"].str.len() == 2].iloc[0]
    shutil.rmtree(lb.series_dir_of(tree, merged.full_image_paths[0]))
    result = run_curate(tree, tmp_path)
    assert result.quarantine.empty, result.quarantine
    assert boxes_of(result) == boxes_of(classic)


def test_csv_path_escaping_the_root_quarantines_the_row(tree, classic, csv_rows, tmp_path):
    row = next(r for r in csv_rows if r["file"].startswith("mass") and r["type"] == "MASS")
    csv_file = tree / row["file"]
    original = row["ROI mask file path"]
    folder, study, series, name = original.split("/")
    evil = f"{folder}/../../../{series}/{name}"
    data = csv_file.read_bytes()
    assert data.count(original.encode()) == 1
    csv_file.write_bytes(data.replace(original.encode(), evil.encode()))
    result = run_curate(tree, tmp_path)
    bad = _quarantined(result, "csv_row")
    assert len(bad) == 1
    item, reason = next(iter(bad.items()))
    assert item.startswith(row["file"]) and "escapes the data root" in reason
    assert set(result.lesions["lesion_id"]) == set(classic.lesions["lesion_id"]) - {row["lesion_id"]}
    assert result.report["quarantined_per_kind"] == {"csv_row": 1}


def test_full_image_that_is_not_dicom_is_quarantined(tree, classic, tmp_path):
    image = classic.images[classic.images["full_series_uids"].str.len() == 1].iloc[-1]
    (full,) = lb.series_dir_of(tree, image.image_path).glob("*.dcm")
    full.write_bytes(b"<html>502 Bad Gateway</html>" * 20)
    result = run_curate(tree, tmp_path)
    assert _quarantined(result, "image") == {image.image_id: "not a DICOM file"}
    assert len(result.images) == len(classic.images) - 1


def test_when_every_image_is_bad_curation_fails_saying_so(tree, tmp_path):
    n = 0
    for folder, _, _, series_dir in lb.classic_series(tree):
        if not folder.rsplit("_", 1)[-1].isdigit():  # full-image series (ROI folders end in _N)
            for f in series_dir.glob("*.dcm"):
                f.write_bytes(b"truncated")
                n += 1
    assert n >= 10
    with pytest.raises(RuntimeError, match="no usable image") as err:
        run_curate(tree, tmp_path)
    assert "not a DICOM file" in str(err.value)


# --------------------------------------------------------------------------------------------------
# images that try to exhaust memory or time (issue 16 §2): quarantined with the reason, the run goes on


def _single_series_image(classic) -> pd.Series:
    return classic.images[classic.images["full_series_uids"].str.len() == 1].iloc[0]


def _others_unchanged(result, classic, image_id: str) -> None:
    assert set(result.images["image_id"]) == set(classic.images["image_id"]) - {image_id}
    kept = classic.lesions[classic.lesions["image_id"] != image_id]
    assert boxes_of(result) == {lid: b for lid, b in boxes_of(classic).items() if lid in set(kept["lesion_id"])}


def test_a_full_image_announcing_a_huge_size_is_quarantined_undecoded(tree, classic, tmp_path):
    from pydicom.uid import JPEG2000Lossless

    from tests.core.data.test_untrusted_images import compressed_file

    image = _single_series_image(classic)
    (full,) = lb.series_dir_of(tree, image.image_path).glob("*.dcm")
    compressed_file(full, JPEG2000Lossless, rows=60000, cols=60000)
    result = run_curate(tree, tmp_path, workers=2, max_image_bytes=256 * 2**20)
    assert _quarantined(result, "image") == {
        image.image_id: "image too large: header declares 60000x60000x1 samples x16 bits x1 frames = 6866 MiB "
                        "decoded, limit 256 MiB (curate.max_image_mb)"
    }
    _others_unchanged(result, classic, image.image_id)


def test_an_image_that_kills_its_worker_is_retried_alone_then_quarantined(tree, classic, tmp_path, monkeypatch):
    image = _single_series_image(classic)
    monkeypatch.setenv("MAMMO_FAULT", f"kill:curate:image:{image.image_id}")
    result = run_curate(tree, tmp_path, workers=2)
    died = "its worker process died (SIGKILL, often the out-of-memory killer)"
    assert _quarantined(result, "image") == {
        image.image_id: f"could not process image: {died}; first attempt: {died}; given up after a retry alone"
    }
    _others_unchanged(result, classic, image.image_id)


def test_an_image_whose_worker_died_once_succeeds_on_its_retry_alone(tree, classic, tmp_path, monkeypatch):
    image = _single_series_image(classic)
    once = tmp_path / "fired"
    monkeypatch.setenv("MAMMO_FAULT", f"kill:curate:image:{image.image_id}")
    monkeypatch.setenv("MAMMO_FAULT_ONCE", str(once))
    result = run_curate(tree, tmp_path, workers=2)
    assert once.read_text() == f"curate:image:{image.image_id}"  # the worker really was killed once
    assert result.report["quarantined"] == 0
    assert boxes_of(result) == boxes_of(classic)


def test_an_image_that_hangs_is_stopped_at_the_time_limit(tree, classic, tmp_path, monkeypatch):
    image = _single_series_image(classic)
    monkeypatch.setenv("MAMMO_FAULT", f"hang:curate:image:{image.image_id}")
    result = run_curate(tree, tmp_path, workers=2, image_time_limit_s=1.5)
    late = "it ran longer than the time limit of 1.5 s per item"
    assert _quarantined(result, "image") == {
        image.image_id: f"could not process image: {late}; first attempt: {late}; given up after a retry alone"
    }
    _others_unchanged(result, classic, image.image_id)
def test_burned_in_annotation_is_quarantined_unless_params_allow_it(tree, classic, tmp_path):
    """Text burned into the pixels (BurnedInAnnotation YES) may name the patient: no cache copy by default."""
    single = classic.images[classic.images["full_series_uids"].str.len() == 1].iloc[0]
    (full_file,) = lb.series_dir_of(tree, single.image_path).glob("*.dcm")
    ds = pydicom.dcmread(full_file)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(full_file)
    result = run_curate(tree, tmp_path / "default")
    assert _quarantined(result, "image") == {single.image_id: curation.BURNED_IN_REASON}
    assert "curate.allow_burned_in_annotation" in curation.BURNED_IN_REASON
    assert set(result.images["image_id"]) == set(classic.images["image_id"]) - {single.image_id}
    assert not (tmp_path / "default" / "cache" / "images" / f"{single.image_id}.png").exists()
    expected = {k: v for k, v in boxes_of(classic).items() if not k.startswith(single.image_id + "_")}
    assert boxes_of(result) == expected and len(expected) < len(boxes_of(classic))

    allowed = run_curate(tree, tmp_path / "allowed", allow_burned_in_annotation=True)
    assert allowed.quarantine.empty, allowed.quarantine
    assert boxes_of(allowed) == boxes_of(classic)
    meta = json.loads(allowed.images.set_index("image_id").loc[single.image_id, "dicom_meta"])
    assert meta["BurnedInAnnotation"] == "YES"
