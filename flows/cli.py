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
from flows.commands.compare_cmd import compare
from flows.commands.predict_cmd import predict
from flows.commands.promote_cmd import promote
from flows.commands.report_cmd import report
from flows.commands.serve_cmd import serve
from flows.commands.similar_cmd import similar
from flows.commands.weights_cmd import weights_app
from mammo_core.storage import stage_files

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
    style = {"ran": "green", "cached": "cyan", "failed": "bold red", "stopped": "yellow"}
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
    from flows import fast_exit

    if _on_command_line():
        fast_exit.arm()
    try:
        _run(params, set_, from_, until, only, force, store, resume)
    except typer.Exit as exc:
        fast_exit.set_status(exc.exit_code)
        raise
    fast_exit.set_status(0)


def _on_command_line() -> bool:
    """True in the ``mammo`` program or ``python -m flows.cli``; False when a test calls the CLI in-process."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    return argv0.name == "mammo" or argv0.resolve() == Path(__file__).resolve()


def _run(params: Path | None, set_: list[str], from_: str | None, until: str | None, only: list[str],
         force: list[str], store: Path | None, resume: str | None) -> None:
    root = environment.store_root(store)
    environment.configure(root)  # before anything imports prefect: it reads its settings once
    from flows import interrupts, prefect_server

    server: prefect_server.LocalServer | None = None
    stages: list[str] | None = None
    if resume:
        server = prefect_server.start(root)  # before the import below imports prefect
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
    # Started as soon as the params are valid, so that it boots while this process imports and checks the
    # store; a child of ours that dies with us (even on SIGKILL) and that a Ctrl-C to our group does not reach.
    server = server or prefect_server.start(root)
    guard = interrupts.Interrupts(_say, lambda: _stop_now(server, store))
    guard.install()
    try:
        _run_checked(typed_params, params, set_, from_, until, only, force, store, resume, root, stages, server,
                     guard)
    finally:
        guard.uninstall()


def _run_checked(typed_params, params: Path, set_: list[str], from_: str | None, until: str | None,
                 only: list[str], force: list[str], store: Path | None, resume: str | None, root: Path,
                 stages: list[str] | None, server, guard) -> None:
    """The run once its params are valid, the temporary server started and the signals taken."""
    from flows import prefect_server

    if from_ or until or only or not resume:
        stages = select_stages(from_, until, only)
    for name in force:
        select_stages(None, None, [name])
    from rich.markup import escape

    from flows.reuse_check import verify_reusable
    from mammo_core.storage.store import IntegrityError

    try:
        verify_reusable(typed_params, root, stages, list(force))
    except IntegrityError as exc:
        console.print(f"[bold red]cannot reuse a stored stage:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    from flows import failures
    from flows.pipeline import PipelineFailed, pipeline
    from mammo_core.runtime import stop_request
    from tasks.registry import stage_keys
    from tasks.tracking import default_tracking_uri

    try:  # before anything is written: the store stays as it was
        failures.preflight(root, default_tracking_uri(root), stage_keys(typed_params), stages or _stage_names(),
                           check_api=server is None)
    except failures.EnvironmentFailure as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    console.print(f"Starting Prefect (runs the stages; a temporary local server, the first start takes up to a "
                  f"minute) and MLflow (records every stage; {root / 'mlflow.db'})", soft_wrap=True, highlight=False)
    if server is not None:
        console.print(f"Starting temporary server on http://127.0.0.1:{server.port}", highlight=False)
        try:
            server.serve_when_alone(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")),
                                    give_up=stop_request.requested, while_booting=lambda: _open_tracking(root))
        except prefect_server.ServerFailed as exc:
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
    if stop_request.requested():
        console.print(f"stopped by {stop_request.reason()} before the run began: nothing was written")
        raise typer.Exit(guard.exit_code)
    from flows import progress

    started = time.perf_counter()
    try:
        with progress.reporting(_reporter()):
            outcomes = pipeline(params_file=str(params), overrides=list(set_), stages=stages, force=list(force),
                                store=str(root), resume=resume)
    except PipelineFailed as exc:
        if exc.stopped_by:
            console.print(_table(exc.outcomes))
            console.print(f"[bold yellow]stopped by {exc.stopped_by}[/] during stage {exc.stage}: its MLflow run "
                          f"and the pipeline's run are marked KILLED; nothing half-written is left in the store, "
                          f"checkpoints of finished epochs are kept.", soft_wrap=True, highlight=False)
            _print_resume(exc.parent_run_id, store)
            raise typer.Exit(guard.exit_code) from None
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


def _open_tracking(root: Path) -> None:
    """Open the tracking store the flow's first step opens (MLflow keeps it per URI): its SQL layer's imports
    and engine cost about a second on two cores, paid here while the Prefect server boots.

    Only an embedded database that exists already: a new one is created and migrated (seconds that a
    Ctrl-C could not cut short, and a file written before the run began); the flow does that, as before.
    """
    from tasks.tracking import default_tracking_uri, open_client

    uri = default_tracking_uri(root)
    if uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).is_file():
        open_client(uri, root)


def _say(line: str) -> None:
    console.print(line, soft_wrap=True, highlight=False, markup=False)


def _print_resume(parent_run_id: str | None, store: Path | None) -> None:
    """The one command that continues a stopped run (finished stages reused, training from its checkpoint)."""
    if not parent_run_id:
        return
    again = ["mammo", "run", "--resume", parent_run_id] + (["--store", str(store)] if store else [])
    console.print("Resume (finished stages are reused, training continues from its last checkpoint):")
    console.print(f"  {shlex.join(again)}", soft_wrap=True, highlight=False, markup=False)


def _stop_now(server, store: Path | None) -> None:
    """The interrupt's hard stop: the stages did not stop in time, or Ctrl-C came twice."""
    from mammo_core.runtime import stop_request

    tracking = sys.modules.get("tasks.tracking")  # not imported yet: no run was opened
    parent = tracking.latest_parent_run() if tracking is not None else None
    killed = tracking.kill_open_runs(f"stopped by {stop_request.reason()} (the stage did not stop in time)") \
        if tracking is not None else []
    _say(f"stopped by {stop_request.reason()} without waiting for the stage: {len(killed)} MLflow run(s) still "
         f"open marked KILLED; nothing half-written is sealed (the next run removes temporary folders), "
         f"checkpoints are kept.")
    _print_resume(parent, store)
    if server is not None:
        server.process.kill()


def _reporter():
    """Live progress when a person watches a terminal; plain lines when output goes to a log or a pipe."""
    from flows.progress import PlainReporter, RichReporter

    if console.is_terminal and sys.stdout.isatty():
        return RichReporter(console)
    return PlainReporter(lambda line: console.print(line, soft_wrap=True, highlight=False, markup=False))


def where_to_look(outcomes: list[dict], root: Path) -> list[str]:
    """The closing lines of a finished run: where the report is and the one command that opens the UI."""
    lines = []
    report = next((Path(o["path"]) / stage_files.REPORT.html for o in outcomes if o["stage"] == "report" and o["path"]),
                  None)
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
    from mammo_core.storage.store import ArtifactStore
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
    from mammo_core.sources.phantom import generate_phantom

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
    from mammo_core.sources.tcia import DownloadFolderBusy, check_url, download_collection

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
