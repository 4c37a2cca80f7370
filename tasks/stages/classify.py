"""classify: SVM, kNN and RF on the hash codes, fused by weighted soft voting, against learned combiners.

Also measures the paper's Tables 2 and 3 from the Freeze1..3 branch predictions of the train stage.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from mammo_core.codes import retrieval
from mammo_core.config import Params
from mammo_core.evaluation import metrics
from mammo_core.storage import stage_files
from mammo_core.storage.store import write_json_atomic
from tasks import runtime
from tasks.stages.hashing import SINGLE
from tasks.stages.train import PREDICTIONS

FILES = stage_files.CLASSIFY  # this stage's output files

CODES_FILE = stage_files.HASHING.codes
MODEL_FILE = FILES.model
PREDICTIONS_FILE = FILES.predictions  # per patch, val and test: what `mammo promote` / `mammo compare` pair on
LATENCY_FILE = FILES.latency  # Table 6: the trained chain and the single networks timed in one process
OURS = "ours (fused DenseNets + hash decoder + SVM/kNN/RF fusion, trained)"
SINGLE_TABLE = f"table5_single_{SINGLE}.csv"  # Table 5 on a single DenseNet (the paper's setting)
ROWS = ("knn", "svm", "rf", "fusion", "voting", "stacking")


def read_codes(path, decoder: str, bits: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unpacked 0/1 codes, labels, patient ids) of one split from ``codes.h5``."""
    from mammo_core.storage import h5io

    with h5io.open_for_reading(path) as fh:
        key = f"{decoder}/{bits}/{split}"
        if key not in fh:
            raise KeyError(f"{path}: no codes {key!r}; hashing produced {sorted(fh[decoder]) if decoder in fh else []}")
        packed = fh[key][:]
        labels = fh[f"labels/{split}"][:]
        patients = np.array([p.decode() for p in fh[f"patient_id/{split}"][:]])
    return retrieval.unpack_codes(packed, bits), labels, patients


def read_source_ids(path, split: str) -> np.ndarray:
    """The patch ids (``source_id``) of one split of ``codes.h5``, in the codes' row order."""
    from mammo_core.storage import h5io

    with h5io.open_for_reading(path) as fh:
        return np.array([s.decode() for s in fh[f"source_id/{split}"][:]])


