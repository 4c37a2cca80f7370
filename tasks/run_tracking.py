"""Opening and closing the MLflow parent run of one ``mammo run``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from mammo_core.config import load_params
from tasks import registry, tracking
from tasks.runtime import RunContext, _log_params

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The code version (``+dirty`` when the work tree differs), or ``unknown`` outside a checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flow_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:
        return ""


@task(cache_policy=NO_CACHE, persist_result=False)
def open_run(params_file: str | None, overrides: list[str], store: str | None, force: list[str]) -> RunContext:
    """Validate params and open the parent run; the returned context is shared by every stage."""
    store_root = Path(store or os.environ.get("MAMMO_STORE") or ".mammo").resolve()
    params = load_params(params_file, overrides)
    uri = tracking.default_tracking_uri(store_root)
    client = tracking.open_client(uri, store_root)
    artifact_root = store_root / "mlartifacts" if uri.startswith("sqlite:") else None
    experiment_id = tracking.ensure_experiment(client, params.run.experiment, artifact_root)
    commit = git_commit()
    flow_run_id = _flow_run_id()
    parent = tracking.start_run(
        client,
        experiment_id,
        params.run.name,
        tags={
            "params_file": params_file or "<defaults>",
            "overrides": " ".join(overrides),
            "git_commit": commit,
            "prefect_flow_run_id": flow_run_id,
            "mlflow.source.name": "mammo run",
            "kind": "pipeline",
        },
    )
    dump = params.model_dump(mode="json")
    _log_params(client, parent, dump)
    client.log_text(parent, yaml.safe_dump(dump, sort_keys=True), "params.yaml")
    return RunContext(
        store=str(store_root),
        params=dump,
        params_file=params_file or "<defaults>",
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        flow_run_id=flow_run_id,
        git_commit=commit,
        force=frozenset(set().union(*(registry.descendants(s) for s in force))) if force else frozenset(),
    )


@task(cache_policy=NO_CACHE, persist_result=False)
def close_run(ctx: RunContext, ok: bool, outcomes: list[dict]) -> None:
    """Attach the stage table to the parent run and end it."""
    client = MlflowClient(ctx.tracking_uri)
    client.log_dict(ctx.parent_run_id, {"stages": outcomes}, "stages.json")
    for row in outcomes:
        client.set_tag(ctx.parent_run_id, f"stage.{row['stage']}", f"{row['status']} {row['key']}")
    tracking.finish_run(client, ctx.parent_run_id, ok=ok)
