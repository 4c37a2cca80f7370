"""`prefect.yaml` against a real `prefect server` and a real process worker.

The smoke deployment is triggered with `stages=["acquire", "curate"]`: what is under test is the path
server -> work pool -> worker -> flow-run process in the clone -> MLflow runs, which is the same for
every stage; the stages themselves are covered by the end-to-end tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.e2e.test_pipeline_e2e import REPO, runs_of
from tests.helpers.processes import free_port, get_json, stop_process, wait_until

pytestmark = pytest.mark.slow
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "mammo-process"


def test_prefect_yaml_declares_the_team_deployments():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert {"full", "from-features", "report", "smoke"} <= set(by_name)
    full = by_name["full"]
    assert full["schedules"][0]["cron"] == "0 3 * * 1" and full["schedules"][0]["active"] is False
    assert by_name["from-features"]["parameters"]["stages"] == ["features", "hashing", "classify"]
    assert by_name["report"]["parameters"]["stages"] == ["report"]
    for d in by_name.values():
        assert d["work_pool"]["name"] == POOL and d["entrypoint"] == "flows/pipeline.py:pipeline"
        assert set(d["parameters"]) >= {"params_file", "overrides"}


@pytest.fixture
def server(tmp_path):
    """A `prefect server` on 127.0.0.1 with its own PREFECT_HOME; yields the environment to talk to it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MAMMO_"))}
    env.update({
        "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false", "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true", "MAMMO_REPO": str(REPO), "OMP_WAIT_POLICY": "PASSIVE",
    })
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: get_json(f"{env['PREFECT_API_URL']}/health") is True or proc.poll() is not None,
                       240, "the Prefect server")
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            yield env
        finally:
            stop_process(proc)


def prefect(env: dict, *args: str, timeout: float = 300) -> str:
    proc = subprocess.run([*PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_smoke_deployment_runs_on_a_process_worker_and_records_mlflow_runs(server, tmp_path):
    store = tmp_path / "store"
    prefect(server, "work-pool", "create", POOL, "--type", "process")
    prefect(server, "--no-prompt", "deploy", "--name", "smoke")
    full = get_json(f"{server['PREFECT_API_URL']}/deployments/name/mammo-pipeline/full")
    assert full is None, "only the named deployment was created"
    deployment = get_json(f"{server['PREFECT_API_URL']}/deployments/name/mammo-pipeline/smoke")
    assert deployment["work_pool_name"] == POOL

    out = prefect(server, "deployment", "run", "mammo-pipeline/smoke", "--params",
                  json.dumps({"stages": ["acquire", "curate"], "store": str(store)}))
    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "w") as log:
        worker = subprocess.Popen([*PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--run-once"],
                                  cwd=tmp_path, env=server, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            state = wait_until(
                lambda: (s := get_json(f"{server['PREFECT_API_URL']}/flow_runs/{flow_run_id}")["state"]["type"])
                in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and s, 400, "the flow run", poll=2)
        finally:
            stop_process(worker, timeout=60)
    assert state == "COMPLETED", worker_log.read_text()[-5000:]
    runs = runs_of(store)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["prefect_flow_run_id"] == flow_run_id
    assert parents[0].data.tags["params_file"] == "params/smoke.yaml"
    children = {r.data.tags["mlflow.runName"]: r for r in runs if r is not parents[0]}
    assert set(children) == {"acquire", "curate"}
    assert children["curate"].data.metrics["curate/images"] > 0
    assert (store / "stages" / "curate" / children["curate"].data.tags["stage_key"] / "manifest.json").is_file()
