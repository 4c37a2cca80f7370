"""Test helpers: turn a classic-layout CBIS-DDSM tree (the phantom's) into the other on-disk layouts.

Real downloads come in three shapes (see :mod:`mammo_core.data.layouts`); the phantom writes only the
classic one. These converters rebuild the same data in the descriptive NBIA layout (with or without
the retriever's ``metadata.csv``) and in the Kaggle JPEG repackaging, so curation can be checked to give
the same result whatever the layout. They also hold small editing helpers for the quirk tests.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

DATA_DIR = "CBIS-DDSM"
CASE_CSV_GLOB = "*_case_description_*_set.csv"
# Header of the NBIA Data Retriever's metadata.csv (the descriptive layout's join table).
RETRIEVER_HEADER = [
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID", "Study UID",
    "Study Description", "Study Date", "Series Description", "Manufacturer", "Modality", "SOP Class Name",
    "SOP Class UID", "Number of Images", "File Size", "File Location", "Download Timestamp",
]
DICOM_INFO_HEADER = [
    "file_path", "image_path", "PatientID", "SeriesDescription", "SeriesInstanceUID", "StudyInstanceUID",
    "Rows", "Columns",
]


def classic_series(root: Path) -> Iterator[tuple[str, str, str, Path]]:
    """(folder, study UID, series UID, series dir) of every series of a classic tree, sorted."""
    for series_dir in sorted((root / DATA_DIR).glob("*/*/*")):
        if series_dir.is_dir():
            yield series_dir.parent.parent.name, series_dir.parent.name, series_dir.name, series_dir


def uid_tail(uid: str) -> str:
    """Last five digits of a UID: what the descriptive layout's folder names end with."""
    return uid.replace(".", "")[-5:]


def _series_description(series_dir: Path) -> str:
    """The descriptive folder's text: from the files' SeriesDescription; a crop+mask series is 'ROI mask'."""
    found = {str(pydicom.dcmread(f, stop_before_pixels=True).get("SeriesDescription", ""))
             for f in sorted(series_dir.glob("*.dcm"))}
    if "full mammogram images" in found:
        return "full mammogram images"
    if found == {"cropped images"}:
        return "cropped images"
    return "ROI mask images"


def copy_case_csvs(src: Path, dst: Path) -> list[Path]:
    """Copy the four case CSVs of ``src`` (top level) byte for byte into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for csv_path in sorted(src.glob(CASE_CSV_GLOB)):
        copied.append(Path(shutil.copy2(csv_path, dst / csv_path.name)))
    return copied


def to_descriptive(src: Path, dst: Path, *, with_metadata: bool) -> Path:
    """Rebuild the classic tree ``src`` in the descriptive NBIA layout under ``dst``.

    ``CBIS-DDSM/<folder>/<MM-DD-YYYY-DDSM[-NA]-<study tail>>/1.000000-<description>-<series tail>/1-N.dcm``;
    both study-folder spellings seen on real downloads are used (with and without ``-NA``). With
    ``with_metadata`` the retriever's ``metadata.csv`` (Series UID -> ``./CBIS-DDSM/...`` location) is
    written at ``dst``.
    """
    copy_case_csvs(src, dst)
    rows = []
    for i, (folder, study, series, series_dir) in enumerate(classic_series(src)):
        study_dir = f"08-29-2017-DDSM-NA-{uid_tail(study)}" if i % 2 else f"07-20-2016-DDSM-{uid_tail(study)}"
        description = _series_description(series_dir)
        rel = Path(DATA_DIR) / folder / study_dir / f"1.000000-{description}-{uid_tail(series)}"
        shutil.copytree(series_dir, dst / rel)
        files = sorted(series_dir.glob("*.dcm"))
        rows.append({
            "Series UID": series, "Collection": "CBIS-DDSM", "3rd Party Analysis": "NO",
            "Data Description URI": "", "Subject ID": folder, "Study UID": study, "Study Description": "",
            "Study Date": "", "Series Description": description, "Manufacturer": "", "Modality": "MG",
            "SOP Class Name": "Secondary Capture Image Storage", "SOP Class UID": "1.2.840.10008.5.1.4.1.1.7",
            "Number of Images": str(len(files)),
            "File Size": f"{sum(f.stat().st_size for f in files) / 1e6:.2f} MB",
            "File Location": "./" + rel.as_posix(), "Download Timestamp": "",
        })
    if with_metadata:
        with open(dst / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=RETRIEVER_HEADER)
            writer.writeheader()
            writer.writerows(rows)
    return dst


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """Stored pixels -> uint8 by min/max scaling (a binary 0/255 mask stays 0/255)."""
    if pixels.dtype == np.uint8:
        return pixels
    values = pixels.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_jpeg(src: Path, dst: Path, *, quality: int = 90) -> Path:
    """Rebuild ``src`` in the Kaggle JPEG layout: ``csv/`` (case CSVs + dicom_info.csv) + ``jpeg/<SeriesUID>/``.

    Every DICOM becomes an 8-bit JPEG (lossy, masks included: the reader must cope with the ringing).
    """
    copy_case_csvs(src, dst / "csv")
    info = []
    for folder, study, series, series_dir in classic_series(src):
        out_dir = dst / "jpeg" / series
        out_dir.mkdir(parents=True, exist_ok=True)
        for dcm in sorted(series_dir.glob("*.dcm")):
            ds = pydicom.dcmread(dcm)
            jpg = out_dir / f"{dcm.stem}.jpg"
            Image.fromarray(to_8bit(ds.pixel_array)).save(jpg, format="JPEG", quality=quality)
            info.append({
                "file_path": f"CBIS-DDSM/dicom/{ds.SOPInstanceUID}.dcm",
                "image_path": f"CBIS-DDSM/jpeg/{series}/{jpg.name}", "PatientID": folder,
                "SeriesDescription": str(ds.get("SeriesDescription", "")), "SeriesInstanceUID": series,
                "StudyInstanceUID": study, "Rows": str(ds.Rows), "Columns": str(ds.Columns),
            })
    with open(dst / "csv" / "dicom_info.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=DICOM_INFO_HEADER)
        writer.writeheader()
        writer.writerows(info)
    return dst


def series_dir_of(root: Path, cbis_path: str) -> Path:
    """The classic-layout folder of the series a CSV path names."""
    folder, study, series, _ = cbis_path.strip().split("/")
    return root / DATA_DIR / folder / study / series


def is_full_binary_mask(pixels: np.ndarray, shape: tuple[int, int]) -> bool:
    values = np.unique(pixels)
    return pixels.shape == shape and len(values) == 2 and values[0] == 0


def mask_file_of(root: Path, crop_path: str, mask_path: str, shape: tuple[int, int]) -> Path:
    """The file holding a lesion's mask in a classic tree, found by content (binary, image-sized)."""
    dirs = dict.fromkeys([series_dir_of(root, crop_path), series_dir_of(root, mask_path)])
    hits = [f for d in dirs for f in sorted(d.glob("*.dcm"))
            if is_full_binary_mask(pydicom.dcmread(f).pixel_array, shape)]
    if len(hits) != 1:
        raise AssertionError(f"expected one mask among {list(dirs)}, found {hits}")
    return hits[0]


def rewrite_pixels(path: Path, pixels: np.ndarray) -> None:
    """Replace the pixels (and Rows/Columns) of an uncompressed DICOM, keeping its header."""
    ds = pydicom.dcmread(path)
    pixels = np.ascontiguousarray(pixels.astype(ds.pixel_array.dtype))
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
