"""The baselines stage on the smoke params through the real runtime (sealed folder, MLflow child run).

The upstream stages come from the session's full smoke run (conftest ``smoke_store``, taken as a copy),
which also trained the four networks as units. The VGG16 unit is removed from the copy and the stage runs
again (under a new stage key: another AGNet pair), which must train VGG16 only and reuse the other three.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mammo_core.config import load_params
from tasks import runtime, tracking
from tasks.stages import baselines as stage
from tasks.stages.augment import FILE as AUGMENTED_FILE
from tests.e2e.test_pipeline_e2e import SMOKE
from tests.helpers.smoke_store import copy_store

pytestmark = pytest.mark.slow
NETWORKS = ["vgg16", "inception_v3", "resnet50", "densenet121"]


def _unit_network(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["params"]["network"]


@pytest.fixture(scope="module")
def world(smoke_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    store = copy_store(smoke_store, root / "store")
    units = store / "units" / "baselines"
    (vgg,) = [p for p in units.iterdir() if (p / "manifest.json").is_file() and _unit_network(p) == "vgg16"]
    shutil.rmtree(vgg)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tracking.ensure_experiment(client, "baselines-test", root / "artifacts")
    parent = tracking.start_run(client, experiment, "mammo run", tags={})
    upstream = {}
    for name in ("patches", "augment", "features"):
        (folder,) = [p for p in (store / "stages" / name).iterdir() if not p.name.startswith(".")]
        upstream[name] = runtime.StageResult(stage=name, key=folder.name, path=str(folder), metrics={},
                                             mlflow_run_id=None, parent_run_id=None, seconds=0.0, ran=False)
    (first,) = [p for p in (store / "stages" / "baselines").iterdir() if (p / "manifest.json").is_file()]
    params = load_params(SMOKE, ["baselines.agnet_pair=[vgg16, resnet50]"])
    ctx = runtime.RunContext(store=str(store), params=params, params_file=str(SMOKE),
                             tracking_uri=uri, experiment_id=experiment, parent_run_id=parent,
                             flow_run_id="flow", git_commit="abc")
    key = stage.SPEC.key(params, {s: r.key for s, r in upstream.items()})
    full = runtime.execute(stage.SPEC, ctx, key, upstream)
    return {"store": store, "client": client, "first": first, "full": full, "upstream": upstream}


def test_stage_writes_the_artifact_contract(world):
    result = world["full"]
    folder = Path(result.path)
    assert (folder / "manifest.json").is_file()
    data = json.loads((folder / "baselines.json").read_text())
    assert data["classes"][0] == "NORMAL" and len(data["classes"]) == 7
    assert 0 < data["majority_rate"] <= 1
    assert [r["network"] for r in data["rows"]] == NETWORKS
    params = load_params(SMOKE)
    with h5py.File(Path(world["upstream"]["augment"].path) / AUGMENTED_FILE, "r") as fh:
        branch_rows = len(fh["labels"])  # what the train stage trains the branches on
    assert data["protocol"]["train_rows"] == branch_rows and data["protocol"]["epochs"] == params.train.epochs == 2
    for row in data["rows"]:
        assert set(row) == {"network", "test_acc", "ci_low", "ci_high", "balanced_acc", "macro_auc", "latency_ms",
                            "params_m", "weights", "input_size", "epochs", "train_rows", "frozen_layers",
                            "frozen_params", "trainable_params"}
        assert row["ci_low"] <= row["test_acc"] <= row["ci_high"] and 0 <= row["macro_auc"] <= 1
        assert row["latency_ms"] > 0 and row["epochs"] == 2 and row["weights"] == "none (random init)"
        assert row["train_rows"] == branch_rows
        assert row["frozen_params"] + row["trainable_params"] == round(row["params_m"] * 1e6)
        assert row["frozen_params"] > 0 and row["trainable_params"] > 0
    assert {r["network"]: r["frozen_layers"] for r in data["rows"]}["resnet50"] == "conv1+layer1..layer3"  # deep
    sizes = {r["network"]: (r["input_size"], round(r["params_m"], 1)) for r in data["rows"]}
    assert sizes == {"vgg16": (32, 14.7), "inception_v3": (75, 21.8), "resnet50": (32, 23.5),
                     "densenet121": (32, 7.0)}
    assert [c["method"] for c in data["classic"]] == ["sift_bovw_svm", "agnet"]
    assert "patches without keypoints" in data["classic"][0]["detail"]
    assert "vgg16 + resnet50" in data["classic"][1]["detail"]
    assert all(0 <= c["ci_low"] <= c["test_acc"] <= c["ci_high"] <= 1 for c in data["classic"])
    table6 = pd.read_csv(folder / stage.TABLE6)
    assert table6["network"].tolist() == NETWORKS
    assert table6["frozen_params"].tolist() == [r["frozen_params"] for r in data["rows"]]
    assert pd.read_csv(folder / stage.TABLE1)["method"].tolist() == ["sift_bovw_svm", "agnet"]
    curves = json.loads((folder / stage.CURVES).read_text())
    assert sorted(curves) == sorted(NETWORKS)
    assert all(set(c[0]) == {"epoch", "val_acc", "train_loss"} for c in curves.values())
    assert (folder / stage.FIGURE10).stat().st_size > 1000
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["baselines/densenet121/test_acc"] == data["rows"][3]["test_acc"]
    assert manifest["metrics"]["baselines/fused/latency_ms"] > 0
    assert "patient" not in json.dumps(manifest).lower()
    # every single network's test predictions, per patch, for the report's balanced-accuracy and AUC intervals
    predictions = pd.read_csv(folder / stage.PREDICTIONS)
    with h5py.File(Path(world["upstream"]["patches"].path) / "patches.h5", "r") as fh:
        test_ids = [s.decode() for s in fh["source_id"][()][fh["split"][()] == 2]]
    for row in data["rows"]:
        mine = predictions[predictions["name"] == row["network"]]
        assert mine["patch_id"].astype(str).tolist() == test_ids
        assert (mine["y_pred"] == mine["y_true"]).mean() == pytest.approx(row["test_acc"])
        proba = mine[[f"proba_{c}" for c in data["classes"]]].to_numpy()
        assert np.array_equal(proba.argmax(axis=1), mine["y_pred"].to_numpy())
    logged = {Path(a.path).name for a in world["client"].list_artifacts(result.mlflow_run_id, "tables")}
    assert stage.RESULTS in logged and stage.PREDICTIONS not in logged  # ids stay in the store


def test_freeze3_fusions_sit_beside_freeze3_and_the_three_branch_fusion(world):
    folder = Path(world["full"].path)
    rows = json.loads((folder / stage.FREEZE3_FUSION).read_text())
    names = ["Freeze1+Freeze2+Freeze3", "Freeze3", "Freeze3+VGG16", "Freeze3+InceptionV3", "Freeze3+ResNet50"]
    assert [r["name"] for r in rows] == names
    features = json.loads((Path(world["upstream"]["features"].path) / "manifest.json").read_text())["metrics"]
    predictions = pd.read_csv(folder / stage.FREEZE3_PREDICTIONS)
    classes = json.loads((folder / "baselines.json").read_text())["classes"]
    assert list(predictions.columns) == ["name", "patch_id", "patient_id", "y_true", "y_pred",
                                         *[f"proba_{c}" for c in classes]]
    for row in rows:
        assert {"accuracy", "accuracy_ci", "balanced_accuracy", "macro_auc", "n_test"} <= set(row)
        mine = predictions[predictions["name"] == row["name"]]
        assert len(mine) == row["n_test"] > 0
        assert row["accuracy"] == pytest.approx(float((mine["y_true"] == mine["y_pred"]).mean()))
        assert row["accuracy_ci"][0] <= row["accuracy"] <= row["accuracy_ci"][1]
        assert np.allclose(mine[[f"proba_{c}" for c in classes]].sum(axis=1), 1.0, atol=1e-5)
    # the same head on the same rows as the features stage's probe: the three-branch row is that number
    assert rows[0]["accuracy"] == pytest.approx(features["features/fused/test_acc"])
    assert rows[1]["accuracy"] == pytest.approx(features["features/freeze3/test_acc"])
    assert all(0 < r["weight_freeze3"] < 1 for r in rows[2:])


def test_mlflow_carries_the_named_metrics(world):
    result = world["full"]
    run = world["client"].get_run(result.mlflow_run_id)
    names = set(run.data.metrics)
    for network in NETWORKS:
        assert {f"baselines/{network}/test_acc", f"baselines/{network}/latency_ms",
                f"baselines/{network}/val_acc"} <= names
    assert {"baselines/sift_bovw_svm/test_acc", "baselines/agnet/test_acc"} <= names
    history = world["client"].get_metric_history(result.mlflow_run_id, "baselines/resnet50/val_acc")
    assert [m.step for m in history] == [1, 2]  # the train: section's 2 smoke epochs


def test_adding_a_network_trains_only_that_one(world):
    first, full = world["first"], world["full"]
    assert first.name != full.key
    assert {k: v for k, v in full.metrics.items() if k.endswith("/reused")} == {
        "baselines/vgg16/reused": 0.0, "baselines/inception_v3/reused": 1.0, "baselines/resnet50/reused": 1.0,
        "baselines/densenet121/reused": 1.0}
    units_dir = world["store"] / "units" / "baselines"
    assert sorted(_unit_network(p) for p in units_dir.iterdir() if (p / "manifest.json").is_file()) == sorted(NETWORKS)
    before = json.loads((first / "baselines.json").read_text())["rows"]
    after = json.loads((Path(full.path) / "baselines.json").read_text())["rows"]
    same = {r["network"]: r["test_acc"] for r in before}
    assert all(same[r["network"]] == r["test_acc"] for r in after), "reused units and a retrained VGG16 agree"
    assert not (world["store"] / "scratch" / "baselines" / full.key).exists()  # checkpoints go once sealed
