"""baselines: single-network classifiers (Table 6, Figure 10), Freeze3 + network fusions (section 4.7)
and the classic baselines of Table 1.

Each network is trained under the train stage's protocol: the same rows (the augmented training set),
the ``train:`` section's schedule (:func:`baseline_schedule`: epochs, batch, lr, warm-up, roll-back,
seed; the baselines section has no schedule of its own, so the two cannot drift apart), its shallow
layers frozen and their outputs cached once (:mod:`mammo_core.baselines.train`). Each is cached as its own sealed unit
(:mod:`mammo_core.baselines.units`), so adding a network to ``baselines.networks`` trains only that one;
checkpoints go to the stage's scratch folder (per network and unit key), so a killed run resumes from
the last finished epoch. The stage then measures every network's latency side by side in this process,
the bootstrap intervals by patient, SIFT-BoVW + SVM and the AGNet-style fusion, and writes the artifact
contract the report reads: ``baselines.json``, ``table6_single_networks.csv``, ``table1_baselines.csv``,
``val_curves.json``, ``figure10_val_curves.png``, ``freeze3_fusion.json``, and per test patch (kept in the
store only: they name patient ids) ``predictions.csv`` (every single network) and
``freeze3_fusion_predictions.csv``.
The Freeze3 and three-branch fused features are the features stage's (``features.h5``: the train
stage's branches read out on every patch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mammo_core.config import BaselinesParams, Params
from mammo_core.evaluation import metrics
from mammo_core.sources import weight_sources
from mammo_core.storage import stage_files
from mammo_core.storage.store import write_json_atomic
from tasks import runtime
from tasks.stages.augment import FILE as AUGMENTED_FILE
from tasks.stages.features import FILE as FEATURES_FILE
from tasks.stages.patches import FILE as PATCHES_FILE

if TYPE_CHECKING:
    from mammo_core.baselines import units
    from mammo_core.training import schedule

FILES = stage_files.BASELINES  # this stage's output files

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
RESULTS = FILES.summary
TABLE6 = "table6_single_networks.csv"
TABLE1 = "table1_baselines.csv"
CURVES = FILES.curves
FIGURE10 = "figure10_val_curves.png"
FUSED = "fused"
FREEZE3_FUSION = FILES.freeze3_fusion
FREEZE3_PREDICTIONS = FILES.freeze3_fusion_predictions
PREDICTIONS = FILES.predictions  # every single network's test predictions: the report's intervals and pairings
THREE_BRANCH = "Freeze1+Freeze2+Freeze3"
FREEZE3_ALONE = "Freeze3"
PAIR_NAMES = {"vgg16": "Freeze3+VGG16", "inception_v3": "Freeze3+InceptionV3", "resnet50": "Freeze3+ResNet50"}


def baseline_schedule(params: Params) -> schedule.Schedule:
    """The schedule every baseline network trains under: the ``train:`` section's, as the branches'."""
    from mammo_core.training import schedule

    return schedule.Schedule.from_params({**params.train.model_dump(), "device": params.run.device})


def _unit_settings(p: BaselinesParams, network: str, sched: schedule.Schedule) -> dict[str, Any]:
    """What changes one network's training (the unit key); the VGG head only matters to VGG."""
    settings = {"schedule": sched.fingerprint(), "epochs": sched.epochs, "weights": p.weights,
                "keep_weights": p.keep_weights, "freeze": p.freeze}
    if network == "vgg16":
        settings["vgg_classifier"] = p.vgg_classifier
    return settings


