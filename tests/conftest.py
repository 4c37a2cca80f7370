"""Shared test helpers: the mammography DICOM cases and the session's smoke store.

Fixture files are located by tests/helpers/fixture_files.py (in-repo CSVs, optional vendor DICOMs beside the clone).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.dicom_factory import write_cases
from tests.helpers.fixture_files import requires_vendor_dicoms, vendor_dicom_files


def session_root(tmp_path_factory) -> Path:
    """The temporary root of the whole test session, common to every pytest-xdist worker.

    Each xdist worker has its own base temporary folder (``.../pytest-N/popen-gw0``); their parent is the
    session's. Without xdist the base folder is the session's own.
    """
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def private_torch_hub(tmp_path_factory) -> Path:
    """An empty torch hub cache of the session's own (``TORCH_HOME``), for every test and the ``mammo`` it starts.

    Why: ImageNet or COCO files in the developer's ``~/.cache/torch`` would change what the stages load (and
    their keys), so a test could pass there and fail on a clean clone; and a test that writes a weights file
    into "the hub cache" must never write into the real one. Tests that need files there set their own.
    """
    home = session_root(tmp_path_factory) / "torch-home"
    home.mkdir(exist_ok=True)
    os.environ["TORCH_HOME"] = str(home)
    return home


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
    (``smoke_store_copy`` or :func:`tests.helpers.smoke_store.copy_store`). Under pytest-xdist (``make test`` runs
    ``-n 2``) the workers share one run: the first to need it builds it under a file lock in the session's
    common temporary root, the others wait for it and read the same store (one ~1 min run, not one each).
    """
    from filelock import FileLock

    from tests.e2e.test_pipeline_e2e import SMOKE, mammo

    shared = session_root(tmp_path_factory)
    root, failed = shared / "smoke_store", shared / "smoke_store.failed"
    with FileLock(shared / "smoke_store.lock"):
        if failed.is_file():  # built once per session, as without xdist: a failed build is not tried again
            raise AssertionError(f"the session's smoke run failed in another worker:\n{failed.read_text()}")
        if not (root / "first_run.txt").is_file():
            root.mkdir()  # exists without first_run.txt only if a worker died while building: fails here
            try:
                proc = mammo(root, "run", "-p", str(SMOKE))
            except BaseException as exc:
                failed.write_text(f"{type(exc).__name__}: {exc}"[-20000:])
                raise
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



# ------------------------------------------------------------------ running the suite on pytest-xdist workers
# `make test` runs `pytest -n 2 --dist loadfile`: most slow tests wait on `python -m flows.cli` subprocesses
# and Prefect servers, so two workers keep both cores busy. Each test file runs whole on one worker (its
# module-scoped fixtures, e.g. a store rerun with changed params, are built once; tests that rely on the
# order of their file keep it). Files that share a session fixture other than ``smoke_store`` (which the
# workers share on disk) run on one worker too, so that fixture is built once: they are named here by
# basename (files may move between test folders), and collection fails if a new user is missing.
SHARED_SESSION_FIXTURES = ("kill_anywhere", "bad_input_outcome")
SHARED_FIXTURE_FILES = {"test_kill_anywhere.py": "reliability", "test_bad_inputs.py": "reliability",
                        "test_reliability.py": "reliability"}


def xdist_group(nodeid: str) -> str:
    """The unit of work one xdist worker runs whole: the test's file, or its shared-fixture group."""
    path = nodeid.split("::", 1)[0]
    return SHARED_FIXTURE_FILES.get(Path(path).name, path)


def pytest_collection_modifyitems(config, items):
    """Check that every user of a shared session fixture is grouped; under xdist, order the groups by their
    number of ``slow`` tests, most first, so that the long groups start early and the many quick unit-test
    files fill the end of both workers' time (the order within a group is kept); the second group is one
    that does not need ``smoke_store``, so that its worker has work while the first builds the store."""
    for item in items:
        used = set(SHARED_SESSION_FIXTURES) & set(getattr(item, "fixturenames", ()))
        if used and Path(item.nodeid.split("::", 1)[0]).name not in SHARED_FIXTURE_FILES:
            raise pytest.UsageError(f"{item.nodeid} uses the session fixture {sorted(used)[0]}: add its file to "
                                    "SHARED_FIXTURE_FILES in tests/conftest.py (one xdist worker builds it)")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow: dict[str, int] = {}
    needs_smoke: set[str] = set()
    for item in items:
        group = xdist_group(item.nodeid)
        slow[group] = slow.get(group, 0) + (item.get_closest_marker("slow") is not None)
        if "smoke_store" in getattr(item, "fixturenames", ()):
            needs_smoke.add(group)
    groups = sorted(dict.fromkeys(xdist_group(item.nodeid) for item in items), key=lambda g: -slow[g])
    # The second worker's first group should not wait for the smoke run the first one is building.
    if len(groups) > 2 and groups[0] in needs_smoke and groups[1] in needs_smoke:
        independent = next((g for g in groups[2:] if g not in needs_smoke), None)
        if independent is not None:
            groups.remove(independent)
            groups.insert(1, independent)
    rank = {group: i for i, group in enumerate(groups)}
    items.sort(key=lambda item: rank[xdist_group(item.nodeid)])


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent when it is not installed
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the shared-fixture groups above, handed out in collection order."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFiles(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    config.option.loadscopereorder = False  # its reordering is by test count, not by cost: keep ours
    return GroupedFiles(config, log)


def pytest_terminal_summary(terminalreporter, config):
    """Under xdist a worker's output is not shown: print the reliability summary line of
    tests/reliability/test_reliability.py (a ``reliability_summary`` user property) from the main process."""
    if not getattr(config.option, "numprocesses", None):
        return  # without workers the test printed it itself
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        for name, value in getattr(report, "user_properties", ()):
            if name == "reliability_summary" and report.when == "call":
                terminalreporter.write_line(f"reliability summary: {value}")
