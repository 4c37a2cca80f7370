"""A deterministic, realistic CBIS-DDSM twin written from a seed (DESIGN.md section 6).

Why: the whole pipeline (curation included) must run with no download, on the very code paths that
real CBIS-DDSM takes. So the phantom reproduces the collection's *files*, not just its pixels:

- the four case-description CSVs with their official names and exact headers (``breast_density`` in
  the mass files, ``breast density`` in the calc files), CRLF records, and the bare newline inside one
  quoted path cell per record (the ROI-mask column in mass files, the cropped-image column in calc
  files), with ``000000.dcm``/``000001.dcm`` in the paths (mass: crop 000000, mask 000001; calc: the
  reverse), exactly as in the real files;
- DICOM files in the classic NBIA layout ``CBIS-DDSM/<SeriesFolder>/<StudyUID>/<SeriesUID>/1-N.dcm``:
  16-bit MONOCHROME2 full mammograms, and per abnormality an ROI series holding a crop and a full-size
  binary mask in a random order (downstream must find the mask by content, as on real data); a few
  mass ROIs put crop and mask in two separate series, as 104 real ones do;
- the real data's structure: several views per patient, several lesions on some images, mammograms
  listed in both the mass and the calc files (same pixels, different UIDs), patients listed in a train
  file and in a test file, and out-of-range values (subtlety 0, breast density 0, assessment 0).

Every CSV row has at least one lesion on its image (CBIS has no lesion-free mammogram); NORMAL patches
are sampled later from breast tissue away from the lesions, and lesions cover only a small part of
each breast. The same seed gives byte-identical CSVs and DICOM files (no timestamps anywhere).
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from mammo_core.sources import phantom_render as pr
from mammo_core.storage.durable import write_bytes_atomic

MASS_HEADER = (
    "patient_id,breast_density,left or right breast,image view,abnormality id,abnormality type,"
    "mass shape,mass margins,assessment,pathology,subtlety,image file path,cropped image file path,"
    "ROI mask file path"
)
CALC_HEADER = (
    "patient_id,breast density,left or right breast,image view,abnormality id,abnormality type,"
    "calc type,calc distribution,assessment,pathology,subtlety,image file path,cropped image file path,"
    "ROI mask file path"
)
CSV_NAMES = {
    ("mass", "train"): "mass_case_description_train_set.csv",
    ("mass", "test"): "mass_case_description_test_set.csv",
    ("calc", "train"): "calc_case_description_train_set.csv",
    ("calc", "test"): "calc_case_description_test_set.csv",
}
DATA_DIR = "CBIS-DDSM"
UID_ROOT = "1.3.6.1.4.1.9590.100.1.2."  # the root CBIS-DDSM's own UIDs use
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # CBIS-DDSM stores its images as secondary captures
# Column (0-based) whose quoted cell ends in a bare newline, and the file names of crop and mask.
_QUOTED_COLUMN = {"mass": 13, "calc": 12}
_CROP_MASK_NAMES = {"mass": ("000000.dcm", "000001.dcm"), "calc": ("000001.dcm", "000000.dcm")}
_FIXED_DATE = "20000101"  # the one synthetic date: nothing time-dependent goes into a file

PATHOLOGIES = ("BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT")


@dataclass(frozen=True)
class PhantomSummary:
    """What was written. ``lesions`` counts CSV rows per class (e.g. ``MASS_MALIGNANT``)."""

    patients: int
    images: int  # physical mammograms (one listed as mass and calc counts once)
    full_image_series: int
    roi_series: int
    lesions: dict[str, int]
    csv_rows: dict[str, int]
    files_written: int


# ---------------------------------------------------------------------------------------------------
# Attribute tables: CSV vocabulary by pathology. Distributions overlap on purpose (about 15% of
# malignant masses are round/oval and circumscribed, some benign ones irregular or spiculated), so
# pathology is learnable from appearance but not perfectly.

def _table(**weights: float) -> tuple[list[str], np.ndarray]:
    names = [k.replace("__", "-") for k in weights]
    p = np.asarray(list(weights.values()), float)
    return names, p / p.sum()


_MASS_SHAPE = {
    "MALIGNANT": _table(IRREGULAR=48, IRREGULAR__ARCHITECTURAL_DISTORTION=8, LOBULATED=14, OVAL=11, ROUND=8,
                        ARCHITECTURAL_DISTORTION=7, FOCAL_ASYMMETRIC_DENSITY=3, LOBULATED__IRREGULAR=1),
    "BENIGN": _table(OVAL=32, LOBULATED=25, ROUND=14, IRREGULAR=14, ARCHITECTURAL_DISTORTION=5, LYMPH_NODE=4,
                     ASYMMETRIC_BREAST_TISSUE=3, FOCAL_ASYMMETRIC_DENSITY=2, ROUND__OVAL=1),
    "BENIGN_WITHOUT_CALLBACK": _table(OVAL=30, ROUND=20, LOBULATED=20, LYMPH_NODE=12, IRREGULAR=8,
                                      ASYMMETRIC_BREAST_TISSUE=10),
}
_MASS_MARGINS = {
    "MALIGNANT": _table(SPICULATED=37, ILL_DEFINED=24, MICROLOBULATED=10, CIRCUMSCRIBED=13, OBSCURED=8,
                        ILL_DEFINED__SPICULATED=5, CIRCUMSCRIBED__ILL_DEFINED=3),
    "BENIGN": _table(CIRCUMSCRIBED=40, OBSCURED=20, ILL_DEFINED=24, MICROLOBULATED=5, SPICULATED=6,
                     CIRCUMSCRIBED__OBSCURED=4, NA=1),
    "BENIGN_WITHOUT_CALLBACK": _table(CIRCUMSCRIBED=45, OBSCURED=20, ILL_DEFINED=20, NA=15),
}
_CALC_TYPE = {
    "MALIGNANT": _table(PLEOMORPHIC=45, FINE_LINEAR_BRANCHING=15, PLEOMORPHIC__FINE_LINEAR_BRANCHING=8,
                        AMORPHOUS=12, PUNCTATE__PLEOMORPHIC=7, PUNCTATE=8, ROUND_AND_REGULAR=3,
                        COARSE__PLEOMORPHIC=2),
    "BENIGN": _table(PLEOMORPHIC=25, PUNCTATE=12, AMORPHOUS=8, ROUND_AND_REGULAR__LUCENT_CENTER=8,
                     LUCENT_CENTER=10, ROUND_AND_REGULAR=8, COARSE=7, VASCULAR=5, EGGSHELL=4, DYSTROPHIC=5,
                     PUNCTATE__PLEOMORPHIC=4, LARGE_RODLIKE=4),
    "BENIGN_WITHOUT_CALLBACK": _table(VASCULAR=20, LUCENT_CENTER=20, ROUND_AND_REGULAR__LUCENT_CENTER=12,
                                      PUNCTATE=12, COARSE=8, ROUND_AND_REGULAR=10, EGGSHELL=5, DYSTROPHIC=5,
                                      PLEOMORPHIC=5, SKIN=3),
}
_CALC_DISTRIBUTION = {
    "MALIGNANT": _table(CLUSTERED=50, SEGMENTAL=17, LINEAR=13, CLUSTERED__LINEAR=7, REGIONAL=5, NA=8),
    "BENIGN": _table(CLUSTERED=45, NA=20, REGIONAL=12, SEGMENTAL=10, LINEAR=6, DIFFUSELY_SCATTERED=7),
    "BENIGN_WITHOUT_CALLBACK": _table(NA=45, CLUSTERED=20, REGIONAL=15, DIFFUSELY_SCATTERED=10, SEGMENTAL=10),
}
_ASSESSMENT = {
    ("mass", "MALIGNANT"): ([4, 5, 3, 0, 2], [45, 38, 6, 9, 2]),
    ("mass", "BENIGN"): ([4, 3, 2, 0, 5, 1], [38, 28, 12, 11, 6, 0.5]),
    ("mass", "BENIGN_WITHOUT_CALLBACK"): ([3, 2, 4, 0], [35, 35, 15, 15]),
    ("calc", "MALIGNANT"): ([4, 5, 3, 0, 2], [60, 25, 5, 8, 2]),
    ("calc", "BENIGN"): ([4, 2, 3, 0, 5], [55, 22, 10, 6, 7]),
    ("calc", "BENIGN_WITHOUT_CALLBACK"): ([2, 3, 0, 4], [80, 6, 6, 8]),
}
_PATHOLOGY_P = {"mass": [0.44, 0.08, 0.48], "calc": [0.34, 0.30, 0.36]}  # order of PATHOLOGIES
_SUBTLETY_P = {"mass": [0.04, 0.08, 0.20, 0.28, 0.40], "calc": [0.06, 0.16, 0.32, 0.23, 0.23]}


def _pick(rng: np.random.Generator, table: tuple[list[str], np.ndarray]) -> str:
    names, p = table
    return names[int(rng.choice(len(names), p=p))]


def _mass_spec(rng: np.random.Generator, pathology: str, shape: str, margins: str) -> pr.MassSpec:
    """Physical mass drawn from its CSV shape and margins (and a pathology-dependent size)."""
    median_mm = {"MALIGNANT": 7.5, "BENIGN": 6.5, "BENIGN_WITHOUT_CALLBACK": 5.0}[pathology]
    radius = float(np.clip(median_mm * np.exp(rng.normal(0, 0.3)), 3.0, 18.0))
    harm: list[tuple[int, float, float]] = []
    aspect = rng.uniform(0.88, 1.0)
    if "IRREGULAR" in shape:
        aspect = rng.uniform(0.6, 1.0)
        for k in range(2, 8):
            harm.append((k, float(rng.uniform(0.06, 0.36) / k ** 0.5), float(rng.uniform(0, 2 * np.pi))))
    elif "LOBULATED" in shape:
        aspect = rng.uniform(0.7, 1.0)
        for k in rng.choice([3, 4, 5], size=int(rng.integers(1, 3)), replace=False):
            harm.append((int(k), float(rng.uniform(0.08, 0.16)), float(rng.uniform(0, 2 * np.pi))))
    elif "OVAL" in shape or "LYMPH_NODE" in shape:
        aspect = rng.uniform(0.5, 0.8)
    elif "ASYMMETRIC" in shape or shape == "ARCHITECTURAL_DISTORTION":
        aspect = rng.uniform(0.5, 0.9)
        radius *= 1.4
        harm.append((2, float(rng.uniform(0.05, 0.15)), float(rng.uniform(0, 2 * np.pi))))
    harm.append((int(rng.integers(2, 4)), float(rng.uniform(0.0, 0.03)), float(rng.uniform(0, 2 * np.pi))))
    if "MICROLOBULATED" in margins:
        for k in rng.choice(np.arange(9, 17), size=2, replace=False):
            harm.append((int(k), float(rng.uniform(0.03, 0.06)), float(rng.uniform(0, 2 * np.pi))))
    n_spic, spic_len = 0, 0.0
    if "SPICULATED" in margins or "ARCHITECTURAL_DISTORTION" in shape:
        n_spic = int(rng.integers(8, 22))
        spic_len = float(rng.uniform(0.8, 2.0))
    return pr.MassSpec(radius_mm=radius, aspect=float(aspect), shape=shape, margins=margins,
                       harmonics=harm, n_spicules=n_spic, spicule_length=spic_len)


def _calc_spec(rng: np.random.Generator, pathology: str, calc_type: str, distribution: str) -> pr.CalcSpec:
    """Physical cluster: malignant clusters hold more, smaller calcifications than benign ones."""
    lo, hi = {"MALIGNANT": (12, 40), "BENIGN": (4, 16), "BENIGN_WITHOUT_CALLBACK": (2, 9)}[pathology]
    n = int(rng.integers(lo, hi + 1))
    if any(t in calc_type for t in ("COARSE", "DYSTROPHIC", "LUCENT", "EGGSHELL", "RODLIKE")):
        n = max(2, n // 3)
    extent = float(rng.uniform(5.0, 14.0))
    if distribution in ("SEGMENTAL", "REGIONAL", "DIFFUSELY_SCATTERED") or "LINEAR" in distribution:
        extent *= 1.6
    if "VASCULAR" in calc_type:
        extent = float(rng.uniform(12.0, 28.0))
    return pr.CalcSpec(calc_type=calc_type, distribution=distribution, n_calcs=n, extent_mm=extent)


# ---------------------------------------------------------------------------------------------------
# Planning: who, which images, which lesions, which file, which UIDs.

@dataclass
class _Lesion:
    kind: str  # "mass" | "calc"
    pathology: str
    subtlety: int
    assessment: int
    attr1: str  # mass shape | calc type
    attr2: str  # mass margins | calc distribution
    spec: pr.MassSpec | pr.CalcSpec


@dataclass
class _Roi:
    folder: str
    crop_study: str
    crop_series: str
    mask_study: str
    mask_series: str
    crop_first: bool  # crop is 1-1.dcm (else 1-2.dcm); irrelevant when crop and mask are split


@dataclass
class _Listing:
    """One physical image as listed in one CSV file (kind x split)."""

    kind: str
    split: str
    folder: str
    study: str
    series: str
    lesion_idx: list[int]  # indices into the image's lesions, in abnormality-id order
    rois: list[_Roi] = field(default_factory=list)


@dataclass
class _Image:
    index: int
    patient: str
    side: str
    view: str
    density: int
    lesions: list[_Lesion]
    listings: list[_Listing] = field(default_factory=list)


def _uid(rng: np.random.Generator) -> str:
    n = int(rng.integers(36, 40))  # the root has 25 characters; a UID may have 64
    digits = rng.integers(0, 10, size=n)
    digits[0] = rng.integers(1, 10)
    return UID_ROOT + "".join(map(str, digits.tolist()))


def _new_lesion(rng: np.random.Generator, kind: str) -> _Lesion:
    pathology = PATHOLOGIES[int(rng.choice(3, p=_PATHOLOGY_P[kind]))]
    subtlety = int(rng.choice(5, p=_SUBTLETY_P[kind])) + 1
    values, weights = _ASSESSMENT[(kind, pathology)]
    w = np.asarray(weights, float)
    assessment = int(values[int(rng.choice(len(values), p=w / w.sum()))])
    if kind == "mass":
        a1, a2 = _pick(rng, _MASS_SHAPE[pathology]), _pick(rng, _MASS_MARGINS[pathology])
        spec: pr.MassSpec | pr.CalcSpec = _mass_spec(rng, pathology, a1, a2)
    else:
        a1, a2 = _pick(rng, _CALC_TYPE[pathology]), _pick(rng, _CALC_DISTRIBUTION[pathology])
        if "VASCULAR" in a1 and rng.uniform() < 0.8:
            a2 = "NA"
        spec = _calc_spec(rng, pathology, a1, a2)
    return _Lesion(kind, pathology, subtlety, assessment, a1, a2, spec)


def _n_lesions(rng: np.random.Generator, several: bool) -> int:
    if several:
        return int(rng.integers(2, 4))
    return int(rng.choice([1, 2, 3, 4], p=[0.90, 0.07, 0.025, 0.005]))


def _plan(n_patients: int, seed: int) -> list[_Image]:
    """Decide every patient, image, lesion, file listing and UID (no pixels)."""
    rng = np.random.default_rng([seed, 0x5EED])
    ids = np.sort(rng.choice(np.arange(1, int(n_patients * 1.35) + 3), size=n_patients, replace=False))
    # A few patients play a guaranteed role so that small phantoms still carry every structure.
    roles = {int(i): r for i, r in zip(rng.permutation(n_patients)[:3], ("shared", "several", "bilateral"),
                                                strict=False)}
    images: list[_Image] = []
    for pi, num in enumerate(ids):
        pid = f"P_{int(num):05d}"
        role = roles.get(pi, "")
        split = "test" if rng.uniform() < 0.22 else "train"
        density = int(rng.choice([1, 2, 3, 4], p=[0.14, 0.40, 0.32, 0.14]))
        both_sides = role in ("bilateral", "shared") or rng.uniform() < 0.25
        sides = ["LEFT", "RIGHT"] if both_sides else [str(rng.choice(["LEFT", "RIGHT"]))]
        flip_calc = False
        for si, side in enumerate(sides):
            shared = (role == "shared" and si == 0) or rng.uniform() < 0.025
            if shared:
                kinds = ["mass", "calc"]
                flip_calc = flip_calc or role == "shared" or rng.uniform() < 0.4
            else:
                kinds = ["mass"] if rng.uniform() < 0.47 else ["calc"]
            lesions: list[_Lesion] = []
            for kind in kinds:
                several = role == "several" and si == 0
                lesions += [_new_lesion(rng, kind) for _ in range(_n_lesions(rng, several))]
            views = ["CC", "MLO"] if (rng.uniform() < 0.88 or role == "bilateral") else \
                [str(rng.choice(["CC", "MLO"]))]
            for view in views:
                images.append(_Image(len(images), pid, side, view, density, lesions))
        for img in images:
            if img.patient != pid:
                continue
            for kind in ("mass", "calc"):
                idx = [i for i, les in enumerate(img.lesions) if les.kind == kind]
                if not idx:
                    continue
                ksplit = split
                if kind == "calc" and flip_calc:
                    ksplit = "test" if split == "train" else "train"
                word = "Training" if ksplit == "train" else "Test"
                folder = f"{kind.capitalize()}-{word}_{pid}_{img.side}_{img.view}"
                img.listings.append(_Listing(kind, ksplit, folder, _uid(rng), _uid(rng), idx))
    # ROI series (after all images so that the role draws above stay stable).
    n_split = 0
    for img in images:
        for lst in img.listings:
            for a in range(1, len(lst.lesion_idx) + 1):
                study, series = _uid(rng), _uid(rng)
                split_roi = lst.kind == "mass" and (rng.uniform() < 0.03 or (n_split == 0 and img.index >= 3))
                if split_roi:
                    n_split += 1
                    lst.rois.append(_Roi(f"{lst.folder}_{a}", study, series, _uid(rng), _uid(rng), True))
                else:
                    lst.rois.append(_Roi(f"{lst.folder}_{a}", study, series, study, series,
                                         bool(rng.uniform() < 0.5)))
    return images


# ---------------------------------------------------------------------------------------------------
# CSV writing.

def _csv_rows(images: list[_Image], seed: int) -> dict[tuple[str, str], list[list[str]]]:
    rows: dict[tuple[str, str], list[list[str]]] = {k: [] for k in CSV_NAMES}
    for img in images:
        for lst in img.listings:
            crop_name, mask_name = _CROP_MASK_NAMES[lst.kind]
            full = f"{lst.folder}/{lst.study}/{lst.series}/000000.dcm"
            for a, (li, roi) in enumerate(zip(lst.lesion_idx, lst.rois, strict=True), start=1):
                les = img.lesions[li]
                split = roi.crop_series != roi.mask_series  # separate series: both files are 000000.dcm
                crop_file, mask_file = ("000000.dcm", "000000.dcm") if split else (crop_name, mask_name)
                crop = f"{roi.folder}/{roi.crop_study}/{roi.crop_series}/{crop_file}"
                mask = f"{roi.folder}/{roi.mask_study}/{roi.mask_series}/{mask_file}"
                kind_word = "mass" if lst.kind == "mass" else "calcification"
                rows[(lst.kind, lst.split)].append([
                    img.patient, str(img.density), img.side, img.view, str(a), kind_word, les.attr1,
                    les.attr2, str(les.assessment), les.pathology, str(les.subtlety), full, crop, mask])
    for key in rows:
        rows[key].sort(key=lambda r: (r[0], r[2], r[3], int(r[4])))
    # Out-of-range values the real files carry: subtlety 0 on a mass row, density 0 on a calc image.
    rng = np.random.default_rng([seed, 0xBAD])
    mass_rows = rows[("mass", "train")] or rows[("mass", "test")]
    if mass_rows:
        mass_rows[int(rng.integers(len(mass_rows)))][10] = "0"
    calc_rows = rows[("calc", "test")] or rows[("calc", "train")]
    if calc_rows:
        victim = calc_rows[int(rng.integers(len(calc_rows)))]
        for r in calc_rows:
            if r[11] == victim[11]:
                r[1] = "0"
    return rows


def _csv_bytes(kind: str, rows: list[list[str]]) -> bytes:
    """CBIS serialisation: CRLF records, one quoted cell ending in a bare LF, nothing else quoted."""
    q = _QUOTED_COLUMN[kind]
    lines = [MASS_HEADER if kind == "mass" else CALC_HEADER]
    for r in rows:
        cells = list(r)
        cells[q] = f'"{cells[q]}\n"'
        lines.append(",".join(cells))
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


# ---------------------------------------------------------------------------------------------------
# DICOM writing.

def _atomic_write(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data, fsync=False)  # regenerated from its seed: a power loss costs a rerun only


def _dicom_bytes(pixels: np.ndarray, *, folder: str, patient: str, study: str, series: str, sop: str,
                 side: str, view: str, description: str, instance: int) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "MG"
    ds.ConversionType = "DF"
    # Synthetic identifiers: present on purpose so that downstream PHI guards have something to catch.
    ds.PatientName = f"PHANTOM^{patient}"
    ds.PatientID = folder
    ds.PatientBirthDate = "19500101"
    ds.PatientSex = "F"
    ds.StudyDate = _FIXED_DATE
    ds.StudyID = "DDSM"
    ds.AccessionNumber = ""
    ds.SeriesDescription = description
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.BodyPartExamined = "BREAST"
    ds.ImageLaterality = side[0]
    ds.Laterality = side[0]
    ds.ViewPosition = view
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Rendering one physical image and writing its files.

def _place(rng: np.random.Generator, geom: pr.BreastGeometry, radius: float,
           taken: list[tuple[float, float, float]]) -> tuple[float, float]:
    """A lesion centre well inside the breast, off the pectoral muscle, apart from other lesions."""
    h, w = geom.ellipse.shape
    best, best_score = (geom.nipple[0], geom.nipple[1] * 0.5), -np.inf
    for _ in range(200):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        iy, ix = int(y), int(x)
        if geom.ellipse[iy, ix] > 0.8 or geom.pectoral[iy, ix] > 0.0:
            continue
        ring = [(int(np.clip(y + dy, 0, h - 1)), int(np.clip(x + dx, 0, w - 1)))
                for dy, dx in ((radius, 0), (-radius, 0), (0, radius), (0, -radius))]
        if any(geom.pectoral[p] > 0.0 or geom.ellipse[p] > 0.95 for p in ring):
            continue
        margin = min(y, h - y, x, w - x) - radius * 0.5
        gap = min((np.hypot(y - ty, x - tx) - tr - radius for ty, tx, tr in taken), default=1e9)
        score = min(margin, gap)
        if score > 0:
            return y, x
        if score > best_score:
            best, best_score = (y, x), score
    return best


def _render_image(img: _Image, seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng([seed, 0x1A6E, img.index])
    geom = pr.breast_geometry(rng, shape, img.view)
    canvas = pr.render_breast(rng, geom, img.density)
    scale = pr.px_per_mm(shape)
    taken: list[tuple[float, float, float]] = []
    masks: list[np.ndarray] = []
    for les in img.lesions:
        spec = les.spec
        is_mass = isinstance(spec, pr.MassSpec)
        core = spec.radius_mm * scale * 1.3 if is_mass else pr.calc_extent_px(spec, scale)
        y, x = _place(rng, geom, core, taken)
        taken.append((y, x, core))
        gain = rng.uniform(0.85, 1.15) * (pr.BWC_CONTRAST_FACTOR if les.pathology == "BENIGN_WITHOUT_CALLBACK"
                                          else 1.0)
        if isinstance(spec, pr.MassSpec):
            mask = pr.render_mass(canvas, rng, spec, y, x, pr.MASS_CONTRAST[les.subtlety] * gain)
        else:
            nipple_dir = float(np.arctan2(geom.nipple[0] - y, geom.nipple[1] - x))
            mask = pr.render_calcs(canvas, rng, spec, y, x, pr.CALC_CONTRAST[les.subtlety] * gain, nipple_dir)
        mask &= geom.inside > 0.5
        if not mask.any():  # lesion pushed to the edge: keep a minimal ROI around its centre
            mask[max(0, int(y) - 2):int(y) + 3, max(0, int(x) - 2):int(x) + 3] = True
        masks.append(mask)
    pixels = pr.to_uint16(pr.add_noise(rng, canvas, geom.inside))
    if img.side == "RIGHT":
        pixels = np.ascontiguousarray(pixels[:, ::-1])
        masks = [np.ascontiguousarray(m[:, ::-1]) for m in masks]
    return pixels, masks


def _crop_box(mask: np.ndarray, rng: np.random.Generator) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    pad_y = max(4, int((ys.max() - ys.min() + 1) * rng.uniform(0.05, 0.25)))
    pad_x = max(4, int((xs.max() - xs.min() + 1) * rng.uniform(0.05, 0.25)))
    return (slice(max(0, ys.min() - pad_y), min(h, ys.max() + pad_y + 1)),
            slice(max(0, xs.min() - pad_x), min(w, xs.max() + pad_x + 1)))


def _write_image(root: Path, img: _Image, seed: int, shape: tuple[int, int]) -> int:
    pixels, masks = _render_image(img, seed, shape)
    rng = np.random.default_rng([seed, 0xF11E, img.index])
    base = root / DATA_DIR
    written = 0
    common = dict(patient=img.patient, side=img.side, view=img.view)
    for lst in img.listings:
        data = _dicom_bytes(pixels, folder=lst.folder, study=lst.study, series=lst.series, sop=_uid(rng),
                            description="full mammogram images", instance=1, **common)
        _atomic_write(base / lst.folder / lst.study / lst.series / "1-1.dcm", data)
        written += 1
        for li, roi in zip(lst.lesion_idx, lst.rois, strict=True):
            mask = masks[li]
            crop = pixels[_crop_box(mask, rng)]
            mask_px = np.where(mask, np.uint8(255), np.uint8(0))
            split = roi.crop_series != roi.mask_series
            crop_file = "1-1.dcm" if (split or roi.crop_first) else "1-2.dcm"
            mask_file = "1-1.dcm" if (split or not roi.crop_first) else "1-2.dcm"
            for px, study, series, fname, desc in (
                    (crop, roi.crop_study, roi.crop_series, crop_file, "cropped images"),
                    (mask_px, roi.mask_study, roi.mask_series, mask_file, "ROI mask images")):
                data = _dicom_bytes(px, folder=roi.folder, study=study, series=series, sop=_uid(rng),
                                    description=desc, instance=int(fname[2]), **common)
                _atomic_write(base / roi.folder / study / series / fname, data)
                written += 1
    return written


def generate_phantom(out: Path, *, n_patients: int, seed: int, image_shape: tuple[int, int] = (1024, 640),
                     progress: Callable[[int, int], None] | None = None,
                     workers: int | None = None) -> PhantomSummary:
    """Write a CBIS-DDSM twin under ``out`` (four CSVs + ``CBIS-DDSM/`` DICOM tree); same seed, same bytes.

    ``progress(done, total)`` is called after each physical mammogram. ``workers`` threads render in
    parallel (default: up to 4, bounded by the CPU count); the result does not depend on it.
    """
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    h, w = (int(image_shape[0]), int(image_shape[1]))
    if h < 128 or w < 96:
        raise ValueError(f"image_shape too small for a mammogram: {image_shape}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = _plan(n_patients, seed)
    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    files = 0
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = [pool.submit(_write_image, out, img, seed, (h, w)) for img in images]
        for done, fut in enumerate(futures, start=1):
            files += fut.result()
            if progress is not None:
                progress(done, len(images))
    rows = _csv_rows(images, seed)
    for (kind, split), name in CSV_NAMES.items():
        _atomic_write(out / name, _csv_bytes(kind, rows[(kind, split)]))
        files += 1
    lesions: Counter[str] = Counter()
    for key, rs in rows.items():
        for r in rs:
            lesions[f"{key[0].upper()}_{r[9]}"] += 1
    return PhantomSummary(
        patients=n_patients,
        images=len(images),
        full_image_series=sum(len(img.listings) for img in images),
        roi_series=len({(r[12].split("/")[0], r[12].split("/")[2]) for rs in rows.values() for r in rs}
                       | {(r[13].split("/")[0], r[13].split("/")[2]) for rs in rows.values() for r in rs}),
        lesions=dict(sorted(lesions.items())),
        csv_rows={CSV_NAMES[k]: len(v) for k, v in rows.items()},
        files_written=files,
    )
