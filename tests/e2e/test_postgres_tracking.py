"""A team tracking server: `mlflow server` on a PostgreSQL backend store with a served artifact root.

PostgreSQL comes from Debian's packages (installed here when missing: CI machines are fresh Debian with
root), runs from a temporary folder on 127.0.0.1, and is stopped afterwards. The smoke pipeline runs
`--until curate` with MLFLOW_TRACKING_URI pointing at the server: the tracking calls are the same for
every stage (parent run, child runs, params, metrics, dataset inputs, artifacts), so two stages prove the
server path without the minutes the remaining stages would add.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.test_pipeline_e2e import REPO, SMOKE, stage_rows
from tests.helpers.processes import free_port, get_json, stop_process, wait_until

pytestmark = pytest.mark.slow
DB_USER = "mammo"


def postgres_bin() -> Path:
    """The folder with initdb/pg_ctl, installing Debian's `postgresql` package when it is missing."""
    def find() -> Path | None:
        on_path = shutil.which("initdb")
        if on_path:
            return Path(on_path).resolve().parent
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        return Path(found[-1]).parent if found else None

    if find() is None:
        if os.geteuid() != 0:
            pytest.fail("PostgreSQL is not installed and this user cannot apt-get install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "postgresql"], check=True, env=env,
                       capture_output=True, timeout=900)
    folder = find()
    assert folder is not None, "apt-get install postgresql did not provide initdb"
    return folder


@pytest.fixture(scope="module")
def postgres() -> str:
    """A throw-away PostgreSQL server; yields its URI (database `mlflow`, trust auth on 127.0.0.1 only)."""
    bin_dir = postgres_bin()
    # not under pytest's tmp folder: that one is private to root, and the server runs as `postgres`
    root = Path(tempfile.mkdtemp(prefix="mammo-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as Debian's `postgres` user
        shutil.chown(root, "postgres", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(*cmd: str) -> None:
        proc = subprocess.run([*as_owner, *cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"

    pg(str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8")
    pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-w", "-t", "120",
       "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start")
    try:
        pg(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, "mlflow")
        yield f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/mlflow"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory) -> tuple[str, Path]:
    """`mlflow server` on the PostgreSQL store, serving artifacts from a temporary folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts, port = root / "artifacts", free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres, "--artifacts-destination",
             str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: proc.poll() is not None or get_json(f"{url}/api/2.0/mlflow/experiments/search"
                                                                   "?max_results=1") is not None,
                       240, "the MLflow server")
            assert proc.poll() is None, (root / "server.log").read_text()[-5000:]
            yield url, artifacts
        finally:
            stop_process(proc)


def test_smoke_pipeline_tracks_into_the_postgres_backed_server(postgres, mlflow_server, tmp_path):
    url, artifacts = mlflow_server
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MAMMO_"))}
    env.update({"MLFLOW_TRACKING_URI": url, "MAMMO_STORE": str(tmp_path / "store"), "COLUMNS": "200"})
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-p", str(SMOKE), "--until", "curate"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stage_rows(proc.stdout + proc.stderr) == {"acquire": "ran", "curate": "ran"}
    assert not (tmp_path / "store" / "mlflow.db").exists(), "nothing went to the embedded store"

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("mammo-fusion")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED"
    children = {r.data.tags["mlflow.runName"]: r for r in runs if r is not parent}
    assert set(children) == {"acquire", "curate"}
    assert children["curate"].data.metrics["curate/images"] > 0
    assert children["curate"].inputs.dataset_inputs
    local = client.download_artifacts(parent.info.run_id, "stages.json", str(tmp_path))
    assert [s["stage"] for s in json.loads(Path(local).read_text())["stages"]] == ["acquire", "curate"]
    served = list(artifacts.rglob("stages.json"))
    assert len(served) == 1, "artifacts went through the server into its artifact root"

    # the rows live in PostgreSQL
    with psycopg2.connect(postgres.replace("+psycopg2", "")) as db, db.cursor() as cursor:
        cursor.execute("select count(*) from runs where experiment_id = %s", (int(experiment.experiment_id),))
        assert cursor.fetchone()[0] == 3
        cursor.execute("select value from metrics where key = 'curate/images' and run_uuid = %s",
                       (children["curate"].info.run_id,))
        assert cursor.fetchone()[0] == children["curate"].data.metrics["curate/images"]
