"""``mammo promote RUN_ID``: move the ``champion`` alias to a run's registered models when they are better.

Each ``mammo run`` registers its models and points their ``candidate`` alias at the new versions; serving
and ``mammo predict`` use ``models:/<name>@champion``. Promotion is a decision a person makes with the
numbers in front of them, so this command compares and refuses rather than promoting blindly.

The rule (also in ``--help`` and in every decision printed): decisions never look at test. The classifier
moves only when the candidate's validation accuracy (fused SVM+kNN+RF, ``predictions.csv`` of the classify
stage) beats the champion's under a paired bootstrap over validation patients: both models scored on the
same resamples of the same validation patients, and the 95 % interval of candidate - champion lies wholly
above 0. A tie, a gain inside the noise, or validation splits that differ keep the current champion. Test
accuracy is printed beside, for the person reading, and never used. Why: choosing on test makes the test
number a selection statistic, optimistic for whatever was chosen, and the paper's headline number with it.

The detector: the detect stage saves no per-image validation predictions, so there is no paired validation
evidence for it; a detector becomes champion only when there is none yet, and otherwise stays (said so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import typer
from rich.console import Console

from flows import environment
from mammo_core.evaluation import paired_bootstrap as pb

CHAMPION = "champion"
CANDIDATE = "candidate"
CLASSIFIER, DETECTOR = "mammo-classifier", "mammo-detector"
SHOWN_TEST_METRIC = {CLASSIFIER: "classify/fusion/test_acc", DETECTOR: "detect/ours/map50"}
N_BOOT, CONFIDENCE, BOOT_SEED = 2000, 0.95, 0
RULE = (f"rule: decide on validation only - the candidate classifier replaces the champion when its validation "
        f"accuracy (fused SVM+kNN+RF) is higher with the whole {CONFIDENCE:.0%} paired bootstrap interval of "
        f"candidate - champion over validation patients ({N_BOOT} resamples) above 0; test numbers are shown, "
        f"never used; the detector (no saved validation predictions) moves only when there is no champion yet")
console = Console(stderr=True)


@dataclass(frozen=True)
class Decision:
    model: str
    version: str
    champion_version: str | None
    promote: bool
    reason: str
    evidence: pb.PairedDifference | None = None
    test_values: dict[str, float] = field(default_factory=dict)  # "candidate"/"champion" -> shown, never used
    blocking: bool = True  # a refusal that stops the whole promotion (the detector's "kept" does not)

    def describe(self) -> str:
        head = f"{self.model} v{self.version}"
        if self.champion_version is not None:
            head += f" vs champion v{self.champion_version}"
        parts = [head + f": {self.reason}"]
        if self.evidence is not None:
            parts.append("validation " + self.evidence.describe(("champion", "candidate")))
        metric = SHOWN_TEST_METRIC[self.model]
        shown = ", ".join(f"{who} {value:.4f}" for who, value in self.test_values.items() if not math.isnan(value))
        if shown:
            parts.append(f"test {metric} (shown, not used): {shown}")
        return "\n  ".join(parts)


def _run_family(client, run_id: str) -> set[str]:
    """The run and its stage child runs (a pipeline parent id or a classify/detect run id both work)."""
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'",
                                  max_results=1000)
    return {run_id, *(c.info.run_id for c in children)}


def _metric_of(client, run_id: str, metric: str) -> float:
    value = client.get_run(run_id).data.metrics.get(metric)
    return float("nan") if value is None else float(value)


def _predictions(client, root: Path, run_id: str) -> pd.DataFrame:
    """The classify stage's ``predictions.csv`` of the (classify child) run that registered a version."""
    from mammo_core.storage.store import ArtifactStore
    from tasks.stages.classify import PREDICTIONS_FILE

    key = client.get_run(run_id).data.tags.get("stage_key")
    if not key:
        raise FileNotFoundError(f"run {run_id} has no stage_key tag: its classify stage folder cannot be found")
    folder = ArtifactStore(root).find("classify", key)
    if folder is None or not (folder.path / PREDICTIONS_FILE).is_file():
        raise FileNotFoundError(f"no {PREDICTIONS_FILE} in the classify stage folder {key} of run {run_id} "
                                f"(absent from {root}, or made by an older version that did not save predictions)")
    return pd.read_csv(folder.path / PREDICTIONS_FILE)


