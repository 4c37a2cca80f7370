"""Patient splits on the real CBIS-DDSM listings, and the class schemes."""

from __future__ import annotations

import pandas as pd
import pytest

from mammo_core.data.cbis_tables import build_images, find_case_csvs, load_case_tables
from mammo_core.data.labels import NORMAL_LABEL, SCHEMES, class_names, label_of
from mammo_core.data.splits import assign_splits, attach_split, check_patient_disjoint
from tests.helpers.fixture_files import CBIS_CSV_DIR

CBIS = CBIS_CSV_DIR


@pytest.fixture(scope="module")
def merged() -> tuple[pd.DataFrame, pd.DataFrame]:
    return build_images(load_case_tables(find_case_csvs(CBIS)).rows)


@pytest.fixture(scope="module")
def split(merged: tuple[pd.DataFrame, pd.DataFrame]) -> tuple[pd.DataFrame, dict]:
    return assign_splits(merged[0], val_fraction=0.15, seed=0)


def test_no_patient_in_two_splits(split: tuple[pd.DataFrame, dict]) -> None:
    images, _ = split
    assert set(images.split) == {"train", "val", "test"}
    assert (images.groupby("patient_id").split.nunique() == 1).all()
    check_patient_disjoint(images)  # does not raise


def test_test_file_patients_are_test_only(split: tuple[pd.DataFrame, dict]) -> None:
    images, stats = split
    test_file_patients = set(images.loc[images.official_splits.map(lambda s: "test" in s), "patient_id"])
    assert len(test_file_patients) == 349
    assert set(images.loc[images.split == "test", "patient_id"]) == test_file_patients
    # the 29 mammograms listed as Mass in one split and Calc in the other all land in test
    assert (images.loc[images.official_splits.map(len) > 1, "split"] == "test").all()
    assert stats["moved_to_test_patients"] == 31
    assert stats["moved_to_test_rows"] == 83
    assert stats["moved_to_test_images"] == 64
    assert stats["patients"]["test"] == 349
    assert stats["images"]["test"] == 676 and stats["images"]["test"] > 641  # 641 by official_split alone
    assert sum(stats["patients"].values()) == 1566
    assert sum(stats["images"].values()) == 3032
    assert sum(stats["lesions"].values()) == 3568


def test_validation_is_carved_by_patient_and_stratified(split: tuple[pd.DataFrame, dict]) -> None:
    images, stats = split
    non_test = images[images.split != "test"]
    per_patient = non_test.groupby("patient_id").agg(
        split=("split", "first"), malignant=("has_malignant", "any")
    )
    for malignant in (False, True):
        stratum = per_patient[per_patient.malignant == malignant]
        assert (stratum.split == "val").sum() == round(0.15 * len(stratum))
    assert stats["patients"]["val"] == (per_patient.split == "val").sum() == 182
    assert stats["patients"]["train"] == 1035


def test_splits_are_deterministic_by_seed(merged: tuple[pd.DataFrame, pd.DataFrame],
                                          split: tuple[pd.DataFrame, dict]) -> None:
    images = merged[0]
    reference = split[0].set_index("image_id").split
    again, _ = assign_splits(images.sample(frac=1.0, random_state=3), 0.15, 0)
    assert again.set_index("image_id").split.sort_index().equals(reference.sort_index())
    other, _ = assign_splits(images, 0.15, 1)
    val_seed0 = set(split[0].loc[split[0].split == "val", "patient_id"])
    val_seed1 = set(other.loc[other.split == "val", "patient_id"])
    assert val_seed0 != val_seed1 and len(val_seed0) == len(val_seed1)
    assert (other.split == "test").equals(split[0].split == "test")


def test_zero_validation_and_bad_fraction(merged: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    images, stats = assign_splits(merged[0], 0.0, 0)
    assert set(images.split) == {"train", "test"} and stats["images"]["val"] == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            assign_splits(merged[0], bad, 0)


def test_check_patient_disjoint_names_the_patient() -> None:
    images = pd.DataFrame({
        "image_id": ["P_1_LEFT_CC", "P_1_LEFT_MLO", "P_2_LEFT_CC"],
        "patient_id": ["P_1", "P_1", "P_2"],
        "split": ["train", "val", "test"],
    })
    with pytest.raises(ValueError, match=r"P_1 \(train/val\)"):
        check_patient_disjoint(images)
    with pytest.raises(ValueError, match="P_2"):
        check_patient_disjoint(images.assign(split=["train", "train", "holdout"]))
    check_patient_disjoint(images.assign(split=["val", "val", "test"]))


def test_attach_split_copies_image_split_to_lesions(merged: tuple[pd.DataFrame, pd.DataFrame],
                                                   split: tuple[pd.DataFrame, dict]) -> None:
    lesions = attach_split(merged[1], split[0])
    assert lesions.groupby("split").size().to_dict() == split[1]["lesions"]
    assert (lesions.groupby("patient_id").split.nunique() == 1).all()
    with pytest.raises(ValueError, match="without a split"):
        attach_split(merged[1], split[0].iloc[1:])


def test_class_schemes() -> None:
    assert SCHEMES == ("seven", "five", "binary")
    assert class_names("seven") == [
        "NORMAL", "MASS_BENIGN", "MASS_BENIGN_WITHOUT_CALLBACK", "MASS_MALIGNANT",
        "CALC_BENIGN", "CALC_BENIGN_WITHOUT_CALLBACK", "CALC_MALIGNANT",
    ]
    assert class_names("five") == ["NORMAL", "MASS_BENIGN", "MASS_MALIGNANT", "CALC_BENIGN", "CALC_MALIGNANT"]
    assert class_names("binary") == ["NOT_MALIGNANT", "MALIGNANT"]
    assert NORMAL_LABEL == 0
    with pytest.raises(ValueError, match="unknown class scheme 'eight'"):
        class_names("eight")


@pytest.mark.parametrize(
    ("abnormality_type", "pathology", "seven", "five", "binary"),
    [
        ("mass", "BENIGN", 1, 1, 0),
        ("mass", "BENIGN_WITHOUT_CALLBACK", 2, 1, 0),
        ("mass", "MALIGNANT", 3, 2, 1),
        ("calc", "BENIGN", 4, 3, 0),
        ("calc", "BENIGN_WITHOUT_CALLBACK", 5, 3, 0),
        ("calc", "MALIGNANT", 6, 4, 1),
    ],
)
def test_label_of(abnormality_type: str, pathology: str, seven: int, five: int, binary: int) -> None:
    assert label_of(abnormality_type, pathology, "seven") == seven
    assert label_of(abnormality_type, pathology, "five") == five
    assert label_of(abnormality_type, pathology, "binary") == binary


def test_label_of_rejects_unknown_values() -> None:
    assert label_of("calcification", "malignant", "seven") == 6
    with pytest.raises(ValueError, match="abnormality type"):
        label_of("asymmetry", "BENIGN", "seven")
    with pytest.raises(ValueError, match="pathology"):
        label_of("mass", "UNKNOWN", "five")
