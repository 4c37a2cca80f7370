"""`mammo promote RUN_ID` against a real MLflow registry (the store's SQLite backend).

The runs and model versions are made with MlflowClient the way the pipeline makes them (a parent run,
a classify child run carrying `classify/fusion/test_acc`, a `mammo-classifier` version from that child
run), so the command under test reads exactly what a real `mammo run` leaves behind, without the
minutes a full pipeline run to classify would cost.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from tests.helpers import environment_guard

MODEL = "mammo-classifier"


def _predictions(val_correct: int, test_correct: int, n_val: int = 80, n_test: int = 40) -> pd.DataFrame:
    """Fused-classifier predictions on fixed val/test splits (2 patches per patient, 4 classes): the first
    ``*_correct`` patches of a split right, the rest wrong - so two runs differ on known patches."""
    rows = []
    for split, n, correct in (("val", n_val, val_correct), ("test", n_test, test_correct)):
        for i in range(n):
            label = i % 4
            rows.append({"split": split, "classifier": "fusion", "source_id": f"{split}-{i:03d}",
                         "patient_id": f"P_{split}_{i // 2:03d}", "label": label,
                         "predicted": label if i < correct else (label + 1) % 4})
    return pd.DataFrame(rows)


def _pipeline_run(client: MlflowClient, experiment: str, folder: Path, test_acc: float,
                  predictions: pd.DataFrame | None = None) -> tuple[str, str]:
    """(parent run id, registered version) of one simulated `mammo run` that reached classify.

    With ``predictions``, the classify child run carries a ``stage_key`` tag and its sealed stage folder
    (``<store>/stages/classify/<key>/`` with a manifest) holds them as ``predictions.csv``, as the stage
    leaves it; ``folder`` is the store root.
    """
    parent = client.create_run(experiment, run_name="smoke", tags={"kind": "pipeline"}).info.run_id
    key = uuid.uuid4().hex[:24]
    child = client.create_run(experiment, run_name="classify",
                              tags={"mlflow.parentRunId": parent, "stage": "classify", "stage_key": key}).info.run_id
    client.log_metric(child, "classify/fusion/test_acc", test_acc)
    if predictions is not None:
        stage_dir = folder / "stages" / "classify" / key
        stage_dir.mkdir(parents=True)
        predictions.to_csv(stage_dir / "predictions.csv", index=False)
        (stage_dir / "manifest.json").write_text(json.dumps({"stage": "classify", "key": key}), encoding="utf-8")
    model_dir = folder / "models" / child
    model_dir.mkdir(parents=True)
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    version = client.create_model_version(MODEL, model_dir.as_uri(), run_id=child).version
    client.set_registered_model_alias(MODEL, "candidate", str(version))
    for run in (child, parent):
        client.set_terminated(run)
    return parent, str(version)


@pytest.fixture(autouse=True)
def restored_environment():
    """``mammo`` commands set MLflow/Prefect variables for their process; in-process runs must not leak them."""
    with environment_guard.restored_environment():
        yield


def mammo(store: Path, *args: str, check: bool = True) -> SimpleNamespace:
    """`mammo ARGS --store STORE` in this process (a subprocess per call costs ~20 s of imports here)."""
    result = CliRunner().invoke(app, [*args, "--store", str(store)])
    if check and result.exit_code != 0:
        raise AssertionError(f"mammo {args} failed ({result.exit_code}):\n{result.output}")
    # whitespace collapsed: the console wraps long decision lines at its width
    return SimpleNamespace(returncode=result.exit_code, stderr=" ".join(result.output.split()))


@pytest.fixture
def registry(tmp_path) -> tuple[Path, MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("mammo-fusion", artifact_location=(tmp_path / "mlartifacts").as_uri())
    client.create_registered_model(MODEL)
    return tmp_path, client, experiment


def _champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(MODEL, "champion").version)


def test_promotion_decides_on_validation_and_never_on_test(registry):
    """A registry where test and validation disagree: test numbers are printed but never move the alias."""
    store, client, experiment = registry
    first, v1 = _pipeline_run(client, experiment, store, test_acc=0.90, predictions=_predictions(40, 36))
    proc = mammo(store, "promote", first)
    assert "no champion yet" in proc.stderr and _champion(client) == v1
    assert "decide on validation only" in proc.stderr  # the rule is printed with the decision

    # much better on test, identical on validation: refused, test shown beside
    test_only, _ = _pipeline_run(client, experiment, store, test_acc=0.99, predictions=_predictions(40, 40))
    proc = mammo(store, "promote", test_only, check=False)
    assert proc.returncode == 1 and _champion(client) == v1
    assert "not better on validation beyond noise" in proc.stderr
    assert "(shown, not used): candidate 0.9900, champion 0.9000" in proc.stderr, proc.stderr

    # a gain of one patient (2 of 80 validation patches) is inside the noise: refused
    noise, _ = _pipeline_run(client, experiment, store, test_acc=0.95, predictions=_predictions(42, 36))
    proc = mammo(store, "promote", noise, check=False)
    assert proc.returncode == 1 and _champion(client) == v1
    assert "candidate - champion +0.0250" in proc.stderr and "not distinguishable from noise" in proc.stderr

    # clearly better on validation, worse on test: promoted (test is not a reason either way)
    better, v4 = _pipeline_run(client, experiment, store, test_acc=0.50, predictions=_predictions(70, 10))
    proc = mammo(store, "promote", better)
    assert _champion(client) == v4
    assert "better on validation beyond noise" in proc.stderr and "distinguishable from noise" in proc.stderr
    assert "candidate 0.8750" in proc.stderr and "champion 0.5000" in proc.stderr  # validation accuracies
    assert str(client.get_model_version_by_alias(MODEL, "candidate").version) == v4


def test_promotion_refuses_without_paired_validation_predictions(registry):
    store, client, experiment = registry
    first, v1 = _pipeline_run(client, experiment, store, test_acc=0.6, predictions=_predictions(40, 20))
    mammo(store, "promote", first)
    old, _ = _pipeline_run(client, experiment, store, test_acc=0.9)  # an older run: no predictions saved
    proc = mammo(store, "promote", old, check=False)
    assert proc.returncode == 1 and "no paired validation evidence" in proc.stderr and "predictions.csv" in proc.stderr
    other_split, _ = _pipeline_run(client, experiment, store, test_acc=0.9, predictions=_predictions(70, 20, n_val=60))
    proc = mammo(store, "promote", other_split, check=False)
    assert proc.returncode == 1 and "val splits differ" in proc.stderr
    assert _champion(client) == v1


def test_promote_help_states_the_rule():
    result = CliRunner().invoke(app, ["promote", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "paired" in text and "validation" in text and "Test numbers are printed, never used" in text
    assert "validation AP50" in text  # the detector's rule too


def test_a_run_without_registered_models_is_refused(registry):
    store, client, experiment = registry
    bare = client.create_run(experiment, run_name="smoke", tags={"kind": "pipeline"}).info.run_id
    proc = mammo(store, "promote", bare, check=False)
    assert proc.returncode == 2 and "registered no model" in proc.stderr
    proc = mammo(store, "promote", "f" * 32, check=False)
    assert proc.returncode == 2 and "f" * 32 in proc.stderr


# ------------------------------------------------------------------------------ the detector, by the same rule

DETECTOR = "mammo-detector"
N_VAL, N_TEST = 40, 20  # images, 2 per patient


def _detect_run(client: MlflowClient, experiment: str, store: Path, val_found: int, test_found: int) -> tuple[str, str]:
    """(parent run id, registered version) of a simulated run whose detect stage folder holds ``our`` detector's
    per-image val and test detections (the first ``*_found`` lesions of a split found, the rest missed)."""
    from mammo_core.detection.evaluate import coco_metrics
    from tests.helpers import detection_cases as cases

    parent = client.create_run(experiment, run_name="smoke", tags={"kind": "pipeline"}).info.run_id
    key = uuid.uuid4().hex[:24]
    child = client.create_run(experiment, run_name="detect",
                              tags={"mlflow.parentRunId": parent, "stage": "detect", "stage_key": key}).info.run_id
    by_split = {}
    for split, n, found in (("val", N_VAL, val_found), ("test", N_TEST, test_found)):
        truth = cases.targets(n)
        by_split[split] = (truth, {"ours": cases.detections(truth, [i < found for i in range(n)])})
    cases.write_detect_folder(store / "stages" / "detect" / key, by_split)
    test_truth, test_preds = by_split["test"]
    client.log_metric(child, "detect/ours/map50", coco_metrics(test_preds["ours"], test_truth, cases.CLASSES)["map50"])
    model_dir = store / "models" / child
    model_dir.mkdir(parents=True)
    (model_dir / "MLmodel").write_text("flavors: {}\n")
    version = client.create_model_version(DETECTOR, model_dir.as_uri(), run_id=child).version
    for run in (child, parent):
        client.set_terminated(run)
    return parent, str(version)


def test_the_detector_is_promoted_on_validation_ap50_never_on_test(registry):
    """Test and validation disagree: the detector moves only on paired validation evidence."""
    store, client, experiment = registry
    client.create_registered_model(DETECTOR)

    def champion() -> str:
        return str(client.get_model_version_by_alias(DETECTOR, "champion").version)

    first, v1 = _detect_run(client, experiment, store, val_found=16, test_found=6)
    proc = mammo(store, "promote", first)
    assert "no champion yet" in proc.stderr and champion() == v1

    # far better on test, identical on validation: kept (and said why), test shown beside
    test_only, _ = _detect_run(client, experiment, store, val_found=16, test_found=20)
    proc = mammo(store, "promote", test_only)
    assert champion() == v1 and "kept" in proc.stderr and "not better on validation beyond noise" in proc.stderr
    assert "candidate - champion +0.0000" in proc.stderr and "not distinguishable from noise" in proc.stderr
    assert "test detect/ours/map50 (shown, not used): candidate 1.0000, champion" in proc.stderr, proc.stderr
    assert "AP50 of our detector" in proc.stderr  # the rule, printed with the decision

    # clearly better on validation (36 of 40 lesions instead of 16), worse on test: promoted
    better, v3 = _detect_run(client, experiment, store, val_found=36, test_found=2)
    proc = mammo(store, "promote", better)
    assert champion() == v3, proc.stderr
    assert "better on validation beyond noise" in proc.stderr and "over 20 patients (40 images" in proc.stderr

    # a run whose detect stage saved no validation detections: no evidence, champion kept
    missing, _ = _detect_run(client, experiment, store, val_found=40, test_found=20)
    key = client.get_run(client.get_model_version(DETECTOR, str(int(v3) + 1)).run_id).data.tags["stage_key"]
    (store / "stages" / "detect" / key / "val_detections.parquet").unlink()
    proc = mammo(store, "promote", missing)
    assert champion() == v3 and "no paired validation evidence" in proc.stderr and "val_detections" in proc.stderr
