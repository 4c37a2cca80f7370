"""``mammo report [RUN_ID]``: rebuild the report of one ``mammo run`` from the stage folders that run used.

A ``mammo run`` is one MLflow parent run; each of its stage child runs carries the stage name and the stage
key (``tasks/runtime.py`` ``_stage_tags``), and the parent carries ``stage.<name> = "<status> <key>"`` once it
ends. The key names the sealed folder ``<store>/stages/<stage>/<key>``, so the report is rebuilt from exactly
the artifacts of that run, even after later runs with other params have added folders next to them. The
lookups are in :mod:`flows.run_lookup`, shared with ``mammo compare``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from flows.run_lookup import PipelineRun, RunNotFound, find_pipeline_run, open_tracking, run_params, stage_folders

console = Console(stderr=True)
OPTIONAL_STAGES = ("detect", "baselines")  # read when the run has them; Tables 1, 6, 8, Figure 10 otherwise "not run"


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
