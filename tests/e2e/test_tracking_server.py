"""Real MLflow server processes: a pipeline run tracked through MLFLOW_TRACKING_URI, and `mammo ui`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.test_pipeline_e2e import SMOKE, stage_rows
from tests.helpers.paths import REPO
from tests.helpers.processes import clean_env, free_port, stop_process, wait_http

pytestmark = pytest.mark.slow


def test_pipeline_tracks_to_a_remote_mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env(),
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server)
        uri = f"http://127.0.0.1:{port}"
        store = tmp_path / "store"
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "-p", str(SMOKE), "--until", "curate"],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env=clean_env(MAMMO_STORE=str(store), MLFLOW_TRACKING_URI=uri, COLUMNS="200"),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert stage_rows(proc.stdout + proc.stderr) == {"acquire": "ran", "curate": "ran"}
        assert not (store / "mlflow.db").exists()  # nothing went to the embedded store
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("mammo-fusion")
        runs = client.search_runs([exp.experiment_id])
        names = sorted(r.data.tags["mlflow.runName"] for r in runs)
        assert names == ["acquire", "curate", "smoke"]
        curate = next(r for r in runs if r.data.tags["mlflow.runName"] == "curate")
        assert curate.data.metrics["curate/images"] > 0
        artifacts = [a.path for a in client.list_artifacts(curate.info.run_id)]
        assert "manifest.json" in artifacts and "curation_report.json" in artifacts
        assert any((tmp_path / "server-artifacts").rglob("curation_report.json"))  # proxied to the server
    finally:
        stop_process(server)
