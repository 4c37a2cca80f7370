"""``mammo compare RUN_A RUN_B``: two ``mammo run`` runs side by side (params, metrics, report tables).

Metrics come from the parent runs and their stage child runs (names namespaced by stage, as logged:
``classify/fusion/test_acc``); params from each run's ``params.yaml``; tables from each run's report (the
sealed report stage folder, else the ``report/tables`` artifacts of the parent run). The comparison itself
is :mod:`mammo_core.reporting.compare`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from flows.run_lookup import (
    PipelineRun,
    RunNotFound,
    find_pipeline_run,
    open_tracking,
    run_params,
    stage_folders,
)
from mammo_core.storage import stage_files
from mammo_core.storage.durable import write_text_atomic

if TYPE_CHECKING:  # pandas and the comparison code load when a comparison runs, not with every `mammo` command
    import pandas as pd

    from mammo_core.reporting import compare as cmp

console = Console(stderr=True)
SHOWN_CELLS = 40  # differing table cells printed per table (compare.md and compare.csv hold all)


def run_metrics(run: PipelineRun) -> dict[str, float]:
    """Every metric of the parent run and its stage child runs; a child's name gets its stage prefix if it
    lacks one, the parent's gets ``run/``."""
    metrics = {(k if "/" in k else f"run/{k}"): v for k, v in run.run.data.metrics.items()}
    for stage, child in run.children.items():
        metrics.update({(k if k.startswith(f"{stage}/") else f"{stage}/{k}"): v
                        for k, v in child.data.metrics.items()})
    return metrics


def report_tables(root: Path, client, run: PipelineRun) -> tuple[dict[str, pd.DataFrame], str]:
    """name -> table of the run's report, and where they were read from."""
    folder = stage_folders(root, run, ("report",))["report"]
    if folder is not None and (folder / "tables").is_dir():
        return _read_tables(folder / "tables"), str(folder / "tables")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(client.download_artifacts(run.run_id, "report/tables", tmp))
            return _read_tables(path), f"MLflow artifacts of run {run.run_id} (report/tables)"
    except Exception:
        return {}, "no report found (no sealed report folder and no report/tables artifacts)"


def _read_tables(folder: Path) -> dict[str, pd.DataFrame]:
    import pandas as pd

    return {p.stem: pd.read_csv(p) for p in sorted(folder.glob("*.csv"))}


def paired_test_differences(root: Path, runs: tuple[PipelineRun, PipelineRun]) -> tuple[pd.DataFrame | None, list[str]]:
    """Paired bootstrap CIs of B - A over the test patients, from both classify stages' ``predictions.csv``.

    None (with a note saying why) when a run has no classify folder or no saved predictions; an empty
    table with notes when the runs did not share a test split.
    """
    import pandas as pd

    from mammo_core.evaluation import paired_bootstrap
    from tasks.stages.classify import PREDICTIONS_FILE

    predictions, table, notes = [], None, []
    for run in runs:
        folder = stage_folders(root, run, ("classify",))["classify"]
        if folder is None or not (folder / PREDICTIONS_FILE).is_file():
            notes = [f"no paired test comparison: run {run.run_id} has no classify {PREDICTIONS_FILE} in "
                     f"{root} (no classify stage, or made by a version that did not save predictions)"]
            break
        predictions.append(pd.read_csv(folder / PREDICTIONS_FILE))
    else:
        table, notes = paired_bootstrap.paired_table(predictions[0], predictions[1], "test")
    detectors, detector_notes = detector_test_differences(root, runs)
    if detectors is not None and len(detectors):
        table = pd.concat([table, detectors], ignore_index=True) if table is not None and len(table) else detectors
    return table, notes + detector_notes


def detector_test_differences(root: Path, runs: tuple[PipelineRun, PipelineRun]
                              ) -> tuple[pd.DataFrame | None, list[str]]:
    """Paired bootstrap CIs of B - A of each detector's AP50 (and lesion AP50, FROC at 1 FP/image) over the
    test patients, from both detect stages' per-image test detections; None (with a note) without them."""
    import json

    from mammo_core.detection import records
    from mammo_core.reporting import compare as cmp

    saved = []
    for run in runs:
        folder = stage_folders(root, run, ("detect",))["detect"]
        try:
            if folder is None:
                raise FileNotFoundError(f"no detect stage folder of run {run.run_id} in {root}")
            classes = json.loads((folder / stage_files.DETECT.summary).read_text(encoding="utf-8"))["classes"]
            saved.append((records.read_split(folder, "test"), classes))
        except (FileNotFoundError, KeyError, ValueError) as exc:
            return None, [f"no paired detector comparison: {exc}"]
    if saved[0][1] != saved[1][1]:
        return None, [f"no paired detector comparison: the detectors name different classes ({saved[0][1]} vs "
                      f"{saved[1][1]})"]
    return cmp.detector_paired_table(saved[0][0], saved[1][0], len(saved[0][1]))


def _atomic_write(path: Path, text: str) -> None:
    write_text_atomic(path, text, fsync=False)


