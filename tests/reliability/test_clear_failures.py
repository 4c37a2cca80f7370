"""Environment failures end with exit code 2, one line naming cause and fix, and the store as it was.

Real files and processes: a garbage ``mlflow.db``, one held under an exclusive SQLite lock by this test,
a ``PREFECT_API_URL`` that nothing listens on, a foreign folder at a stage's final path, and a full disk
during acquire's seal (``MAMMO_FAULT=full:store:seal:acquire``, the ``OSError`` ENOSPC a full disk raises).
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mammo_core.config import load_params
from tests.e2e.test_pipeline_e2e import REPO, SMOKE, client_for
from tests.reliability.test_kill_anywhere import env_for

pytestmark = pytest.mark.slow
ARGS = ("run", "-p", str(SMOKE), "--until", "acquire")
# test function -> the failure it causes (listed by the reliability summary, tests/reliability/test_reliability.py)
FAILURE_CASES = {
    "test_corrupt_tracking_database": "corrupt mlflow.db",
    "test_locked_tracking_database": "mlflow.db locked by another process",
    "test_unreachable_prefect_api": "unreachable PREFECT_API_URL",
    "test_folder_without_manifest_at_a_final_path": "folder without manifest at a stage's final path",
    "test_full_disk_during_a_seal": "full disk (ENOSPC) during a seal",
}


def test_every_failure_case_has_its_test():
    assert all(callable(globals().get(name)) for name in FAILURE_CASES)


def mammo_run(store: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *ARGS], cwd=REPO, env={**env_for(store), **env},
                          capture_output=True, text=True, timeout=600)


def snapshot(store: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder of the store with its size and modification time (ns).

    Left out: an empty ``prefect`` folder, Prefect's home, which importing Prefect creates.
    """
    return {p.relative_to(store).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(store.rglob("*"))
            if not (p == store / "prefect" and p.is_dir() and not any(p.iterdir()))}


def error_line(proc: subprocess.CompletedProcess, during_a_stage: bool = False) -> str:
    """The one ``error:`` line of a run that exited with code 2.

    Failures found before the run (``during_a_stage`` False) print nothing else; one met inside a stage
    also has Prefect's own log of the failed task above it (its traceback included), as any failed stage.
    """
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    if not during_a_stage:
        assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_corrupt_tracking_database(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "mlflow.db").write_bytes(b"this is not an SQLite file\n" * 200)
    before = snapshot(store)
    line = error_line(mammo_run(store))
    assert "mlflow.db is damaged" in line and "move it aside" in line
    assert snapshot(store) == before


def test_locked_tracking_database(tmp_path):
    store = tmp_path / "store"
    tracking_db = store / "mlflow.db"
    client_for(store).search_experiments()  # a real, migrated MLflow database
    before = snapshot(store)
    holder = sqlite3.connect(tracking_db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        line = error_line(mammo_run(store, MAMMO_DB_LOCK_WAIT_S="1"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "is locked by another process" in line and "then run again" in line
    assert snapshot(store) == before


def test_unreachable_prefect_api(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "store"
    store.mkdir()
    line = error_line(mammo_run(store, PREFECT_API_URL=f"http://127.0.0.1:{port}/api"))
    assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api is unreachable" in line and "unset PREFECT_API_URL" in line
    assert snapshot(store) == {}, "nothing was written"


def test_folder_without_manifest_at_a_final_path(tmp_path):
    from tasks.registry import stage_keys

    store = tmp_path / "store"
    key = stage_keys(load_params(SMOKE))["acquire"]
    foreign = store / "stages" / "acquire" / key
    foreign.mkdir(parents=True)
    (foreign / "restored-by-hand.csv").write_text("a,b\n1,2\n")
    before = snapshot(store)
    line = error_line(mammo_run(store))
    assert f"stages/acquire/{key} has no manifest.json" in line and "move it out" in line
    assert snapshot(store) == before


def test_full_disk_during_a_seal(tmp_path):
    store = tmp_path / "store"
    marker = tmp_path / "fired"
    line = error_line(mammo_run(store, MAMMO_FAULT="full:store:seal:acquire", MAMMO_FAULT_ONCE=str(marker)),
                      during_a_stage=True)
    assert marker.read_text() == "store:seal:acquire"
    assert "disk full while writing to the store" in line and "free space" in line and "--resume" in line
    assert list((store / "stages" / "acquire").iterdir()) == [], "no partial or temporary folder is left"
    runs = client_for(store).search_runs([client_for(store).get_experiment_by_name("mammo-fusion").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"], "the stage run and its parent"
