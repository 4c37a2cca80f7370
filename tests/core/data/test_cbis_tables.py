"""The CBIS-DDSM case CSV parser against the real published files (in-repo copies, tests/fixtures/cbis-ddsm;
facts from the shared fixtures README)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from mammo_core.data.cbis_tables import (
    CSV_NAMES,
    CaseTable,
    CsvSchemaError,
    build_images,
    cbis_counts,
    find_case_csvs,
    load_case_tables,
    read_case_csv,
)
from tests.helpers.fixture_files import CBIS_CSV_DIR

CBIS = CBIS_CSV_DIR
FIXTURES = CBIS.parent  # find_case_csvs searches below a root
MASS_TRAIN = CSV_NAMES[("mass", "train")]
MASS_TEST = CSV_NAMES[("mass", "test")]
CALC_TRAIN = CSV_NAMES[("calc", "train")]
CALC_TEST = CSV_NAMES[("calc", "test")]


@pytest.fixture(scope="module")
def table() -> CaseTable:
    return load_case_tables(find_case_csvs(CBIS))


@pytest.fixture(scope="module")
def rows(table: CaseTable) -> pd.DataFrame:
    return table.rows


@pytest.fixture(scope="module")
def merged(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    return build_images(rows)


def test_every_row_of_the_real_files_parses(table: CaseTable) -> None:
    assert table.rejected.empty
    assert list(table.rejected.columns) == ["item", "reason"]
    assert len(table.rows) == 3568


def test_rows_per_file(rows: pd.DataFrame) -> None:
    assert rows.groupby("source_file").size().to_dict() == {
        MASS_TRAIN: 1318, MASS_TEST: 378, CALC_TRAIN: 1546, CALC_TEST: 326,
    }
    per_split = rows.groupby(["source_file", "official_split"]).size()
    assert per_split[(MASS_TRAIN, "train")] == 1318 and per_split[(CALC_TEST, "test")] == 326
    assert set(rows.loc[rows.source_file.str.startswith("mass"), "abnormality_type"]) == {"mass"}
    assert set(rows.loc[rows.source_file.str.startswith("calc"), "abnormality_type"]) == {"calc"}


def test_pathology_per_file(rows: pd.DataFrame) -> None:
    expected = {
        MASS_TRAIN: (637, 577, 104),
        MASS_TEST: (147, 194, 37),
        CALC_TRAIN: (544, 528, 474),
        CALC_TEST: (129, 130, 67),
    }
    for name, (malignant, benign, bwc) in expected.items():
        counts = rows.loc[rows.source_file == name, "pathology"].value_counts().to_dict()
        assert counts == {"MALIGNANT": malignant, "BENIGN": benign, "BENIGN_WITHOUT_CALLBACK": bwc}, name


def test_patients_series_and_images(rows: pd.DataFrame) -> None:
    counts = cbis_counts(rows)
    assert counts["n_rows"] == 3568
    assert counts["n_patients"] == 1566
    assert counts["n_series_full"] == 3103
    assert counts["n_series_full_train_files"] == 2458
    assert counts["n_series_full_test_files"] == 645
    assert counts["n_series_roi"] == 3672
    assert counts["n_series"] == 6775
    assert counts["n_dicom_images"] == 10239
    assert counts["n_roi_crop_mask_in_separate_series"] == 104
    assert counts["n_series_with_several_abnormalities"] == 293
    assert counts["max_abnormalities_per_series"] == 7
    assert counts["n_mammograms_mass_and_calc"] == 71
    assert counts["n_mammograms_mass_and_calc_crossing_split"] == 29
    assert counts["n_physical_mammograms"] == 3103 - 71
    assert counts["pathology_per_file"][MASS_TEST] == {"BENIGN": 194, "MALIGNANT": 147,
                                                       "BENIGN_WITHOUT_CALLBACK": 37}


def test_out_of_range_values_are_kept_and_flagged(rows: pd.DataFrame) -> None:
    assert (rows.subtlety == 0).sum() == 2
    assert (rows.breast_density == 0).sum() == 2
    assert (rows.assessment == 0).sum() == 238
    flagged = rows[rows.out_of_range]
    assert len(flagged) == 240  # no row has two out-of-range fields
    assert flagged.out_of_range_fields.str.contains("subtlety=0").sum() == 2
    assert flagged.out_of_range_fields.str.contains("breast_density=0").sum() == 2
    assert (rows.loc[~rows.out_of_range, "out_of_range_fields"] == "").all()
    assert set(rows.loc[rows.breast_density == 0, "source_file"]) == {CALC_TEST}
    assert set(rows.loc[rows.subtlety == 0, "source_file"]) == {MASS_TRAIN}
    per_field = cbis_counts(rows)["out_of_range_per_field"]
    assert per_field == {"breast_density": 2, "subtlety": 2, "assessment": 238}


def test_both_header_variants_parse_to_the_same_columns() -> None:
    headers = {name: (CBIS / name).read_bytes().split(b"\r\n", 1)[0].decode() for name in CSV_NAMES.values()}
    assert "breast_density" in headers[MASS_TRAIN] and "breast density" not in headers[MASS_TRAIN]
    assert "breast density" in headers[CALC_TRAIN] and "breast_density" not in headers[CALC_TRAIN]
    assert "mass shape" in headers[MASS_TEST] and "calc type" in headers[CALC_TEST]
    mass = read_case_csv(CBIS / MASS_TEST).rows
    calc = read_case_csv(CBIS / CALC_TEST).rows
    assert list(mass.columns) == list(calc.columns)
    assert mass.breast_density.between(1, 4).all()
    assert calc.breast_density.value_counts().sort_index().index.tolist() == [0, 1, 2, 3, 4]
    # attributes of the other abnormality type are NA; the literal "NA" in the files becomes NA too
    assert mass.calc_type.isna().all() and mass.calc_distribution.isna().all()
    assert calc.mass_shape.isna().all() and calc.mass_margins.isna().all()
    assert mass.mass_shape.notna().all()
    assert 0 < calc.calc_type.isna().sum() < len(calc)
    assert not (calc.calc_type == "NA").any()


def test_crlf_and_newline_inside_quoted_path_are_stripped(rows: pd.DataFrame) -> None:
    raw = (CBIS / CALC_TEST).read_bytes()
    assert b"\r\n" in raw and b'000001.dcm\n"' in raw  # the quirk is really in the file
    for column in ("image_path", "crop_path", "mask_path", "patient_id", "pathology"):
        assert not rows[column].str.contains(r"\s", regex=True).any(), column
    first_calc_test = rows[(rows.source_file == CALC_TEST) & (rows.source_row == 1)].iloc[0]
    assert first_calc_test.patient_id == "P_00038"
    assert first_calc_test.crop_path.endswith(
        "1.3.6.1.4.1.9590.100.1.2.419081637812053404913157930753972718515/000001.dcm"
    )
    assert first_calc_test.crop_series_uid.endswith(".419081637812053404913157930753972718515")
    # crop and mask names are kept as the CSV gives them: swapped between mass and calc files
    first_mass_train = rows[(rows.source_file == MASS_TRAIN) & (rows.source_row == 1)].iloc[0]
    assert first_mass_train.crop_path.endswith("/000000.dcm")
    assert first_mass_train.mask_path.endswith("/000001.dcm")
    assert first_calc_test.mask_path.endswith("/000000.dcm")


def test_source_rows_are_data_record_numbers(rows: pd.DataFrame) -> None:
    mass = rows[rows.source_file == MASS_TRAIN]
    assert mass.source_row.tolist() == list(range(1, 1319))
    first = mass.iloc[0]
    assert (first.patient_id, first.side, first.view, first.abnormality_id) == ("P_00001", "LEFT", "CC", 1)
    assert (first.mass_shape, first.mass_margins) == ("IRREGULAR-ARCHITECTURAL_DISTORTION", "SPICULATED")
    assert (first.assessment, first.pathology, first.subtlety, first.breast_density) == (4, "MALIGNANT", 4, 3)


def test_images_merge_mass_and_calc_listings(merged: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    images, lesions = merged
    assert len(images) == 3032 and images.image_id.is_unique
    assert len(lesions) == 3568 and lesions.lesion_id.is_unique
    assert images.n_lesions.sum() == 3568
    assert sum(len(s) for s in images.full_series_uids) == 3103
    assert images.full_series_uids.explode().nunique() == 3103
    several_series = images[images.full_series_uids.map(len) > 1]
    assert len(several_series) == 71
    assert (several_series.abnormality_types.map(tuple) == ("calc", "mass")).all()
    crossing = images[images.official_splits.map(len) > 1]
    assert len(crossing) == 29 and (crossing.official_split == "test").all()
    assert (images.n_lesions > 1).sum() == 334  # 293 multi-lesion series + merged listings
    assert images.n_lesions.max() == 7
    assert images.groupby("official_split").size().to_dict() == {"train": 2391, "test": 641}
    example = images.set_index("image_id").loc["P_00016_LEFT_CC"]
    assert example.lesion_ids == ["P_00016_LEFT_CC_CALC_2", "P_00016_LEFT_CC_MASS_1"]
    assert example.source_files == [CALC_TRAIN, MASS_TEST]
    assert example.image_path.startswith("Calc-Training_P_00016_LEFT_CC/")
    assert example.full_series_uid == example.full_series_uids[0]
    assert example.full_image_paths[1].startswith("Mass-Test_P_00016_LEFT_CC/")
    assert (example.n_train_file_rows, example.n_test_file_rows) == (1, 1)
    # every lesion points at an image, and the image lists it
    by_image = images.set_index("image_id")
    assert all(lid in by_image.at[iid, "lesion_ids"] for lid, iid in zip(lesions.lesion_id, lesions.image_id,
                                                                          strict=True))
    has_malignant = lesions.groupby("image_id").pathology.agg(lambda s: (s == "MALIGNANT").any())
    assert (by_image.has_malignant == has_malignant.reindex(by_image.index)).all()


def test_build_images_does_not_depend_on_row_order(rows: pd.DataFrame,
                                                   merged: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    shuffled_images, shuffled_lesions = build_images(rows.sample(frac=1.0, random_state=7))
    images, lesions = merged
    pd.testing.assert_frame_equal(shuffled_images, images)
    pd.testing.assert_frame_equal(shuffled_lesions, lesions)


def _copy_with(tmp_path: Path, name: str, edit) -> Path:
    text = (CBIS / name).read_bytes().decode()
    target = tmp_path / name
    target.write_bytes(edit(text).encode())
    return target


def test_renamed_column_raises_schema_error_naming_file_and_column(tmp_path: Path) -> None:
    path = _copy_with(tmp_path, MASS_TRAIN, lambda t: t.replace(",pathology,", ",diagnosis,", 1))
    with pytest.raises(CsvSchemaError) as info:
        read_case_csv(path)
    assert isinstance(info.value, ValueError)
    assert MASS_TRAIN in str(info.value) and "pathology" in str(info.value)


def test_missing_attribute_columns_raise_schema_error(tmp_path: Path) -> None:
    path = _copy_with(tmp_path, CALC_TEST, lambda t: t.replace("calc distribution", "distribution", 1))
    with pytest.raises(CsvSchemaError, match="calc distribution"):
        read_case_csv(path)


def test_bad_rows_are_rejected_with_reason_while_others_survive(tmp_path: Path) -> None:
    def corrupt(text: str) -> str:
        lines = text.split("\r\n")
        # split on CRLF only: record 1 (with its bare newline inside quotes) is lines[1]
        assert lines[2].startswith("P_00038,2,LEFT,MLO,1,")
        lines[2] = lines[2].replace("Calc-Test_P_00038_LEFT_MLO/", "../x/", 1)
        return "\r\n".join(lines)

    path = _copy_with(tmp_path, CALC_TEST, corrupt)
    table = read_case_csv(path)
    assert len(table.rows) == 325
    assert table.rejected.item.tolist() == [f"{CALC_TEST}:row 2"]
    assert "escapes the data root" in table.rejected.reason.iloc[0]
    assert 2 not in set(table.rows.source_row)


def test_bad_int_and_unknown_pathology_are_rejected(tmp_path: Path) -> None:
    def corrupt(text: str) -> str:
        text = text.replace("P_00016,4,LEFT,CC,1,mass,IRREGULAR,SPICULATED,5,MALIGNANT,5,",
                            "P_00016,4,LEFT,CC,1,mass,IRREGULAR,SPICULATED,5,MALIGN,x,", 1)
        return text

    table = read_case_csv(_copy_with(tmp_path, MASS_TEST, corrupt))
    assert len(table.rows) == 377
    assert table.rejected.item.tolist() == [f"{MASS_TEST}:row 1"]
    reason = table.rejected.reason.iloc[0]
    assert reason == ("row 1: column 'subtlety' is not an integer; "
                      "column 'pathology' is not one of MALIGNANT/BENIGN/BENIGN_WITHOUT_CALLBACK")


# A value no real cell holds: if it shows up in a reason, the reason quotes the cell.
CANARY = "Doe^Jane 1961-04-12 ACC-88412"


@pytest.mark.parametrize(("column", "position", "problem"), [
    ("patient_id", 0, "is empty or holds a slash or whitespace"),
    ("breast_density", 1, "is not an integer"),
    ("left or right breast", 2, "is not LEFT/RIGHT"),
    ("image view", 3, "is not CC/MLO"),
    ("abnormality type", 5, "is not mass/calcification"),
    ("pathology", 9, "is not one of MALIGNANT/BENIGN/BENIGN_WITHOUT_CALLBACK"),
    ("image file path", 11, "is not a CBIS path: expected folder/study_uid/series_uid/file"),
])
def test_rejection_names_row_and_column_never_the_cell(tmp_path: Path, column: str, position: int,
                                                       problem: str) -> None:
    """Reasons reach quarantine.parquet, curation_report.json and MLflow: a bad cell's value must not."""
    def plant(text: str) -> str:
        lines = text.split("\r\n")
        cells = lines[3].split(",")  # record 3 of the file (record 1 spans two physical lines)
        assert cells[0] == "P_00017" and len(cells) > 11, cells[:2]
        cells[position] = CANARY
        lines[3] = ",".join(cells)
        return "\r\n".join(lines)

    table = read_case_csv(_copy_with(tmp_path, MASS_TEST, plant))
    assert table.rejected.item.tolist() == [f"{MASS_TEST}:row 3"]
    (reason,) = table.rejected.reason.tolist()
    assert reason.startswith(f"row 3: column {column!r} {problem}"), reason
    assert len(table.rows) == 377 and 3 not in set(table.rows.source_row)
    words = [w for w in CANARY.replace("^", " ").split() if len(w) > 3]
    assert not any(w in table.rejected.to_csv() for w in words)