def _run(ctx: runtime.StageContext) -> None:
    from mammo_core.codes import classifiers, model_io
    from mammo_core.codes.classifier_tables import class_probabilities, prediction_rows, result_row
    from mammo_core.evaluation import figures
    from mammo_core.storage import h5io
    from tasks.serving import classifier as serving

    p = ctx.params.classify
    codes_path = ctx.upstream["hashing"].file(CODES_FILE)
    with h5io.open_for_reading(codes_path) as fh:
        class_names = json.loads(fh.attrs["class_names"])
    data = {s: read_codes(codes_path, p.decoder, p.bits, s) for s in ("train", "val", "test")}
    (x_tr, y_tr, _), (x_val, y_val, _), (x_te, y_te, groups_te) = data["train"], data["val"], data["test"]
    hyper = {"seed": p.seed, "svm": p.svm, "knn": p.knn, "rf": p.rf, **({"grid": p.grid} if p.grid else {})}
    fitted = classifiers.fit_classifiers(hyper, x_tr, y_tr, x_val, y_val, search=p.search)
    classes = list(range(len(class_names)))
    members = fitted.estimators
    if p.fusion_weights == "search":
        chosen = classifiers.choose_fusion_weights({n: class_probabilities(e, x_val, classes)
                                                    for n, e in members.items()}, y_val,
                                                   grid_step=p.grid_step, classes=classes)
        weights = chosen.weights
        pd.DataFrame(chosen.grid).to_csv(ctx.workdir / "fusion_weight_grid.csv", index=False)
    else:
        weights = {n: float(p.fusion_weights.get(n, 0.0)) for n in classifiers.CLASSIFIER_NAMES}
    fused = classifiers.FusedClassifier.from_fitted(members, weights, classes)
    combiners, skipped = {}, {}
    for name, est in classifiers.make_learned_combiners(members, seed=p.seed).items():
        try:  # a learned combiner needs cross-validation folds; tiny splits may not have them
            combiners[name] = classifiers.limit_cv_to_labels(est, y_tr).fit(x_tr, y_tr)
        except ValueError as exc:
            skipped[name] = str(exc)
            ctx.logger.warning("classify: %s not fitted: %s", name, exc)
    models = {**members, "fusion": fused, **combiners}

    table, metric_values, prediction_parts = [], {}, []
    sources = {split: read_source_ids(codes_path, split) for split in ("val", "test")}
    for name in ROWS:
        if name not in models:
            table.append({"classifier": name, "note": f"not fitted: {skipped[name]}"})
            continue
        est = models[name]
        for split, (x, y, groups) in (("val", data["val"]), ("test", data["test"])):
            prediction_parts.append(prediction_rows(split, name, sources[split], groups, y,
                                                    class_probabilities(est, x, classes), class_names))
        val_pred = prediction_parts[-2]["predicted"].to_numpy()
        if len(y_val):
            # Validation chose the fusion weights (and any grid search), so this is optimistic alike for every
            # run; it is what automatic decisions (mammo promote) use, because test must never choose.
            metric_values[f"classify/{name}/val_acc"] = metrics.ACCURACY(y_val, val_pred)
        proba = class_probabilities(est, x_te, classes)
        pred = np.asarray(classes)[proba.argmax(axis=1)]
        rep = metrics.report_with_ci(y_te, pred, proba, class_names, groups_te, n_boot=p.n_boot, seed=p.seed)
        row = result_row(name, rep, recall_of=class_names)
        table.append(row)
        for key in ("test_acc", "macro_f1", "balanced_acc", "auc_ovr_macro", "test_acc_ci_low", "test_acc_ci_high"):
            if np.isfinite(row[key]):
                metric_values[f"classify/{name}/{key}"] = row[key]
        if name == "fusion":
            fig = figures.confusion_matrix_figure(rep["confusion"], class_names, "Fusion (SVM+kNN+RF): test",
                                                  ctx.workdir / "confusion_fusion.png")
            ctx.log_artifact(fig, "figures")
    pd.DataFrame(table).to_csv(ctx.workdir / FILES.classifiers_table, index=False)
    single_parts = _single_branch(ctx, codes_path, class_names, sources, metric_values)
    # Kept in the store only (never logged to MLflow): it names the dataset's patient ids.
    pd.concat(prediction_parts + single_parts, ignore_index=True).to_csv(ctx.workdir / PREDICTIONS_FILE,
                                                                         index=False)
    for n, w in weights.items():
        metric_values[f"classify/weight/{n}"] = w
    ctx.log_metrics(metric_values)

    # Tables 2 and 3: diversity of the Freeze1..3 branches on the test patches (train stage predictions).
    with h5io.open_for_reading(ctx.upstream["train"].file(PREDICTIONS)) as fh:
        y_branch = fh["test/labels"][:]
        probas = {b: fh[f"test/{b}/probabilities"][:] for b in ("freeze1", "freeze2", "freeze3")}
    metrics.branch_pair_accuracy_table(probas, y_branch, class_names).to_csv(ctx.workdir / FILES.pairs_table)
    metrics.branch_error_table(probas, y_branch, class_names).to_csv(ctx.workdir / FILES.errors_table)

    sha = model_io.save_model(fused, ctx.workdir / MODEL_FILE)
    write_json_atomic(ctx.workdir / FILES.summary, {
        "codes": p.codes, "weights": weights, "class_names": class_names, "sha256": sha,
        "searches": {n: s.best_params for n, s in fitted.searches.items()}, "not_fitted": skipped,
    })
    for name in (FILES.classifiers_table, FILES.pairs_table, FILES.errors_table, FILES.summary):
        ctx.log_artifact(ctx.workdir / name, "tables")
    serving.log_and_register(ctx)
    _measure_latency(ctx, len(class_names))


