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


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory) -> Path:
    """A store holding one fresh, complete ``mammo run -p params/smoke.yaml``; treat it as read-only.

    Its console output is kept in ``first_run.txt``. Tests that change the store take a copy
    (``smoke_store_copy`` or :func:`tests.smoke_store.copy_store`).
    """
    from tests.test_pipeline_e2e import SMOKE, mammo

    root = tmp_path_factory.mktemp("smoke_store")
    proc = mammo(root, "run", "-p", str(SMOKE))
    (root / "first_run.txt").write_text(proc.stdout + proc.stderr)
    return root


@pytest.fixture
def smoke_store_copy(smoke_store, tmp_path) -> Path:
    """A private copy of the session's smoke store, free to change."""
    from tests.smoke_store import copy_store

    return copy_store(smoke_store, tmp_path / "store")


@pytest.fixture(scope="session")
def kill_anywhere(tmp_path_factory, smoke_store):
    """The kill-anywhere chain (tests/test_kill_anywhere.py), run once per session.

    Session-scoped so that its assertions and the reliability summary (tests/test_reliability.py) read
    the same kills instead of paying for the pipeline runs twice.
    """
    from tests.test_kill_anywhere import run_kill_anywhere

    return run_kill_anywhere(tmp_path_factory.mktemp("kill_anywhere"), reference=smoke_store)


@pytest.fixture(scope="session")
def bad_input_outcome(tmp_path_factory):
    """The generated bad-input corpus (tests/data/bad/generate.py) run through the code that must refuse it.

    Session-scoped for the same reason as ``kill_anywhere``: the per-item tests and the summary share it.
    """
    from tests.test_bad_inputs import run_corpus

    return run_corpus(tmp_path_factory.mktemp("bad_inputs"))
