"""detect: Faster R-CNN on the fused backbone with a hash head, its baselines, COCO/FROC metrics and latency.

Every model trains on the identical split and budget (epochs, batch, optimiser, augmentation, training
windows, seed); each checkpoints per epoch into the stage's scratch folder, so a rerun after a kill
continues. By default (``detect.train_crop``, ``detect.train_backbone``) training sees windows on a 32-px
grid, most of them placed on a lesion, and ours keeps the fused extractor the train stage produced frozen;
evaluation and serving always see whole breast crops. With the extractor frozen (``detect.cache_extractor``)
it runs once per image and both fused detectors read its cached maps for training, validation and test
(:mod:`mammo_core.detection.feature_cache`); the best epoch is picked on ``detect.val_images`` fixed
validation images. The sealed folder holds ``detection.json`` (the Table 8 contract, with 95% bootstrap
CIs over test images, each detector's initialisation and parameter counts, the training sizes and a
seconds profile), ``table8_detection.csv``, ``history.json`` (per epoch: train and validation seconds),
the per-image detections of every detector on the validation and the test images with their ground truth
(``{val,test}_{detections,truth,images}.parquet``, :mod:`mammo_core.detection.records`: the test CIs, the
paired bootstrap of ours - each baseline over test patients (``paired_test`` in ``detection.json``),
``mammo promote`` (validation) and ``mammo compare`` (test) are computed from them), the lesion-size
figure and a few example figures (named by
position, never by image id: CBIS ids carry patient ids), plus the final detector (``detector.pt`` +
``detector_config.json``), logged as an MLflow model and registered as ``mammo-detector``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammo_core.config import Params
from mammo_core.sources import weight_sources
from mammo_core.storage import stage_files
from mammo_core.storage.store import file_sha256, write_json_atomic
from tasks import runtime
from tasks.stages.train import load_trained

if TYPE_CHECKING:
    import torch

    from mammo_core.detection import builders, data, feature_cache

FILES = stage_files.DETECT  # this stage's output files

DETECTION_FILE = FILES.summary
TABLE_FILE = FILES.table
WEIGHTS_FILE = FILES.weights
CONFIG_FILE = FILES.config
DETECTIONS_FILE = FILES.detections
TRUTH_FILE = FILES.truth
TEST_IMAGES_FILE = FILES.test_images
FAST_RCNN_ABSENT = ("not run: Fast R-CNN needs external region proposals (selective search), which no "
                    "library in this project provides; Faster R-CNN's RPN replaces them")


def _initialisation(name: str, p: Any, train_dir: Path) -> dict[str, Any]:
    """Where a detector's extractor starts from: the train stage's file, or the ResNet-50 file, or random."""
    if name != "frcnn_r50":
        weights = train_dir / stage_files.TRAIN.weights
        return {"source": "train stage fused DenseNet", "file": weights.name, "sha256": file_sha256(weights),
                "extractor_frozen": not p.train_backbone}
    path = weight_sources.r50_detector_file(p.r50_weights)
    if path is None or not path.is_file():
        return {"source": "random", "file": None, "sha256": None, "asked_for": p.r50_weights}
    return {"source": p.r50_weights if p.r50_weights in ("coco", "imagenet") else "file", "file": path.name,
            "sha256": file_sha256(path)}


@dataclass
class _Splits:
    """The detection images of one run: the dataset, its splits and the validation images scored per epoch."""

    dataset: data.DetectionData
    train: list[data.DetectionImage]
    val: list[data.DetectionImage]
    test: list[data.DetectionImage]
    val_scored: list[data.DetectionImage]


@dataclass
class _Trained:
    """Every detector trained: Table 8 rows (before intervals), histories, models, val/test predictions."""

    rows: list = field(default_factory=list)
    history: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    profile: dict = field(default_factory=lambda: {"feature_cache_s": 0.0, "models": {}})


def _run(ctx: runtime.StageContext) -> None:
    from mammo_core.detection import builders, results
    from mammo_core.training import devices

    p = ctx.params.detect
    device = devices.choose_device(ctx.params.run.device, runtime.dask_worker_name())
    splits, size_summary = _load_splits(ctx, device)
    train_dir = Path(ctx.upstream["train"].path)
    fused, train_config = load_trained(train_dir)
    names = ["ours", *p.baselines]

    def config_for(name: str) -> builders.DetectorConfig:
        return builders.config_from_params(p, name, splits.dataset.classes, freeze_upto=train_config["freeze_upto"])

    trained = _train_detectors(ctx, splits, names, fused, config_for, train_dir, device)
    # the per-image val and test detections are the artifact; Table 8's intervals and the paired differences
    # are computed from what was written
    record_files, paired_test = _score_saved(ctx, splits, trained, names)
    times, probe = _time_latency(ctx, splits, trained, device)
    ctx.log_metrics(results.metric_values(trained.rows, times, paired_test, len(splits.test), size_summary,
                                          splits.dataset.dropped))
    write_json_atomic(ctx.workdir / DETECTION_FILE, _summary(p, splits, trained, size_summary, paired_test, times,
                                                             probe, device, record_files))
    _write_outputs(ctx, splits, trained, record_files, config_for("ours"))


def _caches_extractor(p: Any) -> bool:
    """Whether ours and ours without hash read one cached extractor pass (only with the extractor frozen)."""
    return p.cache_extractor and not p.train_backbone


def _load_splits(ctx: runtime.StageContext, device: torch.device) -> tuple[_Splits, dict[str, Any]]:
    """The curated images as detection data, logged with their lesion sizes (figure) against the anchors."""
    from mammo_core.detection import data, plots, results

    p = ctx.params.detect
    dataset = data.load_detection_data(Path(ctx.upstream["curate"].path), p.classes, p.max_size, p.max_images)
    train, val, test = dataset.split("train"), dataset.split("val"), dataset.split("test")
    val_scored = val[: p.val_images] if p.val_images else val
    ctx.logger.info("detect: %d train / %d val (%d scored per epoch) / %d test images, %d train boxes, dropped %s, "
                    "device %s", len(train), len(val), len(val_scored), len(test),
                    sum(len(i.boxes) for i in train), dict(dataset.dropped), device)
    sizes, size_summary = results.lesion_sizes(dataset.images)
    ctx.logger.info("detect: lesion sizes (sqrt area, input px) %s; anchors %s",
                    {k: round(v, 1) for k, v in size_summary["quantiles_px"].items()}, p.anchor_sizes)
    ctx.log_artifact(plots.lesion_sizes_figure(sizes, p.anchor_sizes, ctx.workdir / "lesion_sizes.png"), "figures")
    return _Splits(dataset, train, val, test, val_scored), size_summary


def _train_detectors(ctx: runtime.StageContext, splits: _Splits, names: list[str], fused: torch.nn.Module,
                     config_for: Callable[[str], builders.DetectorConfig], train_dir: Path, device: torch.device
                     ) -> _Trained:
    """Each detector on the same split and budget; ours and ours without hash read one cached extractor pass."""
    from mammo_core.detection import builders, engine, evaluate, feature_cache, results

    p = ctx.params.detect
    use_cache = _caches_extractor(p)
    fused_left = sum(1 for n in names if n != "frcnn_r50") if use_cache else 0
    cache: feature_cache.FeatureCache | None = None
    out = _Trained()
    for name in names:
        model, tag = builders.build_detector(config_for(name), copy.deepcopy(fused) if name != "frcnn_r50" else None,
                                             p.r50_weights, freeze_extractor=not p.train_backbone)
        features = None
        if use_cache and name != "frcnn_r50":
            started = time.perf_counter()
            cache = cache or feature_cache.FeatureCache(model)
            cache.add(model, [*splits.train, *splits.val_scored], device)  # once: ours_nohash finds them there
            out.profile["feature_cache_s"] += time.perf_counter() - started
            features = cache

        def val_ap50(model: torch.nn.Module, features: feature_cache.FeatureCache | None = features) -> float:
            m = evaluate.coco_metrics(engine.predict(model, splits.val_scored, device, features),
                                      [i.target() for i in splits.val_scored], splits.dataset.classes)
            return 0.0 if math.isnan(m["map50"]) else m["map50"]

        def on_epoch(record: engine.EpochRecord, name: str = name) -> None:
            ctx.log_metrics({f"detect/{name}/train_loss": record.train_loss}
                            | ({f"detect/{name}/val_map50": record.val_score} if record.val_score is not None
                               else {}), step=record.epoch)
            ctx.logger.info("detect: %s epoch %d loss %.4f val AP50 %s (%.1f s: train %.1f, val %.1f)", name,
                            record.epoch, record.train_loss, record.val_score, record.seconds,
                            record.train_seconds, record.eval_seconds)

        result = engine.train_detector(
            model, splits.train, **engine.options_from_params(p), checkpoint_path=ctx.scratch / f"{name}.pt",
            device=device, features=features, scorer=val_ap50 if splits.val_scored and p.epochs > 1 else None,
            on_epoch=on_epoch)
        started = time.perf_counter()
        preds = engine.predict(result.model, splits.test, device, features)
        test_seconds = time.perf_counter() - started
        started = time.perf_counter()
        out.val[name] = engine.predict(result.model, splits.val, device, features)  # for mammo promote
        val_seconds = time.perf_counter() - started
        if features is not None:
            fused_left -= 1
            if fused_left == 0:
                cache = None  # the ResNet-50 trains on pixels: free the maps first
        out.rows.append(results.result_row(
            name, preds, [i.target() for i in splits.test], splits.dataset.classes, result.model, tag,
            _initialisation(name, p, train_dir), epochs=p.epochs, best_epoch=result.best_epoch,
            resumed_from_epoch=result.resumed_from_epoch,
            extractor="cached maps (run once per image)" if features is not None else "run per window"))
        out.history[name] = [h.to_dict() for h in result.history]
        out.profile["models"][name] = {
            "train_s": round(sum(h.train_seconds or 0.0 for h in result.history), 2),
            "val_s": round(sum(h.eval_seconds or 0.0 for h in result.history), 2),
            "test_predict_s": round(test_seconds, 2), "val_predict_s": round(val_seconds, 2),
            "epochs_run": len(result.history) - (result.resumed_from_epoch or 0)}
        out.models[name], out.test[name] = result.model, preds
        ctx.set_tags({f"detect.{name}.weights": tag})
    out.profile["feature_cache_s"] = round(out.profile["feature_cache_s"], 2)
    return out


def _score_saved(ctx: runtime.StageContext, splits: _Splits, trained: _Trained, names: list[str]
                 ) -> tuple[list[Path], dict[str, Any]]:
    """Write the val and test detections, then Table 8's intervals and the paired differences read back."""
    from mammo_core.detection import bootstrap, records, results

    p = ctx.params.detect
    record_files = [*records.write_split(ctx.workdir, "val", trained.val, splits.val),
                    *records.write_split(ctx.workdir, "test", trained.test, splits.test)]
    saved_test = records.read_split(ctx.workdir, "test", names)
    saved, saved_targets, groups = saved_test.predictions, saved_test.targets, saved_test.groups
    n_classes = len(splits.dataset.classes)
    for row in trained.rows:
        intervals = bootstrap.detection_intervals(saved[row["model"]], saved_targets, n_classes, groups,
                                                  n_boot=p.n_boot, seed=p.seed)
        row["ci95"] = {k: v.to_dict() for k, v in intervals.items()}
    paired_test = results.paired_against_ours(saved, saved_targets, n_classes, groups, names, n_boot=p.n_boot,
                                              seed=p.seed)
    return record_files, paired_test


