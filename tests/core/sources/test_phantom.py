"""The phantom CBIS-DDSM twin: same file formats and quirks as the real collection, deterministic pixels,
and images whose content follows the CSV attributes."""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from skimage.measure import perimeter

from mammo_core.sources.phantom import CSV_NAMES, DATA_DIR, generate_phantom
from tests.helpers.fixture_files import CBIS_CSV_DIR

REAL_CSV_DIR = CBIS_CSV_DIR
SHAPE = (512, 320)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("phantom")
    calls: list[tuple[int, int]] = []
    summary = generate_phantom(out, n_patients=40, seed=11, image_shape=SHAPE,
                               progress=lambda d, t: calls.append((d, t)))
    (out / "progress.txt").write_text(repr(calls))
    return out, summary


def _records(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="ascii") as fh:
        return list(csv.reader(fh))


def _rows(root: Path) -> list[dict[str, str]]:
    rows = []
    for (kind, split), name in CSV_NAMES.items():
        with open(root / name, newline="") as fh:
            for r in csv.DictReader(fh):
                rows.append({**r, "_kind": kind, "_split": split, "_file": name})
    return rows


def _series_files(root: Path, cell: str) -> list[Path]:
    folder, study, series, _ = cell.strip().split("/")
    d = root / DATA_DIR / folder / study / series
    assert d.is_dir(), f"CSV path {cell.strip()!r} has no series folder"
    return sorted(d.iterdir())


def _quoted_columns(path: Path) -> set[int]:
    return {i for r in _records(path)[1:] for i, c in enumerate(r) if "\n" in c}


def _is_mask(ds: pydicom.Dataset) -> bool:
    return set(np.unique(ds.pixel_array).tolist()) <= {0, 255}


def test_headers_are_the_real_headers_byte_for_byte(phantom):
    root, _ = phantom
    for name in CSV_NAMES.values():
        real = (REAL_CSV_DIR / name).read_bytes()
        ours = (root / name).read_bytes()
        assert ours.split(b"\r\n", 1)[0] == real.split(b"\r\n", 1)[0], name
    assert b"breast_density" in (root / CSV_NAMES[("mass", "train")]).read_bytes()[:200]
    assert b"breast density," in (root / CSV_NAMES[("calc", "test")]).read_bytes()[:200]


def test_records_use_crlf_and_the_quoted_newline_of_the_real_files(phantom):
    root, summary = phantom
    for name in CSV_NAMES.values():
        raw = (root / name).read_bytes()
        n = summary.csv_rows[name]
        assert n > 0, name
        assert raw.count(b"\r\n") == n + 1  # every record ends in CRLF
        assert raw.count(b"\n") == 2 * n + 1  # plus one bare LF inside each record's quoted cell
        assert raw.count(b'"') == 2 * n
        assert _quoted_columns(root / name) == _quoted_columns(REAL_CSV_DIR / name) != set()


def test_crop_and_mask_file_names_follow_the_real_files(phantom):
    root, _ = phantom
    for name in CSV_NAMES.values():
        def names(path: Path) -> Counter:
            out = Counter()
            for r in _records(path)[1:]:
                crop, mask = r[12].strip(), r[13].strip()
                if crop.rsplit("/", 1)[0] == mask.rsplit("/", 1)[0]:  # crop and mask in one series
                    out[(r[11].rsplit("/", 1)[1], crop.rsplit("/", 1)[1], mask.rsplit("/", 1)[1])] += 1
            return out
        real = names(REAL_CSV_DIR / name).most_common(1)[0][0]
        assert set(names(root / name)) == {real}, name
        # (image, crop, mask): mass files name the crop 000000 and the mask 000001, calc files the reverse
        expected = ("000000.dcm", "000000.dcm", "000001.dcm") if name.startswith("mass") else \
            ("000000.dcm", "000001.dcm", "000000.dcm")
        assert real == expected


