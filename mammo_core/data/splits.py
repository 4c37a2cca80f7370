"""Train / validation / test splits by patient.

Images of one patient are correlated (two views of each breast, often several lesions), so a split by
image or by lesion leaks. The rules (DESIGN.md §6):
- a patient with any row in an official test file is test-only: their train-file rows move to test.
  The official files do not respect this themselves (31 patients appear in both), and merging the
  mammograms listed both as Mass and as Calc makes 29 images straddle the official split;
- validation is carved from the remaining train patients, by patient, stratified by whether the patient
  has a malignant lesion, deterministically from the seed;
- no patient appears in two splits (``check_patient_disjoint``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def _patient_table(images: pd.DataFrame) -> pd.DataFrame:
    """Per patient: whether any image comes from a test file, and whether any lesion is malignant."""
    missing = [c for c in ("patient_id", "official_splits", "has_malignant") if c not in images.columns]
    if missing:
        raise ValueError(f"images lack column(s) {missing}; build them with cbis_tables.build_images")
    in_test_file = images["official_splits"].map(lambda s: "test" in s)
    return (
        images.assign(_in_test_file=in_test_file)
        .groupby("patient_id", sort=True)
        .agg(in_test_file=("_in_test_file", "any"), has_malignant=("has_malignant", "any"))
    )


def assign_splits(images: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, dict]:
    """Return (a copy of ``images`` with a ``split`` column, stats).

    In each stratum (patients with / without a malignant lesion) ``round(val_fraction * n)`` train
    patients, drawn with ``numpy.random.default_rng(seed)`` from the sorted patient ids, go to val: the
    result depends only on the patients and the seed, never on row order. Stats count what the
    test-priority rule moved: ``moved_to_test_patients`` (patients with rows in both kinds of file),
    ``moved_to_test_rows`` (train-file rows now in test) and ``moved_to_test_images`` (test images with
    at least one train-file row), plus patients, images and lesions per split.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    patients = _patient_table(images)
    split_of = pd.Series("train", index=patients.index, dtype=object)
    split_of[patients["in_test_file"]] = "test"

    rng = np.random.default_rng(seed)
    trainable = patients[~patients["in_test_file"]]
    for malignant in (False, True):  # fixed order so the draws do not depend on the data's order
        stratum = np.array(sorted(trainable.index[trainable["has_malignant"] == malignant]), dtype=object)
        n_val = int(round(float(val_fraction) * len(stratum)))
        if n_val:
            chosen = rng.permutation(len(stratum))[:n_val]
            split_of[stratum[chosen]] = "val"

    out = images.copy()
    out["split"] = out["patient_id"].map(split_of).astype(object)
    check_patient_disjoint(out)

    is_test = out["split"] == "test"
    train_rows = out["n_train_file_rows"] if "n_train_file_rows" in out.columns else None
    stats: dict = {
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "patients": {s: int((split_of == s).sum()) for s in SPLITS},
        "images": {s: int((out["split"] == s).sum()) for s in SPLITS},
    }
    if "n_lesions" in out.columns:
        stats["lesions"] = {s: int(out.loc[out["split"] == s, "n_lesions"].sum()) for s in SPLITS}
    if train_rows is not None:
        train_patients_rows = out.groupby("patient_id")["n_train_file_rows"].sum()
        stats["moved_to_test_patients"] = int(
            (patients["in_test_file"] & (train_patients_rows.reindex(patients.index) > 0)).sum()
        )
        stats["moved_to_test_rows"] = int(train_rows[is_test].sum())
        stats["moved_to_test_images"] = int((is_test & (train_rows > 0)).sum())
    return out, stats


def check_patient_disjoint(images: pd.DataFrame) -> None:
    """Raise ValueError naming the patients found in more than one split (or images without a split)."""
    if "split" not in images.columns:
        raise ValueError("images have no 'split' column")
    unknown = images.loc[~images["split"].isin(SPLITS), "patient_id"]
    if len(unknown):
        raise ValueError(f"images without a valid split, e.g. of patient {sorted(set(unknown))[0]}")
    per_patient = images.groupby("patient_id")["split"].nunique()
    shared = sorted(per_patient.index[per_patient > 1])
    if shared:
        detail = ", ".join(
            f"{p} ({'/'.join(sorted(set(images.loc[images['patient_id'] == p, 'split'])))})"
            for p in shared[:5]
        )
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        raise ValueError(f"patients in more than one split: {detail}{more}")


def attach_split(lesions: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """Copy each image's split onto its lesions (by ``image_id``); a lesion of an unknown image raises."""
    split_by_image = images.set_index("image_id")["split"]
    out = lesions.copy()
    out["split"] = out["image_id"].map(split_by_image)
    orphans = out.loc[out["split"].isna(), "image_id"]
    if len(orphans):
        raise ValueError(f"lesions of image(s) without a split: {sorted(set(orphans))[:5]}")
    return out