def _time_latency(ctx: runtime.StageContext, splits: _Splits, trained: _Trained, device: torch.device
                  ) -> tuple[dict[str, float], torch.Tensor]:
    """Every detector timed at batch 1 side by side as its inference copy (BatchNorm folded etc.: same outputs);
    on a GPU with its backbone replayed from a CUDA graph, every detector alike (launch-bound at batch 1)."""
    import torch

    from mammo_core.detection import engine, latency
    from mammo_core.detection.concurrent_branches import branch_workers
    from mammo_core.detection.cuda_graphs import graph_backbone
    from mammo_core.detection.inference import inference_copy

    p = ctx.params.detect
    started = time.perf_counter()
    images = splits.test or splits.dataset.images
    probe = images[0].image if images else torch.rand(1, p.max_size, p.max_size)
    copies = {name: inference_copy(m) for name, m in trained.models.items()}
    if device.type == "cuda":
        for copy in copies.values():
            graph_backbone(copy)
    image = engine.as_input(probe, device)
    times = latency.measure_latency(copies, image, repeats=p.latency_repeats)
    # on the CPU, also on one thread: a ratio that no OpenMP wait setting moves (mammo_core.detection.latency)
    one_thread = (latency.measure_latency_on_threads(copies, image, 1, repeats=p.latency_repeats)
                  if device.type == "cpu" else {})
    trained.profile["latency_s"] = round(time.perf_counter() - started, 2)
    for row in trained.rows:
        row["latency_ms"] = times[row["model"]]
        row["latency_branch_workers"] = branch_workers(copies[row["model"]], device)  # at the stage's thread count
        if one_thread:
            row["latency_ms_1_thread"] = one_thread[row["model"]]
    return times, probe