def _with_ci(y: np.ndarray, pred: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Test accuracy and its 95% interval from resampling patients (NaN where there is nothing to resample)."""
    nan = float("nan")
    if len(y) == 0:
        return {"test_acc": nan, "ci_low": nan, "ci_high": nan}
    low, high = metrics.bootstrap_ci(metrics.ACCURACY, y, pred, None, groups, n_boot=n_boot, seed=seed) \
        if n_boot > 0 else (nan, nan)
    return {"test_acc": metrics.ACCURACY(y, pred), "ci_low": low, "ci_high": high}


@dataclass
class _TestColumns:
    """Per test patch: true labels, patient ids (bootstrap groups; never logged) and patch ids; val labels."""

    y_val: np.ndarray
    y_test: np.ndarray
    groups: np.ndarray
    patch_ids: np.ndarray


def _run(ctx: runtime.StageContext) -> None:
    p = ctx.params.baselines
    data, cols = _load_data(ctx)
    sched = baseline_schedule(ctx.params)
    device = sched.resolve_device()
    ctx.set_tags({"baselines.device": str(device)})
    ctx.logger.info("baselines: %d training rows, %d val, %d test, networks %s, device %s",
                    len(data.train), len(data.val), len(data.test), p.networks, device)
    outcomes = _train_networks(ctx, data, sched)
    rows, metric_values = _network_rows(p, outcomes, data, cols, device)
    _write_predictions(ctx.workdir / PREDICTIONS, outcomes, cols.patch_ids, cols.groups, cols.y_test,
                       data.class_names)
    classic = _classic_rows(ctx, outcomes, data, cols)
    metric_values |= {f"baselines/{row['method']}/test_acc": row["test_acc"] for row in classic}
    fusion_rows = _freeze3_fusions(ctx, outcomes, data, data.class_names)
    metric_values |= {f"baselines/freeze3_fusion/{_slug(row['name'])}/test_acc": row["accuracy"]
                      for row in fusion_rows}
    ctx.log_metrics(metric_values)
    _write_outputs(ctx, outcomes, rows, classic, data, cols, sched)


def _load_data(ctx: runtime.StageContext) -> tuple[units.BaselineData, _TestColumns]:
    """The branches' training rows (augment) and the patches' val/test splits, with the test id columns."""
    from mammo_core.baselines import units
    from mammo_core.storage import h5io
    from mammo_core.training import loop as training

    patches_file = ctx.upstream["patches"].file(PATCHES_FILE)
    data = units.BaselineData(
        train=training.load_tensor_data(ctx.upstream["augment"].file(AUGMENTED_FILE)),
        val=training.load_tensor_data(patches_file, split=SPLIT_CODES["val"]),
        test=training.load_tensor_data(patches_file, split=SPLIT_CODES["test"]),
        class_names=list(h5io.read_attrs(patches_file)["class_names"]),
        patches_train=training.load_tensor_data(patches_file, split=SPLIT_CODES["train"]),
    )
    # Patient ids group the bootstrap by patient; they are never logged (and written only to the per-patch
    # predictions kept in the store, as classify's predictions.csv, for paired comparisons).
    columns = h5io.read_datasets(patches_file, ["split", "patient_id", "source_id"])
    is_test = columns["split"] == SPLIT_CODES["test"]
    return data, _TestColumns(y_val=data.val.labels.numpy(), y_test=data.test.labels.numpy(),
                              groups=np.asarray(columns["patient_id"])[is_test],
                              patch_ids=np.asarray(columns["source_id"])[is_test])


def _train_networks(ctx: runtime.StageContext, data: units.BaselineData, sched: schedule.Schedule
                    ) -> dict[str, units.NetworkOutcome]:
    """Each single network trained (or its unit reused from the store) under the branches' schedule."""
    from mammo_core.baselines import units

    p = ctx.params.baselines
    upstream = {s: ctx.upstream[s].key for s in ("augment", "patches")}
    outcomes: dict[str, units.NetworkOutcome] = {}
    for network in p.networks:
        settings = _unit_settings(p, network, sched)
        key = units.unit_key(network, settings, upstream)

        def produce(network: str = network, key: str = key):
            return units.train_network(
                network, data, sched, weights=p.weights, vgg_classifier=p.vgg_classifier, freeze=p.freeze,
                keep_weights=p.keep_weights, checkpoint_dir=ctx.scratch / f"{network}-{key}",
                on_epoch=lambda r, n=network: ctx.logger.info("baselines: %s epoch %d val_acc %.3f (%.1f s)",
                                                              n, r.epoch, r.val_acc, r.seconds),
            )

        outcome = units.obtain_unit(ctx.store_root, network, key, produce, params=settings, upstream=upstream)
        outcomes[network] = outcome
        ctx.logger.info("baselines: %s %s (unit %s)", network, "reused" if outcome.reused else "trained", key)
        for record in outcome.history:
            ctx.log_metrics({f"baselines/{network}/val_acc": record.val_acc,
                             f"baselines/{network}/train_loss": record.train_loss}, step=record.epoch)
        ctx.log_metric(f"baselines/{network}/reused", float(outcome.reused))
    return outcomes


def _network_rows(p: BaselinesParams, outcomes: dict[str, units.NetworkOutcome], data: units.BaselineData,
                  cols: _TestColumns, device: Any) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Table 6's single-network rows (accuracy with CI, balanced accuracy, macro AUC, latency, counts)."""
    from mammo_core.baselines import latency, networks
    from mammo_core.models import fused as model

    class_names, y_test = data.class_names, cols.y_test
    # Latency side by side in this process: fresh builds (cost depends on the architecture, not the weights).
    built = {n: networks.build_baseline(n, len(class_names), data.patch_size, vgg_classifier=p.vgg_classifier,
                                        seed=p.seed) for n in p.networks}
    built[FUSED] = model.FusedDenseNet(len(class_names), dict(model.DEFAULT_FREEZE_UPTO), seed=p.seed)
    ms = latency.latency_ms(built, data.patch_size, repeats=p.latency_repeats, device=device, seed=p.seed)
    del built

    rows, metric_values = [], {f"baselines/{FUSED}/latency_ms": ms[FUSED]}
    for network, outcome in outcomes.items():
        pred = outcome.test_probabilities.argmax(axis=1) if len(y_test) else np.zeros(0, np.int64)
        row = {"network": network, **_with_ci(y_test, pred, cols.groups, p.n_boot, p.seed),
               "balanced_acc": metrics.BALANCED_ACCURACY(y_test, pred) if len(y_test) else float("nan"),
               "macro_auc": _macro_auc(y_test, pred, outcome.test_probabilities, class_names),
               "latency_ms": ms[network], "params_m": outcome.params_m, "weights": outcome.weights,
               "input_size": outcome.input_size, "epochs": outcome.epochs, "train_rows": len(data.train),
               "frozen_layers": outcome.frozen_layers, "frozen_params": outcome.frozen_params,
               "trainable_params": outcome.trainable_params}
        rows.append(row)
        metric_values[f"baselines/{network}/test_acc"] = row["test_acc"]
        metric_values[f"baselines/{network}/latency_ms"] = row["latency_ms"]
        metric_values[f"baselines/{network}/best_epoch"] = outcome.best_epoch
    return rows, metric_values


def _classic_rows(ctx: runtime.StageContext, outcomes: dict[str, units.NetworkOutcome],
                  data: units.BaselineData, cols: _TestColumns) -> list[dict[str, Any]]:
    """Table 1's classic methods: SIFT bag of visual words + SVM, and AGNet's fusion of two networks."""
    from mammo_core.baselines import agnet, sift_bovw

    p = ctx.params.baselines
    classic = []
    if "sift_bovw_svm" in p.classic:
        settings = sift_bovw.BovwSettings(image_size=p.sift_image_size, max_keypoints=p.sift_max_keypoints,
                                          vocabulary_size=p.sift_vocabulary, svm_c=p.sift_svm_c, seed=p.seed)
        bovw = sift_bovw.sift_bovw_svm(data.train.images.numpy(), data.train.labels.numpy(),
                                       data.test.images.numpy(), settings)
        totals = {"train": len(data.train), "test": len(data.test)}
        classic.append({"method": "sift_bovw_svm",
                        **_with_ci(cols.y_test, bovw.predictions, cols.groups, p.n_boot, p.seed),
                        "detail": bovw.detail(totals)})
        ctx.log_metrics({"baselines/sift_bovw_svm/empty_train": bovw.empty["train"],
                         "baselines/sift_bovw_svm/empty_test": bovw.empty["test"]})
    if "agnet" in p.classic:
        a, b = p.agnet_pair
        fused = agnet.agnet_fusion(outcomes[a].features, outcomes[b].features, data.train.labels.numpy(),
                                   cols.y_val, (a, b), seed=p.seed)
        classic.append({"method": "agnet",
                        **_with_ci(cols.y_test, fused.test_predictions, cols.groups, p.n_boot, p.seed),
                        "detail": fused.detail()})
    return classic


def _write_outputs(ctx: runtime.StageContext, outcomes: dict[str, units.NetworkOutcome], rows: list[dict[str, Any]],
                   classic: list[dict[str, Any]], data: units.BaselineData, cols: _TestColumns,
                   sched: schedule.Schedule) -> None:
    """baselines.json, Tables 6 and 1, validation curves and Figure 10; logged as artifacts."""
    from mammo_core.evaluation import figures

    class_names = data.class_names
    counts = np.bincount(cols.y_test, minlength=len(class_names))
    majority = float(counts.max() / counts.sum()) if counts.sum() else float("nan")
    protocol = {"schedule_from": "train", "epochs": sched.epochs, "schedule": sched.fingerprint(),
                "train_rows": len(data.train)}
    write_json_atomic(ctx.workdir / RESULTS, {"classes": class_names, "majority_rate": majority, "rows": rows,
                                              "classic": classic, "protocol": protocol})
    pd.DataFrame(rows).to_csv(ctx.workdir / TABLE6, index=False)
    pd.DataFrame(classic, columns=["method", "test_acc", "ci_low", "ci_high", "detail"]).to_csv(
        ctx.workdir / TABLE1, index=False)
    curves = {n: [{"epoch": r.epoch, "val_acc": r.val_acc, "train_loss": r.train_loss} for r in o.history]
              for n, o in outcomes.items()}
    write_json_atomic(ctx.workdir / CURVES, curves)
    fig = figures.curves_figure({n: [r["val_acc"] for r in c] for n, c in curves.items()},
                                "Figure 10: validation accuracy per backbone", ctx.workdir / FIGURE10)
    ctx.log_artifact(fig, "figures")
    for name in (RESULTS, TABLE6, TABLE1, CURVES, FREEZE3_FUSION):
        ctx.log_artifact(ctx.workdir / name, "tables")


def _as_text(values: np.ndarray) -> np.ndarray:
    """HDF5 id columns (bytes or str) as str, as the predictions files spell them."""
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values])


