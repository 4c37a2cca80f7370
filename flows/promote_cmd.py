"""``mammo promote RUN_ID``: move the ``champion`` alias to a run's registered models when they are better.

Each ``mammo run`` registers its models and points their ``candidate`` alias at the new versions; serving
and ``mammo predict`` use ``models:/<name>@champion``. Promotion is a decision a person makes with the
numbers in front of them, so this command compares and refuses rather than promoting blindly.

Which numbers: the classifier is judged on ``classify/fusion/test_acc`` (accuracy of the fused
SVM+kNN+RF on the test split, the paper's headline metric); the detector on ``detect/ours/map50`` (mAP at
IoU 0.5 of the fused-backbone Faster R-CNN). Higher wins; a tie keeps the current champion, because moving
the alias would change what is served without evidence that it is better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console

from flows import environment

CHAMPION = "champion"
CANDIDATE = "candidate"
JUDGED_BY = {"mammo-classifier": "classify/fusion/test_acc", "mammo-detector": "detect/ours/map50"}
console = Console(stderr=True)


@dataclass(frozen=True)
class Decision:
    model: str
    metric: str
    version: str
    value: float
    champion_version: str | None
    champion_value: float | None

    @property
    def promote(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.champion_value is None or math.isnan(self.champion_value) or self.value > self.champion_value

    def describe(self) -> str:
        ours = f"{self.model} v{self.version}: {self.metric} = {self.value:.4f}"
        if self.champion_version is None:
            return f"{ours}; no champion yet"
        return f"{ours}; champion v{self.champion_version}: {self.champion_value:.4f}"


def _run_family(client, run_id: str) -> set[str]:
    """The run and its stage child runs (a pipeline parent id or a classify/detect run id both work)."""
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=1000)
    return {run_id, *(c.info.run_id for c in children)}


def _metric_of(client, run_id: str, metric: str) -> float:
    value = client.get_run(run_id).data.metrics.get(metric)
    return float("nan") if value is None else float(value)


def decide(client, run_id: str) -> list[Decision]:
    """One decision per registered model that ``run_id`` (or one of its stage runs) produced a version of."""
    family = _run_family(client, run_id)
    decisions = []
    for model, metric in JUDGED_BY.items():
        versions = [v for v in client.search_model_versions(f"name = '{model}'") if v.run_id in family]
        if not versions:
            continue
        version = max(versions, key=lambda v: int(v.version))
        try:
            champion = client.get_model_version_by_alias(model, CHAMPION)
        except Exception:  # no alias yet (MLflow raises when the alias is not set)
            champion = None
        decisions.append(Decision(
            model=model, metric=metric, version=str(version.version), value=_metric_of(client, version.run_id, metric),
            champion_version=None if champion is None else str(champion.version),
            champion_value=None if champion is None else _metric_of(client, champion.run_id, metric),
        ))
    return decisions


def promote(
    run_id: str = typer.Argument(..., help="MLflow run id of a `mammo run` (its parent run) or of its classify run"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
) -> None:
    """Point the `champion` alias at RUN_ID's registered models if their test metrics beat the champion's."""
    root = environment.store_root(store)
    environment.configure(root)
    from mlflow.tracking import MlflowClient

    from tasks.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(root))
    try:
        decisions = decide(client, run_id)
    except Exception as exc:
        console.print(f"[bold red]cannot promote run {run_id}:[/] {exc}")
        raise typer.Exit(2) from None
    if not decisions:
        console.print(f"[bold red]run {run_id} registered no model[/] ({', '.join(JUDGED_BY)}): nothing to promote")
        raise typer.Exit(2)
    refused = [d for d in decisions if not d.promote]
    if refused:  # all or nothing: a champion classifier next to a stale detector would mix two runs
        for d in refused:
            console.print(f"[bold red]not better:[/] {d.describe()}")
        raise typer.Exit(1)
    for d in decisions:
        client.set_registered_model_alias(d.model, CHAMPION, d.version)
        console.print(f"[green]promoted[/] {d.describe()} -> {d.model}@{CHAMPION} = v{d.version}")