def _one_thread_ratio(rows: list[dict[str, Any]]) -> float | None:
    """ours / frcnn_r50 on one thread, when both were timed so (CPU runs with the baseline)."""
    by_model = {row["model"]: row.get("latency_ms_1_thread") for row in rows}
    ours, r50 = by_model.get("ours"), by_model.get("frcnn_r50")
    return ours / r50 if ours and r50 else None


def _summary(p: Any, splits: _Splits, trained: _Trained, size_summary: dict[str, Any], paired_test: dict[str, Any],
             times: dict[str, float], probe: torch.Tensor, device: torch.device, record_files: list[Path]
             ) -> dict[str, Any]:
    """``detection.json``: the rows and everything a reader needs to know what they were measured on."""
    import torch

    from mammo_core.detection import feature_cache
    from mammo_core.runtime import openmp_wait

    return {
        "classes": splits.dataset.classes, "input_size": p.max_size, "rows": trained.rows,
        "fast_rcnn": FAST_RCNN_ABSENT, "lesion_sizes": size_summary, "dropped_boxes": dict(splits.dataset.dropped),
        "latency_input_hw": list(probe.shape[-2:]), "device": str(device),
        "latency_models": "inference copies (mammo_core.detection.inference), batch 1"
                          + (", backbone replayed from a CUDA graph" if device.type == "cuda" else ""),
        # both move the CPU figures by 1.5x and more (mammo_core.runtime.openmp_wait): a reader must see them
        "latency_threads": torch.get_num_threads(), "latency_omp_wait": openmp_wait.settings(),
        "split_images": {"train": len(splits.train), "val": len(splits.val),
                         "val_scored_per_epoch": len(splits.val_scored), "test": len(splits.test)},
        "training": {"epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr, "train_crop": p.train_crop,
                     "window_grid": feature_cache.WINDOW_GRID, "positive_fraction": p.positive_fraction,
                     "train_backbone": p.train_backbone,
                     "cache_extractor": _caches_extractor(p), "augment": p.augment,
                     "roi_samples": p.roi_samples, "proposals_train": p.proposals_train,
                     "proposals_test": p.proposals_test, "max_size": p.max_size, "max_images": p.max_images,
                     "val_images": p.val_images, "seed": p.seed},  # the seed moves AP50 at small budgets
        "bootstrap": {"n_boot": p.n_boot, "confidence": 0.95, "unit": "test images, a patient's images drawn "
                      "together", "source": [DETECTIONS_FILE, TRUTH_FILE, TEST_IMAGES_FILE]},
        "paired_test": paired_test,  # B - A = ours - baseline, both scored on the same patient resamples
        "latency_ratio_vs_r50": (times["ours"] / times["frcnn_r50"] if "frcnn_r50" in times else None),
        "latency_ratio_vs_r50_1_thread": _one_thread_ratio(trained.rows),
        "record_files": [f.name for f in record_files],
        "profile_seconds": trained.profile,
    }


