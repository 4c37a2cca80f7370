"""Where the tests' real-data fixtures live, so that a clone with nothing beside it passes its tests.

- The four CBIS-DDSM case-description CSVs are in the repository (``tests/fixtures/cbis-ddsm/``, CC BY 3.0,
  attribution in the README beside them), byte-identical to the published files: ``CBIS_CSV_MD5`` is
  checked by tests/helpers/test_fixture_files.py.
- The four vendor mammography DICOMs (OpenREM test data, GPLv3) are never copied in: tests run on
  equivalents written by :mod:`tests.helpers.dicom_factory`, and on the real files only when a ``shared/fixtures``
  folder sits beside the clone (our machines, CI). :func:`vendor_dicom_files` skips otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.paths import REPO

CBIS_CSV_DIR = REPO / "tests" / "fixtures" / "cbis-ddsm"

# md5 of the published files (The Cancer Imaging Archive, CBIS-DDSM), computed from the copies in
# ../shared/fixtures/cbis-ddsm on 2026-12-03; the same values as that folder's README lists.
CBIS_CSV_MD5 = {
    "calc_case_description_test_set.csv": "1c4e74d2c3ed39f98fca900def51dfad",
    "calc_case_description_train_set.csv": "8a03f12760f1fe4c9b23f617ba2aef8f",
    "mass_case_description_test_set.csv": "5ae5192dc47becbd7988800b1500d8aa",
    "mass_case_description_train_set.csv": "9211da60ebc677208eb481361ca527ef",
}

SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"
VENDOR_DICOM_DIR = SHARED_FIXTURES / "dicom-mg"

# case name (as tests.helpers.dicom_factory.CASES names it) -> the vendor file it stands in for
VENDOR_DICOM_NAMES = {
    "sends_monochrome1_14bit": "openrem_MG-Im-GE-SenDS-scaled.dcm",
    "seno_for_presentation": "openrem_MG-Im-GE_Seno_1_ForPresentation.dcm",
    "seno_for_processing": "openrem_MG-Im-GE_Seno_1_ForProcessing.dcm",
    "hologic_no_pixel_data": "openrem_MG-Im-Hologic-PropProj.dcm",
}


def vendor_dicoms_present() -> bool:
    return all((VENDOR_DICOM_DIR / name).is_file() for name in VENDOR_DICOM_NAMES.values())


VENDOR_SKIP_REASON = f"vendor DICOMs (GPLv3, not in the repo) not found in {VENDOR_DICOM_DIR}: extra check skipped"

# Mark for tests (or parameters: ``pytest.param("vendor", marks=requires_vendor_dicoms)``) that read the
# vendor files; decided at collection, so no fixture is built for a test that will skip.
requires_vendor_dicoms = pytest.mark.skipif(not vendor_dicoms_present(), reason=VENDOR_SKIP_REASON)


def vendor_dicom_files() -> dict[str, Path]:
    """Case name -> real vendor file; skips the calling test (one line) when they are absent."""
    if not vendor_dicoms_present():
        pytest.skip(VENDOR_SKIP_REASON)
    return {case: VENDOR_DICOM_DIR / name for case, name in VENDOR_DICOM_NAMES.items()}