def _write_predictions(path: Path, outcomes: dict[str, units.NetworkOutcome], patch_ids: np.ndarray, groups: np.ndarray,
                       y_test: np.ndarray, class_names: list[str]) -> None:
    """One row per (network, test patch), columns as ``freeze3_fusion_predictions.csv``: the report draws the
    single networks' balanced-accuracy and macro-AUC intervals from it. Kept in the store only (never logged
    to MLflow): it names the dataset's patient ids."""
    parts = []
    for network, outcome in outcomes.items():
        proba = outcome.test_probabilities
        parts.append(pd.DataFrame({"name": network, "patch_id": _as_text(patch_ids), "patient_id": _as_text(groups),
                                   "y_true": y_test, "y_pred": proba.argmax(axis=1) if len(y_test) else y_test,
                                   **{f"proba_{c}": proba[:, i] for i, c in enumerate(class_names)}}))
    # In the stage's work folder, sealed with the rest of the stage's outputs.
    (pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()).to_csv(path, index=False)


def _slug(name: str) -> str:
    """An MLflow-safe metric name part ("Freeze3+VGG16" -> "freeze3_vgg16")."""
    return name.lower().replace("+", "_")


def _macro_auc(y: np.ndarray, pred: np.ndarray, proba: np.ndarray, class_names: list[str]) -> float:
    if len(y) == 0:
        return float("nan")
    return float(metrics.classification_report_dict(y, pred, proba, class_names).get("auc_ovr_macro", np.nan))