def _write_outputs(ctx: runtime.StageContext, splits: _Splits, trained: _Trained, record_files: list[Path],
                   ours_config: builders.DetectorConfig) -> None:
    """Table 8, histories, example figures, our detector's weights and config; log them and register ours."""
    from mammo_core.detection import plots, results
    from mammo_core.training import checkpoint
    from tasks.serving import detector as detector_serving

    p = ctx.params.detect
    results.write_table(trained.rows, ctx.workdir / TABLE_FILE)
    write_json_atomic(ctx.workdir / FILES.history, trained.history)
    for k, item in enumerate(splits.test[: p.examples]):
        fig = plots.example_figure(item.image, item.target(), trained.test["ours"][k], splits.dataset.classes,
                                   ctx.workdir / f"examples_{k + 1}.png")
        ctx.log_artifact(fig, "figures")
    for name in (DETECTION_FILE, TABLE_FILE, *(f.name for f in record_files)):
        ctx.log_artifact(ctx.workdir / name)
    checkpoint.save_atomic(trained.models["ours"].state_dict(), ctx.workdir / WEIGHTS_FILE)
    write_json_atomic(ctx.workdir / CONFIG_FILE, ours_config.to_dict())
    detector_serving.log_and_register(ctx)


def key_inputs(params: Params) -> dict[str, Any]:
    """The ResNet-50 baseline's starting weights as found on disk (it falls back to random init)."""
    p = params.detect
    if "frcnn_r50" not in p.baselines:
        return {}
    return {"r50_weights": weight_sources.resolved_source(weight_sources.r50_detector_file(p.r50_weights))}


SPEC = runtime.StageSpec(
    name="detect",
    upstream=("curate", "train"),
    sections=("detect",),
    run=_run,
    key_inputs=key_inputs,
)