def _decide_classifier(client, root: Path, version, champion) -> Decision:
    tests = {"candidate": _metric_of(client, version.run_id, SHOWN_TEST_METRIC[CLASSIFIER])}
    base = {"model": CLASSIFIER, "version": str(version.version), "test_values": tests}
    if champion is None:
        return Decision(**base, champion_version=None, promote=True, reason="no champion yet")
    tests["champion"] = _metric_of(client, champion.run_id, SHOWN_TEST_METRIC[CLASSIFIER])
    base["champion_version"] = str(champion.version)
    if str(champion.version) == str(version.version):
        return Decision(**base, promote=False, reason="already the champion")
    try:
        pairs = pb.paired_predictions(_predictions(client, root, champion.run_id),
                                      _predictions(client, root, version.run_id), "val", "fusion")
    except (FileNotFoundError, pb.NotPaired) as exc:
        return Decision(**base, promote=False, reason=f"no paired validation evidence, champion kept: {exc}")
    evidence = pb.paired_difference(pairs, "accuracy", n_boot=N_BOOT, seed=BOOT_SEED, confidence=CONFIDENCE)
    reason = ("better on validation beyond noise" if evidence.b_better else
              "not better on validation beyond noise, champion kept")
    return Decision(**base, promote=evidence.b_better, reason=reason, evidence=evidence)


def _decide_detector(client, version, champion) -> Decision:
    tests = {"candidate": _metric_of(client, version.run_id, SHOWN_TEST_METRIC[DETECTOR])}
    if champion is None:
        return Decision(model=DETECTOR, version=str(version.version), champion_version=None, promote=True,
                        reason="no champion yet", test_values=tests)
    tests["champion"] = _metric_of(client, champion.run_id, SHOWN_TEST_METRIC[DETECTOR])
    return Decision(model=DETECTOR, version=str(version.version), champion_version=str(champion.version),
                    promote=False, blocking=False, test_values=tests,
                    reason="champion kept: the detect stage saves no per-image validation predictions, so there "
                           "is no paired validation evidence (test mAP is never a reason to move it)")


def decide(client, run_id: str, root: Path) -> list[Decision]:
    """One decision per registered model that ``run_id`` (or one of its stage runs) produced a version of."""
    family = _run_family(client, run_id)
    decisions = []
    for model in (CLASSIFIER, DETECTOR):
        versions = [v for v in client.search_model_versions(f"name = '{model}'") if v.run_id in family]
        if not versions:
            continue
        version = max(versions, key=lambda v: int(v.version))
        try:
            champion = client.get_model_version_by_alias(model, CHAMPION)
        except Exception:  # no alias yet (MLflow raises when the alias is not set)
            champion = None
        decisions.append(_decide_classifier(client, root, version, champion) if model == CLASSIFIER
                         else _decide_detector(client, version, champion))
    return decisions


def promote(
    run_id: str = typer.Argument(..., help="MLflow run id of a `mammo run` (its parent run) or of its classify run"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
) -> None:
    """Point the `champion` alias at RUN_ID's registered models when validation says they are better.

    The classifier moves only when its validation accuracy beats the champion's with the whole 95 % paired
    bootstrap interval (candidate - champion, resampling validation patients, 2000 resamples) above 0. Test
    numbers are printed, never used. The detector moves only when there is no champion yet (no per-image
    validation predictions are saved for a paired comparison).
    """
    root = environment.store_root(store)
    environment.configure(root)
    from mlflow.tracking import MlflowClient

    from tasks.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(root))
    try:
        decisions = decide(client, run_id, root)
    except Exception as exc:
        console.print(f"[bold red]cannot promote run {run_id}:[/] {exc}")
        raise typer.Exit(2) from None
    if not decisions:
        console.print(f"[bold red]run {run_id} registered no model[/] ({CLASSIFIER}, {DETECTOR}): nothing to promote")
        raise typer.Exit(2)
    console.print(RULE)
    refused = [d for d in decisions if not d.promote and d.blocking]
    if refused:  # all or nothing: nothing moves while a decided model is refused
        for d in decisions:
            console.print(f"[bold red]not promoted:[/] {d.describe()}")
        raise typer.Exit(1)
    for d in decisions:
        if d.promote:
            client.set_registered_model_alias(d.model, CHAMPION, d.version)
            console.print(f"[green]promoted[/] {d.describe()}\n  -> {d.model}@{CHAMPION} = v{d.version}")
        else:
            console.print(f"[yellow]kept[/] {d.describe()}")
