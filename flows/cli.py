"""The ``mammo`` command line: run the pipeline, inspect the store, open the UI, make data."""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from flows import environment
from flows.compare_cmd import compare
from flows.predict_cmd import predict
from flows.promote_cmd import promote
from flows.report_cmd import report
from flows.serve_cmd import serve
from flows.similar_cmd import similar
from flows.weights_cmd import weights_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

STAGE_HELP = "stage name (acquire, curate, ...)"


def _stage_names() -> list[str]:
    from tasks.registry import ORDER

    return [s.name for s in ORDER]


def select_stages(
    from_: str | None, until: str | None, only: list[str] | None
) -> list[str]:
    """The stages a run executes, in order, from --from/--until/--only."""
    names = _stage_names()
    for name in [from_, until, *(only or [])]:
        if name is not None and name not in names:
            raise typer.BadParameter(f"unknown stage {name!r}; stages are: {', '.join(names)}")
    if only:
        return [n for n in names if n in set(only)]
    start = names.index(from_) if from_ else 0
    stop = names.index(until) + 1 if until else len(names)
    return names[start:stop]


@contextmanager
def _bar(description: str) -> Iterator[tuple[Progress, TaskID]]:
    """A progress bar on stderr for long commands."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console,
    ) as bar:
        yield bar, bar.add_task(description, total=None)


def _table(outcomes: list[dict]) -> Table:
    table = Table(title="mammo run", show_lines=False)
    for col in ("stage", "status", "seconds", "key"):
        table.add_column(col)
    style = {"ran": "green", "cached": "cyan", "failed": "bold red"}
    for row in outcomes:
        table.add_row(
            row["stage"],
            f"[{style.get(row['status'], '')}]{row['status']}[/]",
            f"{row['seconds']:.1f}",
            row["key"],
        )
    return table


@app.command()
def run(
    params: Path | None = typer.Option(None, "-p", "--params", help="params YAML file [default: params/default.yaml]"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set curate.workers=4"),
    from_: str | None = typer.Option(None, "--from", help=f"first {STAGE_HELP} to run"),
    until: str | None = typer.Option(None, "--until", help=f"last {STAGE_HELP} to run"),
    only: list[str] = typer.Option([], "--only", help=f"run only this {STAGE_HELP} (repeatable)"),
    force: list[str] = typer.Option([], "--force", help="re-run this stage and its descendants"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
    resume: str | None = typer.Option(None, "--resume", help="MLflow parent run id of a failed run to continue "
                                      "(params, overrides and stages are read from it unless given)"),
) -> None:
    """Run the pipeline; finished stages with unchanged inputs are reused."""
    root = environment.store_root(store)
    environment.configure(root)  # before anything imports prefect: it reads its settings once
    stages: list[str] | None = None
    if resume:
        from tasks.run_tracking import resume_arguments
        from tasks.tracking import default_tracking_uri

        try:
            earlier = resume_arguments(default_tracking_uri(root), resume)
        except ValueError as exc:
            console.print(f"[bold red]cannot resume:[/] {exc}")
            raise typer.Exit(2) from None
        params = params or (Path(earlier["params_file"]) if earlier["params_file"] else None)
        set_ = set_ or earlier["overrides"]
        stages = earlier["stages"]
    params = params or Path("params/default.yaml")
    typed_params = environment.load_params_or_exit(params, set_)
    if from_ or until or only or not resume:
        stages = select_stages(from_, until, only)
    for name in force:
        select_stages(None, None, [name])
    from rich.markup import escape

    from flows.reuse_check import verify_reusable
    from mammo_core.store import IntegrityError

    try:
        verify_reusable(typed_params, root, stages, list(force))
    except IntegrityError as exc:
        console.print(f"[bold red]cannot reuse a stored stage:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    from flows import failures
    from flows.pipeline import PipelineFailed, pipeline
    from tasks.registry import stage_keys
    from tasks.tracking import default_tracking_uri

    try:  # before anything is written: the store stays as it was
        failures.preflight(root, default_tracking_uri(root), stage_keys(typed_params), stages or _stage_names())
    except failures.EnvironmentFailure as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    console.print(f"Starting Prefect (runs the stages; a temporary local server, the first start takes up to a "
                  f"minute) and MLflow (records every stage; {root / 'mlflow.db'})", soft_wrap=True, highlight=False)
    from flows import prefect_server, progress
    from tasks.tracking import open_client

    started = time.perf_counter()
    try:
        # Prefect's temporary server starts (a subprocess, on the other core) while this process creates
        # MLflow's database: both were done one after the other inside the flow. Only now, after the
        # checks, so that a refused run leaves the store as it was.
        server_start = prefect_server.start_in_background()
        try:
            open_client(default_tracking_uri(root), root)
        finally:
            prefect_server.ready(server_start)
        with progress.reporting(_reporter()):
            outcomes = pipeline(params_file=str(params), overrides=list(set_), stages=stages, force=list(force),
                                store=str(root), resume=resume)
    except PipelineFailed as exc:
        hint = (f"run again: `mammo run --resume {exc.parent_run_id}" + (f" --store {store}`" if store else "`")
                if exc.parent_run_id else "run again")
        line = failures.explain(exc, root, hint)
        if line is not None:
            console.print(f"[bold red]error:[/] {line}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        console.print(_table(exc.outcomes))
        console.print(f"[bold red]stage {exc.stage} failed:[/] {exc.message}")
        console.print("Fix the cause, then resume (finished stages are reused, the same MLflow run continues):")
        if exc.parent_run_id:
            again = ["mammo", "run", "--resume", exc.parent_run_id] + (["--store", str(store)] if store else [])
        else:
            again = ["mammo", "run", "-p", str(params), *sum((["--set", s] for s in set_), [])]
            again += (["--store", str(store)] if store else []) + ["--from", exc.stage]
        console.print(f"  {shlex.join(again)}", soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # before or around the stages (opening the tracking run, Prefect itself)
        line = failures.explain(exc, root, "run again")
        if line is None:
            raise
        console.print(f"[bold red]error:[/] {line}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    console.print(_table(outcomes))
    console.print(f"done in {time.perf_counter() - started:.1f} s; store {root}")
    for line in where_to_look(outcomes, root):
        console.print(line, soft_wrap=True, highlight=False, markup=False)


def _reporter():
    """Live progress when a person watches a terminal; plain lines when output goes to a log or a pipe."""
    from flows.progress import PlainReporter, RichReporter

    if console.is_terminal and sys.stdout.isatty():
        return RichReporter(console)
    return PlainReporter(lambda line: console.print(line, soft_wrap=True, highlight=False, markup=False))


def where_to_look(outcomes: list[dict], root: Path) -> list[str]:
    """The closing lines of a finished run: where the report is and the one command that opens the UI."""
    lines = []
    report = next((Path(o["path"]) / "report.html" for o in outcomes if o["stage"] == "report" and o["path"]), None)
    if report is not None and report.is_file():
        lines.append(f"Report (open in a browser): {report}")
    program = sys.argv[0] if Path(sys.argv[0]).name == "mammo" else "mammo"
    ui = [program, "ui", "--store", str(root)]
    lines.append(f"Runs, metrics and artifacts in the MLflow UI: {shlex.join(ui)}")
    return lines


@app.command()
def status(
    params: Path = typer.Option(Path("params/default.yaml"), "-p", "--params"),
    set_: list[str] = typer.Option([], "--set"),
    store: Path | None = typer.Option(None, "--store"),
) -> None:
    """Per stage: key, done or missing, folder (no Prefect server is started)."""
    p = environment.load_params_or_exit(params, set_)
    root = environment.store_root(store)
    environment.configure(root)
    from mammo_core.store import ArtifactStore
    from tasks.registry import stage_keys

    art = ArtifactStore(root)
    table = Table(title=f"store {root}")
    for col in ("stage", "state", "key", "folder"):
        table.add_column(col)
    for name, key in stage_keys(p).items():
        found = art.find(name, key)
        table.add_row(
            name, "[green]done[/]" if found else "[yellow]missing[/]", key, str(found.path) if found else ""
        )
    Console().print(table)


@app.command()
def ui(
    store: Path | None = typer.Option(None, "--store"),
    port: int = typer.Option(5000, "--port"),
) -> None:
    """Open the MLflow UI on the store, bound to 127.0.0.1."""
    root = environment.store_root(store)
    environment.configure(root)
    from tasks.tracking import default_tracking_uri

    uri = default_tracking_uri(root)
    # One worker: one person looks at it, and four (MLflow's default) start slowly on a small machine.
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", (root / "mlartifacts").as_uri()]
    base = f"http://127.0.0.1:{port}"
    console.print(f"MLflow UI on {base} (store {root}); Ctrl-C to stop", soft_wrap=True, highlight=False)
    for name, link in experiment_links(uri, base):
        console.print(f"  runs of {name!r}: {link}", soft_wrap=True, highlight=False, markup=False)
    # MLflow's job runner serves GenAI jobs (judges, trace roll-ups) this project has none of; without it the
    # server starts faster and a SIGTERM ends it (the runner otherwise outlives its server).
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child process: Ctrl-C or a SIGTERM sent to `mammo ui` reaches the server itself, and
    # nothing is left listening on the port after `mammo ui` is gone.
    os.execv(sys.executable, cmd)


def experiment_links(tracking_uri: str, base: str) -> list[tuple[str, str]]:
    """(name, link to its run table) per experiment holding runs.

    Why links: MLflow 3's UI opens an experiment in its GenAI workspace (traces, token usage) unless told
    otherwise; ``workflowType=machine_learning`` opens the run table, with each stage as a child run.
    """
    if tracking_uri.startswith("sqlite:") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return []  # no run yet: nothing to link, and no empty database to create
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return [(e.name, f"{base}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning")
            for e in client.search_experiments() if client.search_runs([e.experiment_id], max_results=1)]


@app.command()
def phantom(
    out: Path = typer.Argument(..., help="folder to write the CBIS-DDSM twin into"),
    patients: int = typer.Option(20, "--patients"),
    seed: int = typer.Option(0, "--seed"),
    height: int = typer.Option(1024, "--height"),
    width: int = typer.Option(640, "--width"),
) -> None:
    """Write a phantom CBIS-DDSM twin (CSVs + classic NBIA DICOM layout)."""
    from mammo_core.phantom import generate_phantom

    with _bar("rendering mammograms") as (bar, task):
        summary = generate_phantom(
            out, n_patients=patients, seed=seed, image_shape=(height, width),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(summary)


@app.command()
def download(
    out: Path = typer.Argument(..., help="target folder (resumable)"),
    limit: int | None = typer.Option(None, "--limit", help="first N series only"),
    workers: int = typer.Option(4, "--workers"),
    base_url: str = typer.Option("https://services.cancerimagingarchive.net/nbia-api/services/v1", "--base-url"),
    collection: str = typer.Option("CBIS-DDSM", "--collection"),
    allow_http_loopback: bool = typer.Option(
        False, "--allow-http-loopback", help="accept a plain-http --base-url on 127.0.0.1/localhost (test servers)"
    ),
) -> None:
    """Download CBIS-DDSM from TCIA's public NBIA API (resumable, checksummed, https only)."""
    from mammo_core.tcia import DownloadFolderBusy, check_url, download_collection

    try:
        check_url(base_url, allow_http_loopback=allow_http_loopback)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--base-url") from None
    with _bar("downloading series") as (bar, task):
        try:
            summary = download_collection(
                out, collection=collection, base_url=base_url, limit=limit, workers=workers,
                allow_http_loopback=allow_http_loopback,
                progress=lambda uid, status, done, total: bar.update(task, completed=done, total=total),
            )
        except DownloadFolderBusy as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    console.print(summary)
    if summary.failed:
        raise typer.Exit(1)


app.command("similar")(similar)
app.command("predict")(predict)
app.command("promote")(promote)
app.command("serve")(serve)
app.command("report")(report)
app.command("compare")(compare)
app.add_typer(weights_app, name="weights")

if __name__ == "__main__":
    app()
