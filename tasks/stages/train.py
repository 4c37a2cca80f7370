"""train: Freeze1..3 transfer learning on a shared frozen trunk (mammo_core.models.fused, mammo_core.training.loop).

Checkpoints go to the stage's scratch folder (stable per key), so a rerun after a kill continues from the
last finished epoch; the sealed folder holds the best weights, per-epoch history, per-branch test
predictions, confusion matrices and the validation-curve figure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from mammo_core.config import Params
from mammo_core.sources import weight_sources
from mammo_core.storage import stage_files
from mammo_core.storage.store import write_json_atomic
from tasks import runtime
from tasks.stages.augment import FILE as AUGMENTED_FILE
from tasks.stages.patches import FILE as PATCHES_FILE

if TYPE_CHECKING:
    import torch

    from mammo_core.models.fused import FusedDenseNet
    from mammo_core.training import loop as training
    from mammo_core.training import schedule

FILES = stage_files.TRAIN  # this stage's output files

WEIGHTS = FILES.weights
MODEL_CONFIG = FILES.model_config
PREDICTIONS = FILES.predictions
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def load_trained(stage_path: str | Path) -> tuple[FusedDenseNet, dict]:
    """The fused model of a finished train stage (weights read with weights_only=True)."""
    import torch

    from mammo_core.models import fused as model

    folder = Path(stage_path)
    config = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
    fused = model.FusedDenseNet(config["num_classes"], config["freeze_upto"])
    state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    fused.load_state_dict(state)
    fused.eval()
    return fused, config


def _run(ctx: runtime.StageContext) -> None:
    from mammo_core.evaluation import figures
    from mammo_core.models import fused as model
    from mammo_core.storage import h5io
    from mammo_core.training import loop as training
    from mammo_core.training import schedule

    p = ctx.params.train
    patches_file = ctx.upstream["patches"].file(PATCHES_FILE)
    class_names = list(h5io.read_attrs(patches_file)["class_names"])
    train = training.load_tensor_data(ctx.upstream["augment"].file(AUGMENTED_FILE))
    val = training.load_tensor_data(patches_file, split=SPLIT_CODES["val"])
    test = training.load_tensor_data(patches_file, split=SPLIT_CODES["test"])
    sched = schedule.Schedule.from_params({**p.model_dump(), "device": ctx.params.run.device})
    freeze_upto = dict(p.freeze_upto or model.DEFAULT_FREEZE_UPTO)
    backbone = model.load_backbone_weights(p.weights)
    ctx.set_tags({"train.weights": p.weights if backbone is not None else "none (random initialisation)",
                  "train.device": str(sched.resolve_device())})
    ctx.logger.info("train: %d training rows, %d val, %d test, %d classes, device %s",
                    len(train), len(val), len(test), len(class_names), sched.resolve_device())
    fused, results, history = _train_branches(ctx, train, val, sched, class_names, freeze_upto, backbone)
    counts = _save_model(ctx, fused, history, class_names, freeze_upto, int(train.images.shape[-1]))
    evaluations = {name: training.evaluate(fused, data, batch_size=sched.batch_size)
                   for name, data in (("val", val), ("test", test))}
    _write_predictions(ctx.workdir / PREDICTIONS, evaluations, {"val": val, "test": test}, class_names)
    _log_test_results(ctx, evaluations["test"], results, counts, test, class_names)
    curves = {b: [r.val_acc[b] for r in h] for b, h in history.items()}
    fig = figures.curves_figure(curves, "Validation accuracy per branch", ctx.workdir / "val_curves.png")
    ctx.log_artifact(fig, "figures")


def _train_branches(ctx: runtime.StageContext, train, val, sched: schedule.Schedule, class_names: list[str],
                    freeze_upto: dict[str, str], backbone) -> tuple[torch.nn.Module, dict, dict]:
    """Freeze1-3 trained on one shared trunk (``shared``) or as three networks (``separate``): the fused
    model, each branch's training result and its epoch history."""
    from mammo_core.models import fused as model
    from mammo_core.training import loop as training

    p = ctx.params.train

    def on_epoch(report: training.EpochReport, branch: str | None = None) -> None:
        for b in report.train_loss if branch is None else [branch]:
            key = b if branch is None else branch
            ctx.log_metrics({f"train/{key}/train_loss": report.train_loss[key],
                             f"train/{key}/val_acc": report.val_acc[key],
                             f"train/{key}/lr": report.lr[key]}, step=report.epoch)
        ctx.logger.info("train: epoch %d val_acc %s (%.1f s)", report.epoch,
                        {k: round(v, 3) for k, v in report.val_acc.items()}, report.seconds)

    if p.mode == "shared":
        fused = model.FusedDenseNet(len(class_names), freeze_upto, backbone, seed=p.seed)
        result = training.train_branches(
            fused, train, val, sched, mode="cached" if p.cache_trunk else "shared",
            checkpoint_dir=ctx.scratch, class_names=class_names, on_epoch=on_epoch,
        )
        ctx.log_metric("train/resumed_from_epoch", result.resumed_from_epoch)
        return result.model, {b: result for b in freeze_upto}, {b: result.history for b in freeze_upto}
    singles = {b: model.build_single(point, len(class_names), backbone, seed=p.seed, name=b)
               for b, point in freeze_upto.items()}
    results = training.train_separate(
        singles, train, val, sched, checkpoint_dir=ctx.scratch, class_names=class_names,
        on_epoch=lambda b, r: on_epoch(r, b), cache_frozen=p.cache_trunk,
    )
    fused = model.fused_from_singles({b: r.model for b, r in results.items()})
    ctx.log_metric("train/resumed_from_epoch", min(r.resumed_from_epoch for r in results.values()))
    return fused, results, {b: r.history for b, r in results.items()}


