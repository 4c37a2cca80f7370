"""MLflow bookkeeping helpers of tasks/tracking.py on a real (SQLite-backed) tracking store."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks import tracking


def test_runs_of_killed_processes_are_marked_killed_and_live_ones_kept(tmp_path):
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    experiment = tracking.ensure_experiment(client, "orphans", tmp_path / "artifacts")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = tracking.start_run(client, experiment, "live", tags={})  # this process
    orphan = tracking.start_run(client, experiment, "orphan", tags={})
    client.set_tag(orphan, tracking.PID_TAG, str(dead.pid))
    elsewhere = tracking.start_run(client, experiment, "other host", tags={})
    client.set_tag(elsewhere, tracking.HOST_TAG, "another-host")
    client.set_tag(elsewhere, tracking.PID_TAG, str(dead.pid))

    assert tracking.close_orphaned_runs(client, experiment) == [orphan]
    assert client.get_run(orphan).info.status == "KILLED"
    assert "killed" in client.get_run(orphan).data.tags["ended_by"]
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(elsewhere).info.status == "RUNNING"


@pytest.fixture(scope="module")
def shared_db(tmp_path_factory):
    """One migrated SQLite tracking database for the tests below (creating one costs seconds)."""
    root = tmp_path_factory.mktemp("tracking")
    return tracking.open_client(f"sqlite:///{root / 'mlflow.db'}", root)


def test_sealed_run_of_a_killed_process_is_finished_not_killed(shared_db, tmp_path):
    client = shared_db
    experiment = tracking.ensure_experiment(client, "sealed", tmp_path / "artifacts")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sealed, unsealed = (tracking.start_run(client, experiment, name, tags={}) for name in ("sealed", "unsealed"))
    for run_id in (sealed, unsealed):
        client.set_tag(run_id, tracking.PID_TAG, str(dead.pid))
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    closed = tracking.close_orphaned_runs(client, experiment,
                                          lambda run: manifest if run.info.run_id == sealed else None)
    assert sorted(closed) == sorted([sealed, unsealed])
    assert client.get_run(sealed).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(sealed)] == ["manifest.json"]
    assert client.get_run(unsealed).info.status == "KILLED"


def test_a_transient_database_lock_while_logging_a_metric_is_retried(shared_db, tmp_path, monkeypatch):
    """SQLite's "database is locked" raised inside MLflow's real SQL write (once): the metric still lands."""
    client = shared_db
    experiment = tracking.ensure_experiment(client, "locked", tmp_path / "artifacts")
    run_id = tracking.start_run(client, experiment, "r", tags={})
    marker = tmp_path / "fired"
    monkeypatch.setenv("MAMMO_FAULT", "locked:mlflow:db-write")
    monkeypatch.setenv("MAMMO_FAULT_ONCE", str(marker))
    monkeypatch.setattr(tracking, "LOCKED_RETRY_DELAYS_S", (0.05, 0.1))
    tracking.install_db_write_fault_point()
    tracking.log_metrics(client, run_id, {"train/loss": 0.25}, step=3)
    assert marker.read_text() == "mlflow:db-write", "the lock was hit inside the write"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.value, m.step) for m in history] == [(0.25, 3)]


def test_errors_other_than_a_lock_are_not_retried(shared_db, monkeypatch):
    client = shared_db
    calls = []

    def broken(*_args, **_kwargs):
        calls.append(1)
        raise ValueError("disk I/O error")

    monkeypatch.setattr(client, "log_batch", broken)
    with pytest.raises(ValueError, match="disk I/O"):
        tracking.log_metrics(client, "0" * 32, {"m": 1.0})
    assert calls == [1]
def test_experiments_are_marked_as_model_training_so_the_ui_opens_the_run_table(tmp_path):
    client = tracking.open_client(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    kind = tracking.EXPERIMENT_KIND_TAG
    new = tracking.ensure_experiment(client, "new", tmp_path / "artifacts")
    assert client.get_experiment(new).tags[kind] == tracking.MODEL_TRAINING_KIND
    older = client.create_experiment("made before the mark")  # a store written by an earlier version
    assert kind not in client.get_experiment(older).tags
    assert tracking.ensure_experiment(client, "made before the mark", None) == older
    assert client.get_experiment(older).tags[kind] == tracking.MODEL_TRAINING_KIND
    chosen = client.create_experiment("chosen in the UI", tags={kind: "genai_development"})
    tracking.ensure_experiment(client, "chosen in the UI", None)
    assert client.get_experiment(chosen).tags[kind] == "genai_development"


def test_a_dataset_another_run_recorded_first_is_linked_not_an_error(shared_db, tmp_path):
    """Two runs logging the same table at once (CI saw it: ``UNIQUE constraint failed: datasets...``).

    The race is made real and certain: a second connection inserts the same dataset row just before
    MLflow's own INSERT, after its lookup found nothing. The run still gets its input, linked to that row.
    """
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    client = shared_db
    experiment = tracking.ensure_experiment(client, "datasets-race", tmp_path / "artifacts")
    run_id = tracking.start_run(client, experiment, "loser", tags={})
    table = tmp_path / "lesions.parquet"
    table.write_bytes(b"same content in both runs")
    digest = tracking.hashlib.sha256(table.read_bytes()).hexdigest()[:16]
    db = client.tracking_uri.removeprefix("sqlite:///")
    inserted_first = []

    def concurrent_run_inserts_first(_conn, _cursor, statement, *_rest):
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS") and not inserted_first:
            with sqlite3.connect(db) as other:
                other.execute("INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, dataset_source_type,"
                              " dataset_source) VALUES (?, ?, ?, ?, 'local', 'file:///elsewhere')",
                              ("f" * 32, int(experiment), "lesions", digest))
            inserted_first.append(True)

    event.listen(Engine, "before_cursor_execute", concurrent_run_inserts_first)
    try:
        tracking.log_file_dataset(client, run_id, table, "lesions", "curate")
    finally:
        event.remove(Engine, "before_cursor_execute", concurrent_run_inserts_first)
    assert inserted_first, "the concurrent insert happened inside MLflow's write"
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest, i.dataset.source) for i in inputs] == [
        ("lesions", digest, "file:///elsewhere")]
