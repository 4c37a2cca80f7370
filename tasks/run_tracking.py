"""Opening and closing the MLflow parent run of one ``mammo run``."""

from __future__ import annotations

import json
import os
import subprocess
from functools import partial
from pathlib import Path

import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from mammo_core.config import load_params
from mammo_core.storage.store import MANIFEST, ArtifactStore, make_private
from tasks import registry, tracking
from tasks.runtime import RunContext, log_params

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


RESUMABLE_TAGS = ("params_file", "overrides_json", "stages_json")


def _sealed_manifest(store: ArtifactStore, run: Run) -> Path | None:
    """The manifest of the sealed stage folder that names ``run`` as its MLflow run, else None."""
    stage, key = run.data.tags.get("stage"), run.data.tags.get("stage_key")
    if not stage or not key or run.data.tags.get("cache_hit") == "true":
        return None
    folder = store.find(stage, key)
    if folder is None or folder.mlflow_run_id != run.info.run_id:
        return None
    return folder.path / MANIFEST


@task(cache_policy=NO_CACHE, persist_result=False)
def open_run(
    params_file: str | None,
    overrides: list[str],
    store: str | None,
    force: list[str],
    stages: list[str] | None = None,
    resume: str | None = None,
) -> RunContext:
    """Validate params and open the parent run (or reopen ``resume``); the context is shared by every stage."""
    store_root = Path(store or os.environ.get("MAMMO_STORE") or ".mammo").resolve()
    params = load_params(params_file, overrides)
    make_private(store_root)  # again here: a deployment's worker reaches the flow without the CLI
    uri = tracking.default_tracking_uri(store_root)
    client = tracking.open_client(uri, store_root)
    artifact_root = store_root / "mlartifacts" if uri.startswith("sqlite:") else None
    experiment_id = tracking.ensure_experiment(client, params.run.experiment, artifact_root)
    commit = git_commit()
    flow_run_id = _flow_run_id()
    dump = params.model_dump(mode="json")
    tracking.close_orphaned_runs(client, experiment_id, partial(_sealed_manifest, ArtifactStore(store_root)))
    ArtifactStore(store_root).sweep_all()  # what killed runs left, in stages this run may only reuse
    if resume:
        parent = tracking.reopen_run(client, resume, flow_run_id)
        experiment_id = client.get_run(parent).info.experiment_id
    else:
        parent = tracking.start_run(
            client,
            experiment_id,
            params.run.name,
            tags={
                "params_file": params_file or "<defaults>",
                "overrides": " ".join(overrides),
                "overrides_json": json.dumps(list(overrides)),
                "stages_json": json.dumps(list(stages) if stages else None),
                "git_commit": commit,
                "prefect_flow_run_id": flow_run_id,
                "mlflow.source.name": "mammo run",
                "kind": "pipeline",
            },
        )
        log_params(client, parent, dump)
        client.log_text(parent, yaml.safe_dump(dump, sort_keys=True), "params.yaml")
    return RunContext(
        store=str(store_root),
        params=params,
        params_file=params_file or "<defaults>",
        tracking_uri=uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        flow_run_id=flow_run_id,
        git_commit=commit,
        force=frozenset(set().union(*(registry.descendants(s) for s in force))) if force else frozenset(),
    )


def resume_arguments(tracking_uri: str, run_id: str) -> dict:
    """params_file, overrides and stages of an earlier ``mammo run``, read back from its parent run's tags.

    Raises ``ValueError`` naming the run when it is not a pipeline parent run or lacks the tags.
    """
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise ValueError(f"run {run_id} not found in the tracking store {tracking_uri}") from exc
    tags = run.data.tags
    if tags.get("kind") != "pipeline":
        raise ValueError(f"run {run_id} is not a 'mammo run' parent run (tag kind={tags.get('kind')!r})")
    missing = [t for t in RESUMABLE_TAGS if t not in tags]
    if missing:
        raise ValueError(f"run {run_id} lacks the tags {missing}: give -p/--set/--from again instead")
    params_file = tags["params_file"]
    return {
        "params_file": None if params_file == "<defaults>" else params_file,
        "overrides": json.loads(tags["overrides_json"]),
        "stages": json.loads(tags["stages_json"]),
        "status": run.info.status,
    }


@task(cache_policy=NO_CACHE, persist_result=False)
def close_run(ctx: RunContext, ok: bool, outcomes: list[dict], stopped_by: str | None = None) -> None:
    """Attach the stage table to the parent run and end it (KILLED when ``stopped_by`` names a signal)."""
    client = MlflowClient(ctx.tracking_uri)
    client.log_dict(ctx.parent_run_id, {"stages": outcomes}, "stages.json")
    for row in outcomes:
        client.set_tag(ctx.parent_run_id, f"stage.{row['stage']}", f"{row['status']} {row['key']}")
    if stopped_by:
        tracking.kill_run(client, ctx.parent_run_id, f"stopped by {stopped_by}")
    else:
        tracking.finish_run(client, ctx.parent_run_id, ok=ok)
