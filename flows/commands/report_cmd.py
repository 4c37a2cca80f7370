"""``mammo report [RUN_ID]``: rebuild the report of one ``mammo run`` from the stage folders that run used.

A ``mammo run`` is one MLflow parent run; each of its stage child runs carries the stage name and the stage
key (``tasks/runtime.py`` ``_stage_tags``), and the parent carries ``stage.<name> = "<status> <key>"`` once it
ends. The key names the sealed folder ``<store>/stages/<stage>/<key>``, so the report is rebuilt from exactly
the artifacts of that run, even after later runs with other params have added folders next to them. The
helpers here also serve ``mammo compare``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console

from flows import environment

console = Console(stderr=True)
PIPELINE_FILTER = "tags.kind = 'pipeline'"
OPTIONAL_STAGES = ("detect", "baselines")  # read when the run has them; Tables 1, 6, 8, Figure 10 otherwise "not run"


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


def report_stages() -> tuple[str, ...]:
    """The stages the report reads: the report stage's upstream, plus detect and baselines when not yet there."""
    from tasks.stages.report import UPSTREAM

    return (*UPSTREAM, *(s for s in OPTIONAL_STAGES if s not in UPSTREAM))


def rebuild_report(root: Path, client, run: PipelineRun, out: Path) -> dict[str, Path]:
    """Build the report of ``run`` into ``out`` from the stage folders it used."""
    from mammo_core.reporting.report import build_report

    folders = stage_folders(root, run, report_stages())
    keys = run.stage_keys()
    given = {s: p for s, p in folders.items() if p is not None or s not in OPTIONAL_STAGES}
    for stage, path in given.items():
        if path is None:
            console.print(f"[yellow]warning:[/] run {run.run_id} has no sealed {stage} folder "
                          f"(key {keys.get(stage, 'not recorded')}); the report marks it missing")
    params = run_params(client, run)
    run_info = {"params": params,
                "code_version": run.run.data.tags.get("git_commit") or "not recorded",
                "stage_keys": {s: keys[s] for s in given if s in keys}, "report_key": keys.get("report", "")}
    initialisation = _initialisation(params)
    if initialisation is not None:
        run_info["initialisation"] = initialisation
    return build_report(given, out, run_info)


def _initialisation(params: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The header's initialisation table, resolved as the report stage resolves it (the weight files the
    stages' keys name); None for a run whose params file is not available (flat MLflow params only)."""
    from mammo_core.config import Params
    from tasks.stages.report import initialisation

    try:
        typed = Params.model_validate(params)
    except ValueError:
        return None
    return initialisation(typed)


def report(
    run_id: str | None = typer.Argument(None, help="parent run id of a `mammo run` (default: the latest)"),
    out: Path | None = typer.Option(None, "--out", help="output folder (default <store>/reports/<run_id>/)"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
) -> None:
    """Regenerate the report (Markdown, HTML, CSV tables) of a `mammo run` from its stage folders."""
    root, client = open_tracking(store)
    try:
        run = find_pipeline_run(client, run_id)
    except RunNotFound as exc:
        console.print(f"[bold red]{exc}[/]")
        raise typer.Exit(2) from None
    folder = Path(out) if out is not None else root / "reports" / run.run_id
    paths = rebuild_report(root, client, run, folder)
    console.print(f"report of run {run.run_id} written to {folder}")
    print(paths["html"].parent)
