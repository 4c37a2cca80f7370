"""The in-repo CBIS-DDSM fixtures are the published files, unchanged, with their licence beside them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.helpers.fixture_files import CBIS_CSV_DIR, CBIS_CSV_MD5, REPO, VENDOR_DICOM_NAMES


def test_csvs_are_byte_identical_to_the_published_files():
    found = sorted(p.name for p in CBIS_CSV_DIR.glob("*.csv"))
    assert found == sorted(CBIS_CSV_MD5)
    for name, md5 in CBIS_CSV_MD5.items():
        assert hashlib.md5((CBIS_CSV_DIR / name).read_bytes()).hexdigest() == md5, name


def test_licence_and_attribution_sit_beside_them():
    readme = (CBIS_CSV_DIR / "README.md").read_text(encoding="utf-8")
    for needed in ("CC BY 3.0", "10.7937/K9/TCIA.2016.7O02S9CY", "Scientific Data 4:170177", "Lee RS",
                   "The Cancer Imaging Archive", *CBIS_CSV_MD5.values()):
        assert needed in readme, needed


def test_line_ends_are_protected_from_git_conversion():
    attributes = (REPO / ".gitattributes").read_text().splitlines()
    assert "tests/fixtures/cbis-ddsm/*.csv -text" in attributes


def test_no_dicom_file_is_in_the_repository():
    """The vendor files are GPLv3 test data: tests use generated equivalents (tests/helpers/dicom_factory.py)."""
    dicoms = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__pycache__"]  # .git, .venv
        dicoms += [Path(folder, f) for f in files if f in VENDOR_DICOM_NAMES.values() or f.endswith(".dcm")]
    assert dicoms == []