def _single_branch(ctx: runtime.StageContext, codes_path, class_names: list[str], sources: dict[str, np.ndarray],
                   metric_values: dict[str, float]) -> list[pd.DataFrame]:
    """Table 5 on a single DenseNet, as the paper runs it: SVM, kNN, RF and their fusion on Freeze3's codes.

    Same classifiers, hyper-parameters and weight choice as on the fused codes; rows in
    ``table5_single_freeze3.csv``, predictions in ``predictions.csv`` as ``freeze3/<classifier>``.
    Returns those prediction rows (none when the hashing stage wrote no single-branch codes).
    """
    from mammo_core.codes import classifiers
    from mammo_core.codes.classifier_tables import class_probabilities, prediction_rows, result_row
    from mammo_core.storage import h5io

    p = ctx.params.classify
    decoder = f"{SINGLE}/{p.decoder}"
    with h5io.open_for_reading(codes_path) as fh:
        if f"{decoder}/{p.bits}/train" not in fh:
            ctx.logger.warning("classify: %s has no %s codes; no single-%s rows", codes_path, decoder, SINGLE)
            return []
    data = {s: read_codes(codes_path, decoder, p.bits, s) for s in ("train", "val", "test")}
    (x_tr, y_tr, _), (x_val, y_val, _) = data["train"], data["val"]
    hyper = {"seed": p.seed, "svm": p.svm, "knn": p.knn, "rf": p.rf, **({"grid": p.grid} if p.grid else {})}
    members = classifiers.fit_classifiers(hyper, x_tr, y_tr, x_val, y_val, search=p.search).estimators
    classes = list(range(len(class_names)))
    if p.fusion_weights == "search":
        weights = classifiers.choose_fusion_weights({n: class_probabilities(e, x_val, classes)
                                                     for n, e in members.items()}, y_val,
                                                    grid_step=p.grid_step, classes=classes).weights
    else:
        weights = {n: float(p.fusion_weights.get(n, 0.0)) for n in classifiers.CLASSIFIER_NAMES}
    models = {**members, "fusion": classifiers.FusedClassifier.from_fitted(members, weights, classes)}
    rows, parts = [], []
    for name, est in models.items():
        for split in ("val", "test"):
            x, y, groups = data[split]
            parts.append(prediction_rows(split, f"{SINGLE}/{name}", sources[split], groups, y,
                                         class_probabilities(est, x, classes), class_names))
        x, y, groups = data["test"]
        proba = class_probabilities(est, x, classes)
        rep = metrics.report_with_ci(y, np.asarray(classes)[proba.argmax(axis=1)], proba, class_names, groups,
                                     n_boot=p.n_boot, seed=p.seed)
        rows.append(result_row(name, rep, features=f"single {SINGLE}"))
        metric_values[f"classify/{SINGLE}/{name}/test_acc"] = rep["accuracy"]
    pd.DataFrame(rows).to_csv(ctx.workdir / SINGLE_TABLE, index=False)
    ctx.log_artifact(ctx.workdir / SINGLE_TABLE, "tables")
    return parts


def _measure_latency(ctx: runtime.StageContext, num_classes: int) -> None:
    """Table 6's time column: the trained chain that produced the fusion row, beside the single networks.

    The chain is loaded from the sealed artifacts exactly as it is served (``ClassifierPipeline``:
    train weights, fusion weights, hash decoder, fused SVM/kNN/RF) and fed uint8 patches; the single networks
    (``baselines.networks``, fresh builds: only the architecture decides their cost) get patch-sized
    tensors. Every (model, batch size) runs interleaved in this one process, on the CPU the served chain
    uses, so the rows compare like with like.
    """
    from mammo_core.baselines import latency, networks
    from mammo_core.inference.served_classifier import ClassifierPipeline
    from tasks.serving import classifier as serving

    p = ctx.params.classify
    files, sha256 = serving.gather_artifacts(ctx.store_root, ctx.workdir, ctx.upstream["train"].key,
                                             ctx.upstream["hashing"].key)
    chain = ClassifierPipeline.load(files, sha256)
    size = chain.patch_size
    rng = np.random.default_rng(p.seed)
    calls: dict[tuple[str, int], latency.Call] = {}
    for batch in p.latency_batch_sizes:
        images = rng.integers(0, 256, size=(batch, size, size), dtype=np.uint8)
        calls[(OURS, batch)] = lambda images=images: chain.predict_proba(images)
    for name in ctx.params.baselines.networks:
        net = networks.build_baseline(name, num_classes, size, vgg_classifier=ctx.params.baselines.vgg_classifier,
                                      seed=p.seed)
        for batch in p.latency_batch_sizes:
            calls[(name, batch)] = latency.module_call(net, batch, size, seed=p.seed)
    rows = latency.batch_latency_rows(calls, repeats=p.latency_repeats)
    write_json_atomic(ctx.workdir / LATENCY_FILE, {
        "device": "cpu", "repeats": p.latency_repeats, "batch_sizes": list(p.latency_batch_sizes),
        "patch_size": size, "ours": OURS, "rows": rows,
        "note": "median over repeats of one call per (model, batch size), all interleaved in one process; the "
                "single networks are untrained builds of the same architectures (their cost does not depend "
                "on the weight values)"})
    ctx.log_metrics({f"classify/latency/{'ours' if r['model'] == OURS else r['model']}/ms_per_image_bs"
                     f"{r['batch_size']}": r["ms_per_image"] for r in rows})
    ctx.log_artifact(ctx.workdir / LATENCY_FILE, "tables")


def key_inputs(params: Params) -> dict[str, Any]:
    """The single networks timed beside the chain (their architectures decide latency.json)."""
    return {"latency_networks": list(params.baselines.networks),
            "latency_vgg_classifier": params.baselines.vgg_classifier}


SPEC = runtime.StageSpec(
    name="classify",
    upstream=("hashing", "train"),
    sections=("classify",),
    run=_run,
    key_inputs=key_inputs,
)
