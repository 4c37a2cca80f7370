"""The CBIS-DDSM case-description CSVs: one row per abnormality, parsed into one normalized table.

The four official files disagree with each other (``breast_density`` vs ``breast density``, mass vs calc
attribute columns), end records in CRLF and carry a bare newline inside one quoted path per file; this
module hides all of that behind snake_case columns. A file that lacks a column is unusable as a whole
(``CsvSchemaError``); a single row that cannot be parsed is not: it is returned in ``CaseTable.rejected``
with its reason so that curation quarantines it and goes on with the others.

The crop and mask names are swapped between the mass and the calc files, and the order of the two files
inside an ROI series is not reliable either. ``crop_path`` and ``mask_path`` are therefore kept exactly as
the CSV names them: downstream must treat both as mask candidates and identify the mask by content
(binary values, same size as the full image).

``build_images`` then merges the rows into physical mammograms. A physical mammogram is identified by
(patient_id, side, view): 71 of them are listed both as Mass and as Calc, under two different full-image
series UIDs, and 29 of those sit in a train file on one side and a test file on the other. Keeping them
apart would put one image in two splits, so they are merged with all their lesions and series UIDs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mammo_core.data.cbis_paths import CbisPath, CbisPathError, parse_cbis_path

ABNORMALITY_TYPES = ("mass", "calc")
OFFICIAL_SPLITS = ("train", "test")
PATHOLOGIES = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")
SIDES = ("LEFT", "RIGHT")
VIEWS = ("CC", "MLO")

CSV_NAMES: dict[tuple[str, str], str] = {
    ("mass", "train"): "mass_case_description_train_set.csv",
    ("mass", "test"): "mass_case_description_test_set.csv",
    ("calc", "train"): "calc_case_description_train_set.csv",
    ("calc", "test"): "calc_case_description_test_set.csv",
}

# Normalized header (lower case, runs of spaces/underscores -> "_") -> our column name.
_HEADER_ALIASES = {
    "patient_id": "patient_id",
    "breast_density": "breast_density",
    "left_or_right_breast": "side",
    "image_view": "view",
    "abnormality_id": "abnormality_id",
    "abnormality_type": "abnormality_type",
    "mass_shape": "mass_shape",
    "mass_margins": "mass_margins",
    "calc_type": "calc_type",
    "calc_distribution": "calc_distribution",
    "assessment": "assessment",
    "pathology": "pathology",
    "subtlety": "subtlety",
    "image_file_path": "image_path",
    "cropped_image_file_path": "crop_path",
    "roi_mask_file_path": "mask_path",
}
# Our column name -> the header as the official files spell it, for error messages.
_OFFICIAL_HEADER = {
    "patient_id": "patient_id",
    "breast_density": "breast_density",
    "side": "left or right breast",
    "view": "image view",
    "abnormality_id": "abnormality id",
    "abnormality_type": "abnormality type",
    "mass_shape": "mass shape",
    "mass_margins": "mass margins",
    "calc_type": "calc type",
    "calc_distribution": "calc distribution",
    "assessment": "assessment",
    "pathology": "pathology",
    "subtlety": "subtlety",
    "image_path": "image file path",
    "crop_path": "cropped image file path",
    "mask_path": "ROI mask file path",
}
_CORE_COLUMNS = (
    "patient_id", "breast_density", "side", "view", "abnormality_id", "abnormality_type",
    "assessment", "pathology", "subtlety", "image_path", "crop_path", "mask_path",
)
_ATTRIBUTE_COLUMNS = {"mass": ("mass_shape", "mass_margins"), "calc": ("calc_type", "calc_distribution")}
_TYPE_ALIASES = {"mass": "mass", "calcification": "calc", "calc": "calc"}

# Valid ranges. Values outside are kept (they are in the published data) but flagged: subtlety 0 and
# breast density 0 are not defined by the scales, and BI-RADS assessment 0 ("incomplete, needs more
# imaging") is no final assessment of a lesion that has a pathology.
VALID_RANGES: dict[str, tuple[int, int]] = {
    "breast_density": (1, 4),
    "subtlety": (1, 5),
    "assessment": (1, 5),
}

ROW_COLUMNS = [
    "patient_id", "breast_density", "side", "view", "abnormality_id", "abnormality_type",
    "mass_shape", "mass_margins", "calc_type", "calc_distribution", "assessment", "pathology",
    "subtlety", "image_path", "crop_path", "mask_path",
    "full_study_uid", "full_series_uid", "crop_study_uid", "crop_series_uid",
    "mask_study_uid", "mask_series_uid",
    "out_of_range", "out_of_range_fields", "official_split", "source_file", "source_row",
]
REJECTED_COLUMNS = ["item", "reason"]


class CsvSchemaError(ValueError):
    """A case CSV lacks required columns (or is no CSV at all); the message names the file and columns."""


@dataclass
class CaseTable:
    """Parsed abnormality rows plus the rows that could not be used (``item``, ``reason``)."""

    rows: pd.DataFrame
    rejected: pd.DataFrame


def _normalize_header(name: str) -> str:
    return re.sub(r"[\s_]+", "_", str(name).strip().lower())


def _from_file_name(name: str, choices: tuple[str, ...]) -> str | None:
    """The one of ``choices`` that the file name contains, or None when it names none or several."""
    low = name.lower()
    found = [c for c in choices if c in low]
    return found[0] if len(found) == 1 else None


def _attribute(text: str) -> str | None:
    return None if text in ("", "NA", "N/A", "nan", "NaN", "None") else text


def _clean(cell: object) -> str:
    # Strips the bare newline the official files carry inside one quoted path per file, and CR/spaces.
    return str(cell).strip()


def _parse_row(cells: dict[str, str], attribute_type: str, headers: dict[str, str]) -> dict:
    """One CSV record -> one normalized row dict; raises ValueError listing every problem found.

    A problem names the column (as the file spells its header), never the cell's value: the reason ends
    up in quarantine.parquet, curation_report.json and MLflow, and a mistyped cell may hold anything, a
    patient's name included. The row number lets a person look the value up in the file itself.
    """
    problems: list[str] = []
    out: dict = {}

    def bad(column: str, problem: str) -> None:
        problems.append(f"column {headers.get(column, column)!r} {problem}")

    patient_id = cells["patient_id"]
    if not patient_id or "/" in patient_id or any(ch.isspace() for ch in patient_id):
        bad("patient_id", "is empty or holds a slash or whitespace")
    out["patient_id"] = patient_id

    for field in ("breast_density", "abnormality_id", "assessment", "subtlety"):
        if re.fullmatch(r"[+-]?\d+", cells[field]):
            out[field] = int(cells[field])
        else:
            bad(field, "is not an integer")

    side, view = cells["side"].upper(), cells["view"].upper()
    if side not in SIDES:
        bad("side", "is not LEFT/RIGHT")
    if view not in VIEWS:
        bad("view", "is not CC/MLO")
    out["side"], out["view"] = side, view

    abnormality_type = _TYPE_ALIASES.get(cells["abnormality_type"].lower())
    if abnormality_type is None:
        bad("abnormality_type", "is not mass/calcification")
    elif abnormality_type != attribute_type:
        bad("abnormality_type", f"is {abnormality_type!r} in a {attribute_type} file")
    out["abnormality_type"] = abnormality_type

    pathology = cells["pathology"].upper()
    if pathology not in PATHOLOGIES:
        bad("pathology", f"is not one of {'/'.join(PATHOLOGIES)}")
    out["pathology"] = pathology

    for t, columns in _ATTRIBUTE_COLUMNS.items():
        for column in columns:
            out[column] = _attribute(cells[column]) if t == attribute_type else None

    parsed: dict[str, CbisPath] = {}
    for column, prefix in (("image_path", "full"), ("crop_path", "crop"), ("mask_path", "mask")):
        out[column] = cells[column]
        try:
            parsed[prefix] = parse_cbis_path(cells[column])
        except CbisPathError as exc:
            bad(column, f"is not a CBIS path: {exc.problem}")
            continue
        out[f"{prefix}_study_uid"] = parsed[prefix].study_uid
        out[f"{prefix}_series_uid"] = parsed[prefix].series_uid
    image_key = f"{patient_id}_{side}_{view}"
    if "full" in parsed:
        if not parsed["full"].folder.endswith(image_key):
            bad("image_path", "names a folder of another patient, side or view than the row")
        for prefix, column in (("crop", "crop_path"), ("mask", "mask_path")):
            if prefix in parsed and not parsed[prefix].folder.startswith(parsed["full"].folder):
                bad(column, f"names a folder that is not an ROI series of the {headers.get('image_path')!r} folder")

    if problems:
        raise ValueError("; ".join(problems))

    flagged = [
        f"{field}={out[field]}"
        for field, (low, high) in VALID_RANGES.items()
        if not low <= out[field] <= high
    ]
    out["out_of_range"] = bool(flagged)
    out["out_of_range_fields"] = ";".join(flagged)
    return out


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def _rows_frame(records: list[dict]) -> pd.DataFrame:
    if not records:
        return _empty(ROW_COLUMNS)
    frame = pd.DataFrame.from_records(records, columns=ROW_COLUMNS)
    for column in ("breast_density", "abnormality_id", "assessment", "subtlety", "source_row"):
        frame[column] = frame[column].astype("int64")
    frame["out_of_range"] = frame["out_of_range"].astype(bool)
    return frame


def read_case_csv(path: Path, official_split: str | None = None) -> CaseTable:
    """Parse one case-description CSV into normalized rows plus rejected rows.

    ``official_split`` defaults to the "train"/"test" word in the file name. ``source_row`` is the
    1-based data record number (header excluded), not the physical line: quoted paths span two lines.
    Raises CsvSchemaError when required columns are missing, ValueError when the split is unknown.
    """
    path = Path(path)
    name = path.name
    split = official_split or _from_file_name(name, OFFICIAL_SPLITS)
    if split not in OFFICIAL_SPLITS:
        raise ValueError(f"{name}: cannot tell the official split (train/test); pass official_split")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CsvSchemaError(f"{name}: not a readable case CSV ({exc})") from exc

    columns: dict[str, str] = {}
    for header in raw.columns:
        ours = _HEADER_ALIASES.get(_normalize_header(header))
        if ours is not None and ours not in columns:
            columns[ours] = header
    missing = [c for c in _CORE_COLUMNS if c not in columns]
    attribute_type = _from_file_name(name, ABNORMALITY_TYPES)
    if attribute_type is None:  # not an official name: infer the kind from the columns present
        present = [t for t, cols in _ATTRIBUTE_COLUMNS.items() if any(c in columns for c in cols)]
        attribute_type = present[0] if len(present) == 1 else None
    if attribute_type is None:
        missing.append("mass shape/mass margins or calc type/calc distribution")
    else:
        missing += [c for c in _ATTRIBUTE_COLUMNS[attribute_type] if c not in columns]
    if missing:
        names = ", ".join(_OFFICIAL_HEADER.get(c, c) for c in missing)
        # only recognised headers are quoted: a file without a header row would show its first record here
        known = [str(h) for h in raw.columns if _normalize_header(h) in _HEADER_ALIASES]
        others = len(raw.columns) - len(known)
        raise CsvSchemaError(f"{name}: missing required column(s): {names} (found: {known} "
                             f"and {others} other column(s))")

    ordered = [columns[c] for c in _CORE_COLUMNS + _ATTRIBUTE_COLUMNS[attribute_type]]
    keys = list(_CORE_COLUMNS + _ATTRIBUTE_COLUMNS[attribute_type])
    headers = {k: str(columns[k]).strip() for k in keys}
    records: list[dict] = []
    rejected: list[dict] = []
    for number, values in enumerate(raw[ordered].itertuples(index=False, name=None), start=1):
        cells = {k: _clean(v) for k, v in zip(keys, values, strict=True)}
        for other in _ATTRIBUTE_COLUMNS.values():
            for column in other:
                cells.setdefault(column, "")
        try:
            row = _parse_row(cells, attribute_type, headers)
        except ValueError as exc:
            rejected.append({"item": f"{name}:row {number}", "reason": f"row {number}: {exc}"})
            continue
        row.update(official_split=split, source_file=name, source_row=number)
        records.append(row)

    rows = _rows_frame(records)
    rows, duplicates = _split_duplicate_lesions(rows)
    rejected_frame = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
    return CaseTable(rows=rows, rejected=_concat([rejected_frame, duplicates], REJECTED_COLUMNS))


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty(columns)
    return pd.concat(frames, ignore_index=True)[columns]


_LESION_KEY = ["patient_id", "side", "view", "abnormality_type", "abnormality_id"]


def _split_duplicate_lesions(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first row of each lesion key; later repeats are rejected (they would double a lesion)."""
    if rows.empty:
        return rows, _empty(REJECTED_COLUMNS)
    repeated = rows.duplicated(_LESION_KEY, keep="first")
    if not repeated.any():
        return rows.reset_index(drop=True), _empty(REJECTED_COLUMNS)
    first = rows[~repeated].set_index(_LESION_KEY)
    reasons = []
    for _, row in rows[repeated].iterrows():
        original = first.loc[tuple(row[k] for k in _LESION_KEY)]
        reasons.append({
            "item": f"{row['source_file']}:row {row['source_row']}",
            "reason": "duplicate abnormality (same patient, side, view, type and abnormality id) as "
                      f"{original['source_file']}:row {original['source_row']}",
        })
    return rows[~repeated].reset_index(drop=True), pd.DataFrame(reasons, columns=REJECTED_COLUMNS)