def _freeze3_fusions(ctx: runtime.StageContext, outcomes: dict[str, units.NetworkOutcome],
                     data: units.BaselineData, class_names: list[str]) -> list[dict[str, Any]]:
    """Section 4.7: Freeze3 + VGG16 / InceptionV3 / ResNet50 beside Freeze3 alone and the three-branch
    fusion, one head for all (:mod:`mammo_core.baselines.freeze3_fusion`); writes the JSON and the
    per-patch predictions; returns the JSON rows."""
    from mammo_core.baselines import agnet, freeze3_fusion
    from mammo_core.codes import features

    p = ctx.params.baselines
    path = ctx.upstream["features"].file(FEATURES_FILE)
    split = {s: features.read_branch_features(path, code) for s, code in SPLIT_CODES.items()}
    for s, rows in (("train", data.patches_train), ("val", data.val), ("test", data.test)):
        if rows is None or not np.array_equal(split[s]["labels"], rows.labels.numpy()):
            raise ValueError(f"{path}: the {s} rows' labels differ from the patches' {s} split; "
                             f"features and patches come from different runs")

    def block(name: str) -> agnet.FeatureSplits:
        return agnet.FeatureSplits(*(split[s][name].astype(np.float32) for s in ("train", "val", "test")))

    y_train, y_val, y_test = (split[s]["labels"] for s in ("train", "val", "test"))
    k = len(class_names)
    results = [freeze3_fusion.probe_fused(THREE_BRANCH, block("fused"), y_train, y_val, k, p.seed),
               freeze3_fusion.probe_fused(FREEZE3_ALONE, block("freeze3"), y_train, y_val, k, p.seed)]
    for network, name in PAIR_NAMES.items():
        if network in outcomes:
            o = outcomes[network]
            other = agnet.FeatureSplits(o.patches_train_features, o.features.val, o.features.test)
            results.append(freeze3_fusion.fuse_with_freeze3(name, block("freeze3"), other, y_train, y_val, k,
                                                            seed=p.seed))
    groups, patch_ids = _as_text(split["test"]["patient_id"]), _as_text(split["test"]["source_id"])
    rows, parts = [], []
    for r in results:
        if len(y_test):
            rep = metrics.report_with_ci(y_test, r.test_predictions, r.test_scores, class_names, groups,
                                         n_boot=p.n_boot, seed=p.seed)
            acc, ci = float(rep["accuracy"]), [float(v) for v in rep["ci"]["accuracy"]]
            bal, auc = float(rep["balanced_accuracy"]), float(rep.get("auc_ovr_macro", np.nan))
        else:
            acc, ci, bal, auc = float("nan"), [float("nan")] * 2, float("nan"), float("nan")
        rows.append({"name": r.name, "accuracy": acc, "accuracy_ci": ci, "balanced_accuracy": bal, "macro_auc": auc,
                     "n_test": int(len(y_test)), "val_accuracy": r.val_acc, "weight_freeze3": r.weight})
        parts.append(pd.DataFrame({"name": r.name, "patch_id": patch_ids, "patient_id": groups, "y_true": y_test,
                                   "y_pred": r.test_predictions,
                                   **{f"proba_{c}": r.test_scores[:, i] for i, c in enumerate(class_names)}}))
    head = "standardised features + ridge classifier (mammo_core.codes.fusion.linear_probe), fitted on the patches' " \
           "train split; Freeze3's weight in each pair chosen on validation; pairs summed in one rotated common space"
    write_json_atomic(ctx.workdir / FREEZE3_FUSION, rows)
    # Kept in the store only (never logged to MLflow): it names the dataset's patient ids.
    pd.concat(parts, ignore_index=True).to_csv(ctx.workdir / FREEZE3_PREDICTIONS, index=False)
    ctx.logger.info("baselines: section 4.7 fusions (%s): %s", head,
                    {r["name"]: round(r["accuracy"], 3) for r in rows})
    return rows


def key_inputs(params: Params) -> dict[str, Any]:
    """The ImageNet files the networks start from as found on disk (a missing one means random init)."""
    p = params.baselines
    if p.weights != "imagenet":
        return {}
    return {"weights": {n: weight_sources.resolved_source(weight_sources.hub_file(n)) for n in p.networks}}


SPEC = runtime.StageSpec(
    name="baselines",
    upstream=("augment", "patches", "features"),
    sections=("baselines", "train"),
    run=_run,
    key_inputs=key_inputs,
)
