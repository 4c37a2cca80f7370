"""Shared test helpers (DICOM factory, fake TCIA, fixture files, layouts, smoke store, ...).

Modules:
- ``browser``: A headless Chromium driven over the DevTools protocol, for checks of pages that are JavaScript apps.
- ``dicom_factory``: Mammography DICOM files equivalent to the four vendor cases of ``../shared/fixtures/dicom-mg/``.
- ``environment_guard``: Tests that call `mammo` commands in-process: the commands set MLflow/Prefect variables for
  their process.
- ``fake_tcia``: A fake NBIA REST server on 127.0.0.1 for the TCIA downloader tests.
- ``fixture_files``: Where the tests' real-data fixtures live, so that a clone with nothing beside it passes its tests.
- ``layout_builders``: Test helpers: turn a classic-layout CBIS-DDSM tree (the phantom's) into the other on-disk
  layouts.
- ``paths``: Where the repository and its params files are (``REPO``, ``SMOKE``).
- ``processes``: Helpers for tests that start real server processes (free port, wait, stop, clean environment).
- ``smoke_store``: One full smoke run per test session, and cheap private copies of it.
- ``test_dicom_factory``: The generated vendor-equivalent DICOMs (tests.helpers.dicom_factory): deterministic,
  faithful to the real files.
- ``test_fixture_files``: The in-repo CBIS-DDSM fixtures are the published files, unchanged, with their licence beside
  them.
- ``untrusted_inputs``: Untrusted-input cases for the reliability summary (issue 16): each plants one hostile input,
  hands it to the code that must refuse it.
"""