def load_case_tables(paths: Iterable[Path]) -> CaseTable:
    """Read several case CSVs (official split from each file name) into one table."""
    tables = [read_case_csv(Path(p)) for p in paths]
    rows = _concat([t.rows for t in tables], ROW_COLUMNS)
    rows, duplicates = _split_duplicate_lesions(rows)
    rejected = _concat([t.rejected for t in tables] + [duplicates], REJECTED_COLUMNS)
    return CaseTable(rows=rows, rejected=rejected)


def find_case_csvs(root: Path, required: Iterable[tuple[str, str]] | None = None) -> list[Path]:
    """Find the official case CSVs anywhere under ``root`` (names compared case-insensitively).

    ``required`` lists the (abnormality_type, official_split) keys of CSV_NAMES to look for; default
    all four. Returns them in the order of ``required``. Raises FileNotFoundError naming the missing
    files, ValueError when a name occurs more than once (which copy to trust is the user's call).
    """
    root = Path(root)
    keys = list(CSV_NAMES) if required is None else list(required)
    unknown = [k for k in keys if k not in CSV_NAMES]
    if unknown:
        raise ValueError(f"unknown case CSV key(s) {unknown}; choose from {list(CSV_NAMES)}")
    wanted = {CSV_NAMES[k]: k for k in keys}
    found: dict[str, list[Path]] = {n: [] for n in wanted}
    if root.is_dir():
        for candidate in root.rglob("*"):
            low = candidate.name.lower()
            if low in found and candidate.is_file():
                found[low].append(candidate)
    missing = [n for n, hits in found.items() if not hits]
    if missing:
        raise FileNotFoundError(f"case CSV(s) not found under {root}: {', '.join(missing)}")
    several = {n: hits for n, hits in found.items() if len(hits) > 1}
    if several:
        listing = "; ".join(f"{n}: {', '.join(str(h) for h in sorted(hits))}" for n, hits in several.items())
        raise ValueError(f"case CSV(s) found more than once under {root}: {listing}")
    return [found[CSV_NAMES[k]][0] for k in keys]


