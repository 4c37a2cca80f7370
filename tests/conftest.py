"""Shared test helpers: fixture paths and an isolated store per test."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
CBIS_CSV_DIR = FIXTURES / "cbis-ddsm"
DICOM_MG_DIR = FIXTURES / "dicom-mg"


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES
