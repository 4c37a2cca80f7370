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

The detector, by the same rule and the same code: it moves only when the candidate's validation AP50 (our
detector, mAP at IoU 0.5 over the classes, from the detect stage's ``val_detections.parquet`` and
``val_truth.parquet``/``val_images.parquet``) beats the champion's with the whole 95 % paired bootstrap
interval over validation patients above 0 (both detectors rescored on each resample of the same images,
paired on their image keys); test mAP is printed beside, never used. A detector that is not better is kept
without stopping the classifier's promotion (as before: the two are decided separately, the classifier's
refusal stops everything).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from flows import environment
from mammo_core.storage import stage_files

if TYPE_CHECKING:  # pandas and the bootstrap load when a decision is made, not with every `mammo` command
    import pandas as pd

    from mammo_core.evaluation import paired_bootstrap as pb

CHAMPION = "champion"
CANDIDATE = "candidate"
CLASSIFIER, DETECTOR = "mammo-classifier", "mammo-detector"
SHOWN_TEST_METRIC = {CLASSIFIER: "classify/fusion/test_acc", DETECTOR: "detect/ours/map50"}
N_BOOT, CONFIDENCE, BOOT_SEED = 2000, 0.95, 0
RULE = (f"rule: decide on validation only - a candidate replaces the champion when its validation metric "
        f"(classifier: accuracy of the fused SVM+kNN+RF; detector: AP50 of our detector) is higher with the whole "
        f"{CONFIDENCE:.0%} paired bootstrap interval of candidate - champion over validation patients ({N_BOOT} "
        f"resamples) above 0; test numbers are shown, never used; a detector that is not better is kept without "
        f"blocking the classifier")
DETECTOR_MODEL = "ours"  # the detect stage's registered detector
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


def _stage_folder(client, root: Path, run_id: str, stage: str, needed: str) -> Path:
    """The sealed stage folder of the (stage child) run that registered a version; ``needed``: a file in it."""
    from mammo_core.storage.store import ArtifactStore

    key = client.get_run(run_id).data.tags.get("stage_key")
    if not key:
        raise FileNotFoundError(f"run {run_id} has no stage_key tag: its {stage} stage folder cannot be found")
    folder = ArtifactStore(root).find(stage, key)
    if folder is None or not (folder.path / needed).is_file():
        raise FileNotFoundError(f"no {needed} in the {stage} stage folder {key} of run {run_id} "
                                f"(absent from {root}, or made by an older version that did not save predictions)")
    return folder.path


def _predictions(client, root: Path, run_id: str) -> pd.DataFrame:
    """The classify stage's ``predictions.csv`` of the (classify child) run that registered a version."""
    import pandas as pd

    from tasks.stages.classify import PREDICTIONS_FILE

    return pd.read_csv(_stage_folder(client, root, run_id, "classify", PREDICTIONS_FILE) / PREDICTIONS_FILE)


def _classifier_evidence(client, root: Path, champion_run: str, candidate_run: str) -> pb.PairedDifference:
    from mammo_core.evaluation import paired_bootstrap as pb

    pairs = pb.paired_predictions(_predictions(client, root, champion_run), _predictions(client, root, candidate_run),
                                  "val", "fusion")
    return pb.paired_difference(pairs, "accuracy", n_boot=N_BOOT, seed=BOOT_SEED, confidence=CONFIDENCE)


def _detector_evidence(client, root: Path, champion_run: str, candidate_run: str) -> pb.PairedDifference:
    """Validation AP50 of our detector, candidate - champion, paired over the validation patients."""
    import json

    from mammo_core.detection import bootstrap, records
    from mammo_core.evaluation import paired_bootstrap as pb

    runs = {}
    for who, run_id in (("champion", champion_run), ("candidate", candidate_run)):
        detections = records.split_files("val")[0]
        folder = _stage_folder(client, root, run_id, "detect", detections)
        classes = json.loads((folder / stage_files.DETECT.summary).read_text(encoding="utf-8"))["classes"]
        runs[who] = (records.read_split(folder, "val", [DETECTOR_MODEL]), classes)
    if runs["champion"][1] != runs["candidate"][1]:
        raise pb.NotPaired(f"the detectors name different classes: {runs['champion'][1]} vs {runs['candidate'][1]}")
    champion, candidate, targets, patients = records.paired_records(runs["champion"][0], DETECTOR_MODEL,
                                                                    runs["candidate"][0], DETECTOR_MODEL)
    return bootstrap.paired_detection_differences(champion, candidate, targets, len(runs["champion"][1]), patients,
                                                  n_boot=N_BOOT, seed=BOOT_SEED, confidence=CONFIDENCE)["map50"]


EVIDENCE = {CLASSIFIER: _classifier_evidence, DETECTOR: _detector_evidence}


def _decide(client, root: Path, model: str, version, champion) -> Decision:
    """One rule for every registered model: paired validation evidence or the champion stays."""
    from mammo_core.evaluation import paired_bootstrap as pb

    tests = {"candidate": _metric_of(client, version.run_id, SHOWN_TEST_METRIC[model])}
    base = {"model": model, "version": str(version.version), "test_values": tests,
            "blocking": model == CLASSIFIER}  # a kept detector does not stop the classifier
    if champion is None:
        return Decision(**base, champion_version=None, promote=True, reason="no champion yet")
    tests["champion"] = _metric_of(client, champion.run_id, SHOWN_TEST_METRIC[model])
    base["champion_version"] = str(champion.version)
    if str(champion.version) == str(version.version):
        return Decision(**base, promote=False, reason="already the champion")
    try:
        evidence = EVIDENCE[model](client, root, champion.run_id, version.run_id)
    except (FileNotFoundError, KeyError, pb.NotPaired) as exc:
        return Decision(**base, promote=False, reason=f"no paired validation evidence, champion kept: {exc}")
    reason = ("better on validation beyond noise" if evidence.b_better else
              "not better on validation beyond noise, champion kept")
    return Decision(**base, promote=evidence.b_better, reason=reason, evidence=evidence)


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
        decisions.append(_decide(client, root, model, version, champion))
    return decisions


def promote(
    run_id: str = typer.Argument(..., help="MLflow run id of a `mammo run` (its parent run) or of its classify run"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
) -> None:
    """Point the `champion` alias at RUN_ID's registered models when validation says they are better.

    The classifier moves only when its validation accuracy beats the champion's with the whole 95 % paired
    bootstrap interval (candidate - champion, resampling validation patients, 2000 resamples) above 0. The
    detector moves by the same rule on its validation AP50 (our detector's mAP at IoU 0.5, both detectors
    rescored on every resample of the validation patients); a detector that is not better is kept without
    blocking the classifier. Test numbers are printed, never used.
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
