"""MLflow bookkeeping helpers of tasks/tracking.py on a real (SQLite-backed) tracking store."""

from __future__ import annotations

import subprocess
import sys

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