def _save_model(ctx: runtime.StageContext, fused: torch.nn.Module, history: dict, class_names: list[str],
                freeze_upto: dict[str, str], patch_size: int) -> dict[str, dict[str, int]]:
    """Weights, model config (with frozen/trainable counts) and histories; returns the parameter counts."""
    from mammo_core.models import fused as model
    from mammo_core.training import checkpoint

    checkpoint.save_atomic(fused.state_dict(), ctx.workdir / WEIGHTS)
    counts = model.parameter_counts(fused)
    write_json_atomic(ctx.workdir / MODEL_CONFIG, {
        "num_classes": len(class_names), "class_names": class_names, "freeze_upto": freeze_upto,
        "patch_size": patch_size, "weights": ctx.params.train.weights, "parameter_counts": counts,
        "feature_dim": model.FEATURE_DIM,
    })
    write_json_atomic(ctx.workdir / FILES.history,
                      {b: [r.to_dict() for r in h] for b, h in history.items()})
    return counts


def _write_predictions(path: Path, evaluations: dict, data: dict, class_names: list[str]) -> None:
    """Per split and branch: probabilities and predictions beside the labels (what features/classify reuse)."""
    import h5py

    with h5py.File(path, "w") as fh:
        for split, per_branch in evaluations.items():
            fh.create_dataset(f"{split}/labels", data=data[split].labels.numpy())
            for b, ev in per_branch.items():
                fh.create_dataset(f"{split}/{b}/probabilities", data=ev.probabilities)
                fh.create_dataset(f"{split}/{b}/predictions", data=ev.predictions)
        fh.attrs["class_names"] = json.dumps(class_names)


def _log_test_results(ctx: runtime.StageContext, per_branch: dict, results: dict, counts: dict, test,
                      class_names: list[str]) -> None:
    """Each branch's test accuracy, balanced accuracy, best epoch and counts; confusion tables and figures."""
    import numpy as np

    from mammo_core.evaluation import figures

    metrics: dict[str, float] = {}
    for b, ev in per_branch.items():
        metrics[f"train/{b}/test_acc"] = ev.accuracy
        recalls = np.diag(ev.confusion) / np.maximum(ev.confusion.sum(axis=1), 1)
        present = ev.confusion.sum(axis=1) > 0
        metrics[f"train/{b}/test_balanced_acc"] = float(recalls[present].mean()) if present.any() else float("nan")
        metrics[f"train/{b}/best_epoch"] = results[b].best_epoch[b]
        metrics[f"train/{b}/best_val_acc"] = results[b].best_val_acc[b]
        metrics[f"train/{b}/params_frozen"] = counts[b]["frozen"]
        metrics[f"train/{b}/params_trainable"] = counts[b]["trainable"]
        np.savetxt(ctx.workdir / f"confusion_{b}.csv", ev.confusion, fmt="%d", delimiter=",",
                   header=",".join(class_names))
        fig = figures.confusion_matrix_figure(ev.confusion, class_names, f"{b}: test confusion",
                                              ctx.workdir / f"confusion_{b}.png")
        ctx.log_artifact(fig, "figures")
    test_counts = np.bincount(test.labels.numpy(), minlength=len(class_names))
    metrics["train/test_majority_acc"] = float(test_counts.max() / max(test_counts.sum(), 1))  # the bar to beat
    ctx.log_metrics(metrics)