def _rich(frame: pd.DataFrame, keys: list[str], labels: tuple[str, str], title: str) -> Table:
    from mammo_core.reporting.report_render import format_value

    table = Table(title=title)
    for column in (*keys, f"A {labels[0][:8]}", f"B {labels[1][:8]}", "B - A"):
        table.add_column(column)
    for row in frame.itertuples(index=False):
        style = "bold yellow" if row.differs else ""
        values = [*(getattr(row, k) for k in keys), row.a, row.b, row.diff]
        table.add_row(*(format_value(v) for v in values), style=style)
    return table


def write_comparison(comparison: cmp.Comparison, out: Path) -> dict[str, Path]:
    """``compare.md``, ``compare.csv`` (and ``compare_paired_test.csv``) under ``out`` (written atomically)."""
    from mammo_core.reporting import compare as cmp

    paths = {"md": Path(out) / "compare.md", "csv": Path(out) / "compare.csv"}
    _atomic_write(paths["md"], cmp.render_markdown(comparison))
    _atomic_write(paths["csv"], cmp.to_frame(comparison).to_csv(index=False))
    if comparison.paired is not None and len(comparison.paired):
        paths["paired"] = Path(out) / "compare_paired_test.csv"
        _atomic_write(paths["paired"], comparison.paired.to_csv(index=False))
    return paths


def print_comparison(comparison: cmp.Comparison, printer: Console) -> None:
    labels = comparison.labels
    params = comparison.params[comparison.params["differs"]]
    if len(params):
        printer.print(_rich(params, ["param"], labels, "params that differ"))
    else:
        printer.print("no param differs")
    printer.print(_rich(comparison.metrics, ["metric"], labels, "metrics (differing rows highlighted)"))
    for name, frame in comparison.tables.items():
        differing = frame[frame["differs"]]
        if len(differing):
            printer.print(_rich(differing.head(SHOWN_CELLS), ["row", "column"], labels,
                                f"table {name}: {len(differing)} of {len(frame)} cells differ"))
        else:
            printer.print(f"table {name}: all {len(frame)} cells equal")
    if comparison.paired is not None and len(comparison.paired):
        table = Table(title="paired bootstrap on the shared test split (B - A, patients resampled)")
        for column in ("classifier", "metric", "A", "B", "B - A", "CI", "patients", "verdict"):
            table.add_column(column)
        for row in comparison.paired.itertuples(index=False):
            table.add_row(row.classifier, row.metric, f"{row.a:.4f}", f"{row.b:.4f}", f"{row.diff:+.4f}",
                          f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}] ({row.confidence:.0%})", str(row.n_patients),
                          "distinguishable from noise" if row.distinguishable else "not distinguishable from noise",
                          style="bold yellow" if row.distinguishable else "")
        printer.print(table)
    for note in comparison.notes:
        printer.print(f"note: {note}")


def compare(
    run_a: str = typer.Argument(..., help="parent run id of the first `mammo run` (A)"),
    run_b: str = typer.Argument(..., help="parent run id of the second `mammo run` (B)"),
    out: Path | None = typer.Option(None, "--out", help="output folder (default <store>/compare/<A>_<B>/)"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
) -> None:
    """Compare two `mammo run` runs: params that differ, every metric and every report table, with B - A.

    When both runs scored the same test patches, each headline metric (accuracy, balanced accuracy of the
    fused and single classifiers; AP50, lesion AP50 and FROC at 1 FP/image of each detector on the same test
    images) also gets the paired bootstrap CI of B - A over test patients and a verdict: distinguishable from
    noise or not.
    """
    from mammo_core.reporting import compare as cmp

    root, client = open_tracking(store)
    try:
        runs = (find_pipeline_run(client, run_a), find_pipeline_run(client, run_b))
    except RunNotFound as exc:
        console.print(f"[bold red]{exc}[/]")
        raise typer.Exit(2) from None
    params: list[dict[str, Any]] = [run_params(client, r) for r in runs]
    tables = [report_tables(root, client, r) for r in runs]
    comparison = cmp.compare_runs((run_a, run_b), (params[0], params[1]), (run_metrics(runs[0]), run_metrics(runs[1])),
                                  (tables[0][0], tables[1][0]))
    comparison.notes += [f"tables of run {r.run_id}: {where}" for r, (_, where) in zip(runs, tables, strict=True)]
    comparison.paired, paired_notes = paired_test_differences(root, runs)
    comparison.notes += paired_notes
    commits = [r.run.data.tags.get("git_commit", "not recorded") for r in runs]
    if commits[0] != commits[1]:
        comparison.notes.append(f"code versions differ: A {commits[0]}, B {commits[1]}")
    folder = Path(out) if out is not None else root / "compare" / f"{run_a}_{run_b}"
    paths = write_comparison(comparison, folder)
    print_comparison(comparison, Console(width=200))
    changed = ", ".join(comparison.changed_params) or "none"
    console.print(f"params that differ: {changed}")
    console.print(f"written {paths['md']} and {paths['csv']}")
