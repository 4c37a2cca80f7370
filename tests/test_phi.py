"""PHI guard: identifying values of vendor-like DICOMs never reach the store, the logs or the console.

A cbis-local tree (classic layout, in tmp only) whose full images are the four vendor cases with complete
headers (a few pixels or none) is run through the real pipeline (`python -m flows.cli run`, Prefect +
MLflow, a fresh store). The cases are always the files written by tests.dicom_factory (identifiers in
UTF-8, Latin-1 and ASCII; Chinese, Cyrillic, Vietnamese, Spanish); when ``../shared/fixtures/dicom-mg/``
is beside the clone, the real vendor files join the same tree and run (one pipeline run for both).
Every file under the store (mlflow.db, the Prefect database, manifests, parquet tables, image cache,
logs) and the CLI output are then searched byte for byte for each identifying value the fixtures carry,
in every encoding it could take on the way out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pydicom.multival
import pytest
from pydicom.charset import convert_encodings, encode_string
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from tests.dicom_factory import NO_PIXEL_CASE, write_cases
from tests.fixture_files import CBIS_CSV_DIR, requires_vendor_dicoms, vendor_dicom_files, vendor_dicoms_present

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"
pytestmark = pytest.mark.slow

UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# (case of tests.dicom_factory, abnormality type, official split, view)
CASES = [
    ("sends_monochrome1_14bit", "mass", "train", "CC"),
    ("seno_for_presentation", "mass", "train", "MLO"),
    ("seno_for_processing", "calc", "test", "CC"),
    (NO_PIXEL_CASE, "calc", "test", "MLO"),
]
SOURCES = ("generated", "vendor")  # generated: P_00001..P_00004; vendor (when present): P_00005..P_00008
SOURCE_PARAMS = ["generated", pytest.param("vendor", marks=requires_vendor_dicoms)]

# Identifying attributes whose values must not leave the raw files. Beyond the patient's own fields,
# places, people and devices: each could re-identify a site, hence a patient.
IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber", "InstitutionName",
    "InstitutionAddress", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StationName",
    "DeviceSerialNumber", "DetectorID", "StudyID",
)
MIN_LEN = 4  # shorter values ("O", "F") occur in any file by chance
MIN_DIGITS = 8  # a short digit string ("87654") occurs by chance in timestamps and floats of any log
GENERIC = {"anonymous", "anonymized", "unknown", "none"}  # words, not identities


def _uid(rng: np.random.Generator) -> str:
    return UID_ROOT + str(rng.integers(1, 10)) + "".join(str(d) for d in rng.integers(0, 10, 37))


def _mask_dicom(path: Path, pixels: np.ndarray, folder: str, study: str, series: str, sop: str, desc: str) -> None:
    """A synthetic ROI file carrying only the CBIS pseudonym (as CBIS-DDSM's own files do)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID, ds.SeriesDescription = "MG", folder, desc
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _header(kind: str) -> str:
    """The exact header line of the real CSV of that kind."""
    with open(CBIS_CSV_DIR / f"{kind}_case_description_train_set.csv", "rb") as fh:
        return fh.readline().decode("ascii").rstrip("\r\n")


def patient_of(source: str, case_index: int) -> str:
    return f"P_{SOURCES.index(source) * len(CASES) + case_index + 1:05d}"


def build_tree(root: Path, sources: dict[str, dict[str, Path]]) -> dict[str, tuple[list[list[int]], tuple[int, int]]]:
    """Write the tree from source -> case -> file; return image_id -> (expected boxes, image shape) of the
    images with pixels."""
    rng = np.random.default_rng(20240)
    rows: dict[tuple[str, str], list[str]] = {(k, s): [] for k in ("mass", "calc") for s in ("train", "test")}
    expected = {}
    placed = [(files[case], patient_of(source, i), kind, split, view, case == NO_PIXEL_CASE)
              for source, files in sources.items() for i, (case, kind, split, view) in enumerate(CASES)]
    for path, patient, kind, split, view, no_pixels in placed:
        source = pydicom.dcmread(path, stop_before_pixels=True)
        shape = (int(source.Rows), int(source.Columns))
        prefix = f"{'Mass' if kind == 'mass' else 'Calc'}-{'Training' if split == 'train' else 'Test'}"
        folder = f"{prefix}_{patient}_LEFT_{view}"
        study, series = _uid(rng), _uid(rng)
        full = root / "CBIS-DDSM" / folder / study / series / "1-1.dcm"
        full.parent.mkdir(parents=True)
        full.write_bytes(path.read_bytes())  # the complete header, identifiers and all
        mask = np.zeros(shape if not no_pixels else (4, 4), np.uint8)
        if mask.shape == (4, 4):
            mask[1:3, 1:3] = 255
            boxes = [[1, 1, 3, 3]]
        else:  # the 1x2 GE images
            mask[0, 1] = 255
            boxes = [[1, 0, 2, 1]]
        roi_study, roi_series = _uid(rng), _uid(rng)
        roi_dir = root / "CBIS-DDSM" / f"{folder}_1" / roi_study / roi_series
        crop = np.array([[100, 200], [300, 400]], np.uint16)
        _mask_dicom(roi_dir / "1-1.dcm", mask, f"{folder}_1", roi_study, roi_series, _uid(rng), "ROI mask images")
        _mask_dicom(roi_dir / "1-2.dcm", crop, f"{folder}_1", roi_study, roi_series, _uid(rng), "cropped images")
        roi = f"{folder}_1/{roi_study}/{roi_series}"
        attributes = "OVAL,CIRCUMSCRIBED" if kind == "mass" else "PLEOMORPHIC,CLUSTERED"
        kind_word = "mass" if kind == "mass" else "calcification"
        rows[(kind, split)].append(
            f"{patient},2,LEFT,{view},1,{kind_word},{attributes},4,MALIGNANT,3,"
            f"{folder}/{study}/{series}/000000.dcm,{roi}/000000.dcm,\"{roi}/000001.dcm\n\""
        )
        if not no_pixels:
            expected[f"{patient}_LEFT_{view}"] = (boxes, shape)
    for (kind, split), lines in rows.items():
        text = "\r\n".join([_header(kind), *lines]) + "\r\n"  # two of the four files: header only
        (root / f"{kind}_case_description_{split}_set.csv").write_bytes(text.encode("ascii"))
    return expected


def _values_of(element_value) -> list[str]:
    values = list(element_value) if isinstance(element_value, pydicom.multival.MultiValue) else [element_value]
    out: list[str] = []
    for v in values:
        out.append(str(v))
        if isinstance(v, PersonName):
            out += [c for c in v.components] + str(v).split("^")
    return out


def element_is_date(value: str) -> bool:
    return len(value) == 8 and value.isdigit() and value[:2] in ("19", "20")


def identifying_values(files: list[Path]) -> dict[str, set[bytes]]:
    """Every identifying value of the given DICOM files -> the byte strings it could leak as."""
    needles: dict[str, set[bytes]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        encodings = convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")
        found: list[str] = []
        for keyword in IDENTIFYING:
            if ds.get(keyword) not in (None, ""):
                found += _values_of(ds[keyword].value)
        for element in ds.iterall():  # every date: study, series, acquisition, birth, calibration...
            if element.VR == "DA" and element.value:
                found += _values_of(element.value)
        for value in found:
            value = value.strip()
            if len(value) < MIN_LEN or value.lower() in GENERIC:
                continue
            if value.isdigit() and len(value) < MIN_DIGITS:
                continue
            forms = {value.encode("utf-8"), json.dumps(value)[1:-1].encode("ascii"),
                     encode_string(value, encodings)}
            if element_is_date(value):  # a date may leave reformatted
                forms.add(f"{value[:4]}-{value[4:6]}-{value[6:8]}".encode("ascii"))
            needles.setdefault(value, set()).update(forms)
    return needles


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """source -> case -> DICOM file: the generated cases, and the vendor files when they are present."""
    found = {"generated": write_cases(tmp_path_factory.mktemp("phi_generated"))}
    if vendor_dicoms_present():
        found["vendor"] = vendor_dicom_files()
    return found


def needles_of(sources: dict[str, dict[str, Path]], source: str) -> dict[str, set[bytes]]:
    return identifying_values(list(sources[source].values()))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, sources):
    base = tmp_path_factory.mktemp("phi")
    tree, store = base / "cbis", base / "store"
    expected = build_tree(tree, sources)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(MAMMO_STORE=str(store), COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "-p", str(SMOKE), "--set", "data.source=cbis-local",
         "--set", f"data.root={tree}", "--set", "curate.min_box_area=1", "--until", "curate"],
        cwd=REPO, env=env, capture_output=True, timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output.decode("utf-8", "replace")
    curate = [p for p in (store / "stages" / "curate").iterdir() if not p.name.startswith(".")]
    assert len(curate) == 1
    return {"store": store, "tree": tree, "curate": curate[0], "output": output, "expected": expected,
            "sources": sources}


# values each source's files must yield: the checks below would prove nothing if the search list came
# back empty or generic
WORTH_SEARCHING = {
    "generated": ("Radiografía", "Thửnghiệm", "SYNT4821", "东区医院", "Новосибирск", "QXZW5173", "Synthetic",
                  "MGCases", "7305912846150273", "4418260937715502", "Synthetic Imaging Trust", "Physique",
                  "FantômeRotatif", "phy24680FantRot", "Annette", "Harbour Breast Centre", "71009872345",
                  "XK902286", "20110923", "19220817"),
    "vendor": ("Mamografía", "Bịnhnhân", "OpenREM", "MGImages", "TomoSTPRotating", "ABCD1234",
               "2256329130905364", "phy12345TomoSTPRot", "20130412", "19140522", "AAAA9876",
               "中心医院", "Breast Imaging Clinic", "OpenREM Foundation"),
}
# (value, its file's character set): the search must hold the bytes the file itself stores
IN_FILE_ENCODING = {"generated": [("东区医院", "ISO_IR 192"), ("FantômeRotatif", "ISO_IR 100")],
                    "vendor": [("中心医院", "ISO_IR 192")]}


@pytest.mark.parametrize("source", SOURCE_PARAMS)
def test_fixture_values_are_worth_searching_for(sources, source):
    needles = needles_of(sources, source)
    for value in WORTH_SEARCHING[source]:
        assert value in needles, value
    for value, charset in IN_FILE_ENCODING[source]:
        assert encode_string(value, convert_encodings(charset)) in needles[value]


def test_image_without_pixel_data_is_quarantined_and_the_others_curated(pipeline):
    folder, n_sources = pipeline["curate"], len(pipeline["sources"])
    no_pixels = CASES.index(next(c for c in CASES if c[0] == NO_PIXEL_CASE))
    view = CASES[no_pixels][3]
    quarantine = pd.read_parquet(folder / "quarantine.parquet")
    assert sorted(quarantine[["item", "kind", "reason"]].values.tolist()) == [
        [f"{patient_of(source, no_pixels)}_LEFT_{view}", "image", "no pixel data"] for source in pipeline["sources"]
    ]
    images = pd.read_parquet(folder / "images.parquet")
    lesions = pd.read_parquet(folder / "lesions.parquet")
    expected = pipeline["expected"]
    assert set(images["image_id"]) == set(expected)
    for image in images.itertuples():
        assert (image.height, image.width) == expected[image.image_id][1]
    got = {r.image_id: [list(b) for b in r.boxes] for r in lesions.itertuples()}
    assert got == {k: v[0] for k, v in expected.items()}
    report = json.loads((folder / "curation_report.json").read_text())
    assert report["quarantined_per_reason"] == {"no pixel data": n_sources}
    assert report["csv_rows"] == 4 * n_sources and report["images"] == 3 * n_sources
    metas = [json.loads(m) for m in images["dicom_meta"]]
    assert {m.get("PhotometricInterpretation") for m in metas} == {"MONOCHROME1", "MONOCHROME2"}


@pytest.mark.parametrize("source", SOURCE_PARAMS)
def test_no_identifying_value_reaches_the_store(pipeline, source):
    store, tree = pipeline["store"], pipeline["tree"]
    needles = needles_of(pipeline["sources"], source)
    files = [p for p in store.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "mlflow.db" in names and "manifest.json" in names and "images.parquet" in names
    assert any(p.suffix == ".db" and "prefect" in p.parts for p in files), "the Prefect database is searched"
    assert not tree.resolve().is_relative_to(store.resolve())
    leaks = []
    for path in files:
        data = path.read_bytes()
        leaks += [f"{path.relative_to(store)}: {value!r}" for value, forms in needles.items()
                  if any(form in data for form in forms)]
    assert leaks == []
    # the search itself works: the raw tree, outside the store, does hold the values
    raw = b"".join(p.read_bytes() for p in tree.rglob("*.dcm"))
    assert all(any(form in raw for form in forms) for forms in needles.values())


@pytest.mark.parametrize("source", SOURCE_PARAMS)
def test_no_identifying_value_reaches_the_console(pipeline, source):
    output = pipeline["output"]
    assert b"curate" in output
    needles = needles_of(pipeline["sources"], source)
    leaks = [value for value, forms in needles.items() if any(form in output for form in forms)]
    assert leaks == []