def test_duplicate_abnormality_is_rejected(tmp_path: Path) -> None:
    def duplicate_first_record(text: str) -> str:
        header, rest = text.split("\r\n", 1)
        first_record = rest.split("\r\n", 1)[0]
        return f"{header}\r\n{rest}{first_record}\r\n"

    table = read_case_csv(_copy_with(tmp_path, MASS_TEST, duplicate_first_record))
    assert len(table.rows) == 378
    assert table.rejected.item.tolist() == [f"{MASS_TEST}:row 379"]
    assert f"{MASS_TEST}:row 1" in table.rejected.reason.iloc[0]


def test_official_split_from_parameter_when_name_does_not_tell(tmp_path: Path) -> None:
    path = tmp_path / "mass_cases.csv"
    shutil.copyfile(CBIS / MASS_TEST, path)
    with pytest.raises(ValueError, match="official split"):
        read_case_csv(path)
    table = read_case_csv(path, official_split="test")
    assert len(table.rows) == 378 and set(table.rows.official_split) == {"test"}
    assert set(table.rows.source_file) == {"mass_cases.csv"}


def test_find_case_csvs(tmp_path: Path) -> None:
    found = find_case_csvs(FIXTURES)
    assert [p.name for p in found] == list(CSV_NAMES.values())
    nested = tmp_path / "CBIS" / "csv"
    nested.mkdir(parents=True)
    shutil.copyfile(CBIS / MASS_TEST, nested / MASS_TEST.upper())
    with pytest.raises(FileNotFoundError) as info:
        find_case_csvs(tmp_path)
    message = str(info.value)
    assert MASS_TRAIN in message and CALC_TRAIN in message and CALC_TEST in message
    assert MASS_TEST not in message
    assert find_case_csvs(tmp_path, required=[("mass", "test")]) == [nested / MASS_TEST.upper()]
    shutil.copyfile(CBIS / MASS_TEST, tmp_path / MASS_TEST)
    with pytest.raises(ValueError, match="more than once"):
        find_case_csvs(tmp_path, required=[("mass", "test")])