def lesion_id_of(patient_id: str, side: str, view: str, abnormality_type: str, abnormality_id: int) -> str:
    """Stable, readable lesion id, e.g. ``P_00001_LEFT_CC_MASS_1`` (unique over the four files)."""
    return f"{patient_id}_{side}_{view}_{abnormality_type.upper()}_{int(abnormality_id)}"


def image_id_of(patient_id: str, side: str, view: str) -> str:
    """Stable id of a physical mammogram, e.g. ``P_00001_LEFT_CC``."""
    return f"{patient_id}_{side}_{view}"


IMAGE_COLUMNS = [
    "image_id", "patient_id", "side", "view", "breast_density", "image_path", "full_series_uid",
    "full_series_uids", "full_image_paths", "abnormality_types", "official_splits", "official_split",
    "n_lesions", "n_train_file_rows", "n_test_file_rows", "has_malignant", "lesion_ids", "source_files",
]


def build_images(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge abnormality rows into (images, lesions).

    ``lesions``: the rows plus ``lesion_id`` and ``image_id``. ``images``: one row per physical
    mammogram (patient_id, side, view) with all its lesions and full-image series
    (``full_image_paths`` and ``full_series_uids`` are parallel lists ordered by path). The primary
    ``image_path``/``full_series_uid`` is the lexicographically smallest path, so it does not depend on
    file order; ``official_split`` is "test" when any of its rows comes from a test file;
    ``breast_density`` is the highest one listed (the official files never disagree on it).
    """
    lesions = rows.copy()
    if lesions.empty:
        lesions["lesion_id"] = pd.Series(dtype=object)
        lesions["image_id"] = pd.Series(dtype=object)
        return pd.DataFrame({c: pd.Series(dtype=object) for c in IMAGE_COLUMNS}), lesions
    lesions["image_id"] = [
        image_id_of(p, s, v)
        for p, s, v in zip(lesions["patient_id"], lesions["side"], lesions["view"], strict=True)
    ]
    lesions["lesion_id"] = [
        lesion_id_of(*key)
        for key in zip(*(lesions[c] for c in _LESION_KEY), strict=True)
    ]
    lesions = lesions.sort_values(["image_id", "lesion_id"], kind="stable").reset_index(drop=True)
    lesions = lesions[["lesion_id", "image_id"] + [c for c in rows.columns]]

    # Vectorized aggregations only (lambdas per group cost a second on the full collection).
    flags = lesions.assign(
        _train=(lesions["official_split"] == "train").astype("int64"),
        _test=(lesions["official_split"] == "test").astype("int64"),
        _malignant=lesions["pathology"] == "MALIGNANT",
    )
    images = flags.groupby("image_id", sort=True).agg(
        patient_id=("patient_id", "first"),
        side=("side", "first"),
        view=("view", "first"),
        breast_density=("breast_density", "max"),
        n_lesions=("lesion_id", "size"),
        n_train_file_rows=("_train", "sum"),
        n_test_file_rows=("_test", "sum"),
        has_malignant=("_malignant", "any"),
        lesion_ids=("lesion_id", list),
    )

    def listed(column: str) -> pd.Series:
        """Sorted unique values of ``column`` per image, as Python lists."""
        unique = lesions[["image_id", column]].drop_duplicates().sort_values(["image_id", column])
        return unique.groupby("image_id", sort=True)[column].agg(list)

    # Keep full_image_paths and full_series_uids parallel: both ordered by image path.
    series = (
        lesions[["image_id", "image_path", "full_series_uid"]]
        .drop_duplicates()
        .sort_values(["image_id", "image_path"])
        .groupby("image_id", sort=True)
    )
    images["full_image_paths"] = series["image_path"].agg(list)
    images["full_series_uids"] = series["full_series_uid"].agg(list)
    images["image_path"] = images["full_image_paths"].str[0]
    images["full_series_uid"] = images["full_series_uids"].str[0]
    images["abnormality_types"] = listed("abnormality_type")
    images["official_splits"] = listed("official_split")
    images["source_files"] = listed("source_file")
    images = images.reset_index()
    images["official_split"] = ["test" if "test" in s else "train" for s in images["official_splits"]]
    for column in ("n_lesions", "n_train_file_rows", "n_test_file_rows", "breast_density"):
        images[column] = images[column].astype("int64")
    images["has_malignant"] = images["has_malignant"].astype(bool)
    return images[IMAGE_COLUMNS], lesions


def cbis_counts(rows: pd.DataFrame) -> dict:
    """Counts that describe a set of case rows (compare with the published collection figures).

    Series counts are of unique series UIDs; ``n_dicom_images`` assumes the CBIS layout of one full
    image per full series and one crop plus one mask per abnormality.
    """
    full_by_split = rows.groupby("official_split")["full_series_uid"].nunique().to_dict()
    roi_series = set(rows["crop_series_uid"]) | set(rows["mask_series_uid"])
    per_series = rows.groupby("full_series_uid").size()
    image_keys = rows.groupby(["patient_id", "side", "view"])
    per_image = image_keys.agg(
        n_rows=("abnormality_id", "size"),
        n_types=("abnormality_type", "nunique"),
        n_splits=("official_split", "nunique"),
        n_series=("full_series_uid", "nunique"),
    )
    merged = per_image[per_image["n_series"] > 1]
    n_full = int(rows["full_series_uid"].nunique())
    counts = {
        "n_rows": int(len(rows)),
        "n_rows_per_file": {k: int(v) for k, v in rows.groupby("source_file").size().items()},
        "n_patients": int(rows["patient_id"].nunique()),
        "n_series_full": n_full,
        "n_series_full_train_files": int(full_by_split.get("train", 0)),
        "n_series_full_test_files": int(full_by_split.get("test", 0)),
        "n_series_roi": len(roi_series),
        "n_series": n_full + len(roi_series),
        "n_dicom_images": n_full + 2 * int(len(rows)),
        "n_roi_crop_mask_in_separate_series": int((rows["crop_series_uid"] != rows["mask_series_uid"]).sum()),
        "n_physical_mammograms": int(len(per_image)),
        "n_mammograms_mass_and_calc": int((per_image["n_types"] > 1).sum()),
        "n_mammograms_mass_and_calc_crossing_split": int(
            ((per_image["n_types"] > 1) & (per_image["n_splits"] > 1)).sum()
        ),
        "n_mammograms_merged_from_several_series": int(len(merged)),
        "n_series_with_several_abnormalities": int((per_series > 1).sum()),
        "max_abnormalities_per_series": int(per_series.max()) if len(per_series) else 0,
        "n_mammograms_with_several_abnormalities": int((per_image["n_rows"] > 1).sum()),
        "max_abnormalities_per_mammogram": int(per_image["n_rows"].max()) if len(per_image) else 0,
        "pathology_per_file": {
            f: {k: int(v) for k, v in g["pathology"].value_counts().items()}
            for f, g in rows.groupby("source_file")
        },
        "n_out_of_range_rows": int(rows["out_of_range"].sum()),
        "out_of_range_per_field": {
            field: int(((rows[field] < low) | (rows[field] > high)).sum())
            for field, (low, high) in VALID_RANGES.items()
        },
    }
    return counts