def test_every_csv_path_resolves_to_its_series(phantom):
    root, _ = phantom
    rows = _rows(root)
    separate = 0
    mask_positions = Counter()
    for r in rows:
        full_files = _series_files(root, r["image file path"])
        assert [f.name for f in full_files] == ["1-1.dcm"]
        full = pydicom.dcmread(full_files[0])
        crop_files = _series_files(root, r["cropped image file path"])
        mask_files = _series_files(root, r["ROI mask file path"])
        roi_files = sorted(set(crop_files) | set(mask_files))
        assert len(roi_files) == 2
        separate += crop_files != mask_files
        datasets = [pydicom.dcmread(f) for f in roi_files]
        masks = [ds for ds in datasets if _is_mask(ds)]
        crops = [ds for ds in datasets if not _is_mask(ds)]
        assert len(masks) == 1 and len(crops) == 1
        mask, crop = masks[0], crops[0]
        assert mask.pixel_array.shape == full.pixel_array.shape
        assert mask.pixel_array.max() == 255 and 0 < (mask.pixel_array > 0).mean() < 0.2
        assert crop.pixel_array.dtype == np.uint16
        assert crop.Rows < full.Rows and crop.Columns <= full.Columns
        if crop_files == mask_files:
            mask_positions[roi_files[[_is_mask(d) for d in datasets].index(True)].name] += 1
    assert separate >= 1  # a few crops and masks sit in separate series, as in the real data
    assert set(mask_positions) == {"1-1.dcm", "1-2.dcm"}  # the order inside a series is not reliable


def test_full_images_are_16_bit_monochrome2_mammograms_with_synthetic_identifiers(phantom):
    root, _ = phantom
    seen = 0
    for r in _rows(root)[:40]:
        (f,) = _series_files(root, r["image file path"])
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.Modality == "MG"
        assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.shape == SHAPE
        assert ds.ViewPosition == r["image view"] and ds.ImageLaterality == r["left or right breast"][0]
        assert ds.PatientID == r["image file path"].split("/")[0]
        assert str(ds.PatientName) == f"PHANTOM^{r['patient_id']}" and ds.PatientBirthDate
        assert ds.StudyInstanceUID == r["image file path"].split("/")[1]
        assert ds.SeriesInstanceUID == r["image file path"].split("/")[2]
        seen += 1
    assert seen == 40


def _full_images(root: Path) -> dict[str, tuple[dict, np.ndarray]]:
    out = {}
    for r in _rows(root):
        if r["image file path"] not in out:
            (f,) = _series_files(root, r["image file path"])
            out[r["image file path"]] = (r, pydicom.dcmread(f).pixel_array)
    return out


