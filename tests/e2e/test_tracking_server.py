"""Real MLflow server processes: a pipeline run tracked through MLFLOW_TRACKING_URI, and `mammo ui`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.test_pipeline_e2e import SMOKE, stage_rows

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"server exited early with {proc.returncode}: {output}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a server started by a test; kill it when it does not stop within ``timeout`` s."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(extra)
    return env


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
