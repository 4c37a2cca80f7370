"""Shared test helpers: the mammography DICOM cases and the session's smoke store.

Fixture files are located by tests/helpers/fixture_files.py (in-repo CSVs, optional vendor DICOMs beside the clone).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.dicom_factory import write_cases
from tests.helpers.fixture_files import requires_vendor_dicoms, vendor_dicom_files


@pytest.fixture(scope="session", params=["generated", pytest.param("vendor", marks=requires_vendor_dicoms)])
def mg_cases(request, tmp_path_factory) -> dict[str, Path]:
    """Case name (tests.helpers.dicom_factory.CASES) -> a DICOM file of that case.

    ``generated``: written by tests.helpers.dicom_factory, always available. ``vendor``: the real OpenREM files in
    ``../shared/fixtures/dicom-mg``, an extra check that skips (one line) on a clone with nothing beside it.
    """
    if request.param == "vendor":
        return vendor_dicom_files()
    return write_cases(tmp_path_factory.mktemp("mg_cases"))


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory) -> Path:
    """A store holding one fresh, complete ``mammo run -p params/smoke.yaml``; treat it as read-only.

    Its console output is kept in ``first_run.txt``. Tests that change the store take a copy
    (``smoke_store_copy`` or :func:`tests.helpers.smoke_store.copy_store`).
    """
    from tests.e2e.test_pipeline_e2e import SMOKE, mammo

    root = tmp_path_factory.mktemp("smoke_store")
    proc = mammo(root, "run", "-p", str(SMOKE))
    (root / "first_run.txt").write_text(proc.stdout + proc.stderr)
    return root


@pytest.fixture
def smoke_store_copy(smoke_store, tmp_path) -> Path:
    """A private copy of the session's smoke store, free to change."""
    from tests.helpers.smoke_store import copy_store

    return copy_store(smoke_store, tmp_path / "store")


@pytest.fixture(scope="session")
def kill_anywhere(tmp_path_factory, smoke_store):
    """The kill-anywhere chain (tests/reliability/test_kill_anywhere.py), run once per session.

    Session-scoped so that its assertions and the reliability summary (tests/reliability/test_reliability.py) read
    the same kills instead of paying for the pipeline runs twice.
    """
    from tests.reliability.test_kill_anywhere import run_kill_anywhere

    return run_kill_anywhere(tmp_path_factory.mktemp("kill_anywhere"), reference=smoke_store)


@pytest.fixture(scope="session")
def bad_input_outcome(tmp_path_factory):
    """The generated bad-input corpus (tests/data/bad/generate.py) run through the code that must refuse it.

    Session-scoped for the same reason as ``kill_anywhere``: the per-item tests and the summary share it.
    """
    from tests.reliability.test_bad_inputs import run_corpus

    return run_corpus(tmp_path_factory.mktemp("bad_inputs"))