def test_breast_anatomy_background_pectoral_and_mirroring(phantom):
    root, _ = phantom
    n_mlo = 0
    for r, px in _full_images(root).values():
        h, w = px.shape
        left = r["left or right breast"] == "LEFT"
        chest = px[:, : w // 10] if left else px[:, -(w // 10):]
        far = px[:, -2:] if left else px[:, :2]
        assert np.median(far) < 0.01 * 65535  # air beyond the nipple side is ~black
        assert chest.mean() > 20 * max(1.0, float(far.mean()))  # the breast lies on the chest wall
        tissue = px[px > 0.05 * 65535]
        if r["image view"] == "MLO":
            n_mlo += 1
            corner = px[: h // 12, : w // 12] if left else px[: h // 12, -(w // 12):]
            assert corner.mean() > np.percentile(tissue, 60), "pectoral muscle is brighter than tissue"
    assert n_mlo >= 10


def test_a_mammogram_listed_as_mass_and_calc_has_the_same_pixels_and_other_uids(phantom):
    root, _ = phantom
    by_image: dict[tuple, dict[str, str]] = {}
    for r in _rows(root):
        by_image.setdefault((r["patient_id"], r["left or right breast"], r["image view"]), {})[r["_kind"]] = \
            r["image file path"]
    shared = [v for v in by_image.values() if len(v) == 2]
    assert shared
    for paths in shared:
        a, b = (pydicom.dcmread(_series_files(root, paths[k])[0]) for k in ("mass", "calc"))
        assert np.array_equal(a.pixel_array, b.pixel_array)
        assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.StudyInstanceUID != b.StudyInstanceUID
        assert a.PatientID.startswith("Mass-") and b.PatientID.startswith("Calc-")


def test_structure_matches_the_real_collection(phantom):
    root, summary = phantom
    rows = _rows(root)
    assert summary.patients == 40 == len({r["patient_id"] for r in rows})
    images = {(r["patient_id"], r["left or right breast"], r["image view"]) for r in rows}
    assert summary.images == len(images)
    assert sum(summary.lesions.values()) == len(rows) == sum(summary.csv_rows.values())
    images_per_patient = Counter(p for p, *_ in images)
    assert max(images_per_patient.values()) >= 4  # both breasts, both views
    assert max(int(r["abnormality id"]) for r in rows) >= 2  # several lesions on one image
    splits = {}
    for r in rows:
        splits.setdefault(r["patient_id"], set()).add(r["_split"])
    assert any(s == {"train", "test"} for s in splits.values())  # a patient in a train and a test file
    folders = {r["image file path"].split("/")[0] for r in rows}
    prefixes = {f.split("_", 1)[0] for f in folders}
    assert prefixes == {"Mass-Training", "Mass-Test", "Calc-Training", "Calc-Test"}
    assert all(f.split("_", 1)[1].startswith("P_") for f in folders)
    # out-of-range values the real files carry
    assert any(r["subtlety"] == "0" for r in rows if r["_kind"] == "mass")
    assert any(r["breast density"] == "0" for r in rows if r["_kind"] == "calc")
    assert any(r["assessment"] == "0" for r in rows)
    assert {r["pathology"] for r in rows} == {"BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT"}
    calls = eval((root / "progress.txt").read_text())  # noqa: S307 - our own repr of a list of tuples
    assert calls[-1] == (summary.images, summary.images) and len(calls) == summary.images


def test_malignant_masses_have_more_irregular_outlines_than_benign(phantom):
    root, _ = phantom
    score: dict[str, list[float]] = {"MALIGNANT": [], "BENIGN": []}
    for r in _rows(root):
        if r["_kind"] != "mass" or r["pathology"] not in score:
            continue
        files = set(_series_files(root, r["cropped image file path"]))
        files |= set(_series_files(root, r["ROI mask file path"]))
        (mask,) = [ds.pixel_array > 0 for ds in map(pydicom.dcmread, sorted(files)) if _is_mask(ds)]
        score[r["pathology"]].append(perimeter(mask) ** 2 / (4 * np.pi * mask.sum()))
    assert len(score["MALIGNANT"]) >= 5 and len(score["BENIGN"]) >= 5
    assert np.mean(score["MALIGNANT"]) > np.mean(score["BENIGN"]) * 1.08


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _all_pixels(root: Path) -> bytes:
    return b"".join(pydicom.dcmread(p).PixelData for p in sorted((root / DATA_DIR).rglob("*.dcm")))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_phantom(a, n_patients=4, seed=3, image_shape=(256, 160), workers=2)
    generate_phantom(b, n_patients=4, seed=3, image_shape=(256, 160), workers=1)
    generate_phantom(c, n_patients=4, seed=4, image_shape=(256, 160))
    da, db, dc = _tree_digest(a), _tree_digest(b), _tree_digest(c)
    assert da == db and len(da) > 10
    assert not any(".tmp" in k for k in da)  # atomic writes left no temporaries
    for name in CSV_NAMES.values():
        assert da[name] != dc[name]
    first_a = pydicom.dcmread(sorted((a / DATA_DIR).rglob("*.dcm"))[0]).pixel_array
    first_c = pydicom.dcmread(sorted((c / DATA_DIR).rglob("*.dcm"))[0]).pixel_array
    assert first_a.shape != first_c.shape or not np.array_equal(first_a, first_c)
    assert _all_pixels(a) == _all_pixels(b) != _all_pixels(c)


def test_rejects_impossible_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_patients"):
        generate_phantom(tmp_path, n_patients=0, seed=1)
    with pytest.raises(ValueError, match="image_shape"):
        generate_phantom(tmp_path, n_patients=1, seed=1, image_shape=(64, 64))


def test_case_tables_parse_the_phantom_csvs_without_rejecting_a_row(phantom):
    cbis_tables = pytest.importorskip("mammo_core.data.cbis_tables")
    root, summary = phantom
    for name in CSV_NAMES.values():
        table = cbis_tables.read_case_csv(root / name)
        assert len(table.rejected) == 0, table.rejected.to_dict("records")
        assert len(table.rows) == summary.csv_rows[name]


def test_csv_bytes_parse_with_the_standard_csv_module_into_14_columns(phantom):
    root, _ = phantom
    for name in CSV_NAMES.values():
        text = (root / name).read_bytes().decode("ascii")
        records = list(csv.reader(io.StringIO(text, newline="")))
        assert {len(r) for r in records} == {14}