def pretrain_branch(params: Params, upstream: Mapping[str, runtime.StageResult], scratch: Path, branch: str,
                    device: str, on_epoch: Callable[[str, training.EpochReport], None] | None = None) -> int:
    """Train one ``separate``-mode branch into the train stage's checkpoint folder; returns its best epoch.

    Why: this lets a cluster train the three branches at once, one per GPU. Each branch writes exactly the
    checkpoint that ``_run`` would write (same seed, same batch order), so when the train stage runs next it
    resumes every branch from its final epoch, trains nothing more, and seals the same weights a
    single-process run produces.
    """
    from mammo_core.models import fused as model
    from mammo_core.storage import h5io
    from mammo_core.training import loop as training
    from mammo_core.training import schedule

    p = params.train
    patches_file = upstream["patches"].file(PATCHES_FILE)
    class_names = list(h5io.read_attrs(patches_file)["class_names"])
    train = training.load_tensor_data(upstream["augment"].file(AUGMENTED_FILE))
    val = training.load_tensor_data(patches_file, split=SPLIT_CODES["val"])
    sched = schedule.Schedule.from_params({**p.model_dump(), "device": device})
    freeze_upto = dict(p.freeze_upto or model.DEFAULT_FREEZE_UPTO)
    if branch not in freeze_upto:
        raise ValueError(f"train: unknown branch {branch!r}; branches are {sorted(freeze_upto)}")
    single = model.build_single(freeze_upto[branch], len(class_names), model.load_backbone_weights(p.weights),
                                seed=p.seed, name=branch)
    result = training.train_separate({branch: single}, train, val, sched, checkpoint_dir=scratch,
                                     class_names=class_names, on_epoch=on_epoch, cache_frozen=p.cache_trunk)
    return int(result[branch].best_epoch[branch])


def branch_names(params: Params) -> list[str]:
    from mammo_core.models.fused import DEFAULT_FREEZE_UPTO

    return list(dict(params.train.freeze_upto or DEFAULT_FREEZE_UPTO))


@task(cache_policy=NO_CACHE, persist_result=False)
def branch_task(ctx: runtime.RunContext, key: str, upstream: dict[str, runtime.StageResult], branch: str) -> int:
    """One branch training as its own task; the GPU comes from the Dask worker that holds the resource.

    The ``gpu-<i>`` global concurrency limit (made by the flow) keeps a second task off the same GPU.
    """
    import torch

    from mammo_core.training import devices

    threads = os.environ.get("MAMMO_TORCH_THREADS")  # set by flows.runners for LocalCluster workers
    if threads:
        torch.set_num_threads(int(threads))
    gpu = devices.assigned_gpu(runtime.dask_worker_name())
    device = devices.device_for(ctx.params.run.device, gpu, torch.cuda.device_count())
    scratch = Path(ctx.store) / "scratch" / "train" / key
    guard = concurrency(f"gpu-{gpu}", occupy=1) if gpu is not None else nullcontext()
    logger = get_run_logger()

    def on_epoch(name: str, report: training.EpochReport) -> None:
        logger.info("train: branch %s epoch %d val_acc %.3f (%.1f s)", name, report.epoch, report.val_acc[name],
                    report.seconds)

    with guard:
        logger.info("train: branch %s on %s (GPU slot %s)", branch, device, gpu)
        return pretrain_branch(ctx.params, upstream, scratch, branch, device, on_epoch)


def key_inputs(params: Params) -> dict[str, Any]:
    """The DenseNet weights the branches start from: the file's sha256, or ``random``."""
    return {"weights": weight_sources.resolved_source(weight_sources.backbone_file(params.train.weights))}


SPEC = runtime.StageSpec(
    name="train",
    upstream=("patches", "augment"),
    sections=("train",),
    run=_run,
    key_inputs=key_inputs,
)
