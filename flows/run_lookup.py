"""Finding one ``mammo run`` in the tracking store: its parent run, its stage child runs, their sealed folders.

A ``mammo run`` is one MLflow parent run; each of its stage child runs carries the stage name and the stage
key (``tasks/runtime.py``), and the parent carries ``stage.<name> = "<status> <key>"`` once it ends. The key
names the sealed folder ``<store>/stages/<stage>/<key>``, so a command reads exactly the artifacts of that
run, even after later runs with other params have added folders next to them. Shared by ``mammo report``
and ``mammo compare`` (one lookup, so that the two commands cannot disagree on which run or folder is meant).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows import environment

PIPELINE_FILTER = "tags.kind = 'pipeline'"


class RunNotFound(LookupError):
    """No ``mammo run`` parent run matches (message names the run id and the tracking store)."""


@dataclass(frozen=True)
class PipelineRun:
    """One ``mammo run``: its parent MLflow run and its stage child runs, by stage name."""

    run: Any  # mlflow.entities.Run
    children: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def stage_keys(self) -> dict[str, str]:
        """stage -> key, from the child runs' ``stage_key`` tags, else the parent's ``stage.<name>`` tags."""
        keys = {tag.removeprefix("stage."): value.split()[-1] for tag, value in self.run.data.tags.items()
                if tag.startswith("stage.") and value.split()}
        keys.update({s: c.data.tags["stage_key"] for s, c in self.children.items() if c.data.tags.get("stage_key")})
        return keys


def open_tracking(store: Path | None):
    """(store root, MlflowClient) for the store, configured the way ``mammo run`` configures it."""
    root = environment.store_root(store)
    environment.configure(root)
    from mlflow.tracking import MlflowClient

    from tasks.tracking import default_tracking_uri

    return root, MlflowClient(default_tracking_uri(root))


def find_pipeline_run(client, run_id: str | None) -> PipelineRun:
    """The parent run ``run_id`` (or the latest ``mammo run`` parent run) with its stage child runs."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            raise RunNotFound(f"no MLflow run {run_id!r} in {client.tracking_uri}") from exc
        if run.data.tags.get("kind") != "pipeline":
            raise RunNotFound(f"run {run_id} is not a 'mammo run' parent run (it is "
                              f"{run.data.tags.get('mlflow.runName', '?')!r}); pass the parent run id")
    else:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=PIPELINE_FILTER, order_by=["attributes.start_time DESC"],
                                  max_results=1) if experiments else []
        if not runs:
            raise RunNotFound(f"no 'mammo run' parent run in {client.tracking_uri}; run `mammo run` first")
        run = runs[0]
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=1000)
    return PipelineRun(run, {c.data.tags["stage"]: c for c in children if c.data.tags.get("stage")})


def stage_folders(root: Path, run: PipelineRun, stages: tuple[str, ...]) -> dict[str, Path | None]:
    """stage -> its sealed folder in the store (None when the run has no such stage or the folder is gone)."""
    from mammo_core.storage.store import ArtifactStore

    store, keys, out = ArtifactStore(root), run.stage_keys(), {}
    for stage in stages:
        found = store.find(stage, keys[stage]) if stage in keys else None
        out[stage] = found.path if found is not None else None
    return out


def run_params(client, run: PipelineRun) -> dict[str, Any]:
    """The run's whole params file (its ``params.yaml`` artifact), else its flat MLflow params."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.run_id, "params.yaml", tmp)
            return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except Exception:  # an older run without the artifact, or an artifact store that cannot be read
        return dict(run.run.data.params)
