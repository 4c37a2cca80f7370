"""`mammo promote RUN_ID` against a real MLflow registry (the store's SQLite backend).

The runs and model versions are made with MlflowClient the way the pipeline makes them (a parent run,
a classify child run carrying `classify/fusion/test_acc`, a `mammo-classifier` version from that child
run), so the command under test reads exactly what a real `mammo run` leaves behind, without the
minutes a full pipeline run to classify would cost.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli import app

MODEL = "mammo-classifier"


def _pipeline_run(client: MlflowClient, experiment: str, folder: Path, test_acc: float) -> tuple[str, str]:
    """(parent run id, registered version) of one simulated `mammo run` that reached classify."""
    parent = client.create_run(experiment, run_name="smoke", tags={"kind": "pipeline"}).info.run_id
    child = client.create_run(experiment, run_name="classify",
                              tags={"mlflow.parentRunId": parent, "stage": "classify"}).info.run_id
    client.log_metric(child, "classify/fusion/test_acc", test_acc)
    model_dir = folder / child
    model_dir.mkdir(parents=True)
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    version = client.create_model_version(MODEL, model_dir.as_uri(), run_id=child).version
    client.set_registered_model_alias(MODEL, "candidate", str(version))
    for run in (child, parent):
        client.set_terminated(run)
    return parent, str(version)


@pytest.fixture(autouse=True)
def restored_environment():
    """The command sets Prefect/MLflow variables for its process; in-process runs must not leak them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def mammo(store: Path, *args: str, check: bool = True) -> SimpleNamespace:
    """`mammo ARGS --store STORE` in this process (a subprocess per call costs ~20 s of imports here)."""
    result = CliRunner().invoke(app, [*args, "--store", str(store)])
    if check and result.exit_code != 0:
        raise AssertionError(f"mammo {args} failed ({result.exit_code}):\n{result.output}")
    return SimpleNamespace(returncode=result.exit_code, stderr=result.output)


@pytest.fixture
def registry(tmp_path) -> tuple[Path, MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("mammo-fusion", artifact_location=(tmp_path / "mlartifacts").as_uri())
    client.create_registered_model(MODEL)
    return tmp_path, client, experiment


def _champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(MODEL, "champion").version)


def test_first_promotion_sets_champion_then_only_a_better_run_moves_it(registry):
    store, client, experiment = registry
    first, v1 = _pipeline_run(client, experiment, store / "models", test_acc=0.61)
    proc = mammo(store, "promote", first)
    assert "no champion yet" in proc.stderr
    assert _champion(client) == v1

    worse, _ = _pipeline_run(client, experiment, store / "models", test_acc=0.58)
    proc = mammo(store, "promote", worse, check=False)
    assert proc.returncode == 1
    assert "0.5800" in proc.stderr and "0.6100" in proc.stderr, proc.stderr  # both numbers are shown
    assert _champion(client) == v1

    tie, _ = _pipeline_run(client, experiment, store / "models", test_acc=0.61)
    assert mammo(store, "promote", tie, check=False).returncode == 1, "a tie keeps the current champion"

    better, v4 = _pipeline_run(client, experiment, store / "models", test_acc=0.66)
    mammo(store, "promote", better)
    assert _champion(client) == v4
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == v4


def test_a_run_without_registered_models_is_refused(registry):
    store, client, experiment = registry
    bare = client.create_run(experiment, run_name="smoke", tags={"kind": "pipeline"}).info.run_id
    proc = mammo(store, "promote", bare, check=False)
    assert proc.returncode == 2 and "registered no model" in proc.stderr
    proc = mammo(store, "promote", "f" * 32, check=False)
    assert proc.returncode == 2 and "f" * 32 in proc.stderr
