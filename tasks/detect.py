"""detect: Faster R-CNN on the fused backbone with a hash head, its baselines, COCO/FROC metrics and latency.

Every model trains on the identical split and budget (epochs, batch, optimiser, augmentation, training
windows, seed); each checkpoints per epoch into the stage's scratch folder, so a rerun after a kill
continues. By default (``detect.train_crop``, ``detect.train_backbone``) training sees 256-px windows, most of
them placed on a lesion, and ours keeps the fused extractor the train stage produced frozen; evaluation and
serving always see whole breast crops. The sealed folder
holds ``detection.json`` (the Table 8 contract), ``table8_detection.csv``, ``history.json``, the lesion-size
figure and a few example figures (named by position, never by image id: CBIS ids carry patient ids), plus
the final detector (``detector.pt`` + ``detector_config.json``), logged as an MLflow model and registered
as ``mammo-detector``.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammo_core import checkpoint
from mammo_core.config import Params
from mammo_core.detection import builders, data, engine, evaluate, latency, plots
from mammo_core.store import write_json_atomic
from mammo_core.weight_sources import resolved_source
from tasks import detector_serving, runtime
from tasks.train import load_trained

DETECTION_FILE = "detection.json"
TABLE_FILE = "table8_detection.csv"
WEIGHTS_FILE = "detector.pt"
CONFIG_FILE = "detector_config.json"
FAST_RCNN_ABSENT = ("not run: Fast R-CNN needs external region proposals (selective search), which no "
                    "library in this project provides; Faster R-CNN's RPN replaces them")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lesion_sizes(items: list[data.DetectionImage]) -> tuple[np.ndarray, dict]:
    sizes = np.asarray([math.sqrt(float((b[2] - b[0]) * (b[3] - b[1]))) for it in items for b in it.boxes],
                       dtype=float)
    qs = {f"q{int(q * 100):02d}": float(np.quantile(sizes, q)) for q in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)} \
        if sizes.size else {}
    return sizes, {"count": int(sizes.size), "quantiles_px": qs, "measure": "sqrt(w*h), detector-input pixels"}


def _flatten(row: dict) -> dict:
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    flat.update({f"froc_{k}fp": v for k, v in row["froc"].items()})
    flat.update({f"ap50_{k}": v for k, v in row["per_class_ap50"].items()})
    return flat


def _run(ctx: runtime.StageContext) -> None:
    p = ctx.params.detect
    device = _device(ctx.params.run.device)
    dataset = data.load_detection_data(Path(ctx.upstream["curate"].path), p.classes, p.max_size, p.max_images)
    train, val, test = dataset.split("train"), dataset.split("val"), dataset.split("test")
    ctx.logger.info("detect: %d train / %d val / %d test images, %d train boxes, dropped %s, device %s",
                    len(train), len(val), len(test), sum(len(i.boxes) for i in train), dict(dataset.dropped), device)
    sizes, size_summary = lesion_sizes(dataset.images)
    ctx.logger.info("detect: lesion sizes (sqrt area, input px) %s; anchors %s",
                    {k: round(v, 1) for k, v in size_summary["quantiles_px"].items()}, p.anchor_sizes)
    ctx.log_artifact(plots.lesion_sizes_figure(sizes, p.anchor_sizes, ctx.workdir / "lesion_sizes.png"), "figures")
    fused, train_config = load_trained(ctx.upstream["train"].path)

    def config_for(name: str) -> builders.DetectorConfig:
        return builders.config_from_params(p, name, dataset.classes, freeze_upto=train_config["freeze_upto"])

    def val_ap50(model: torch.nn.Module) -> float:
        m = evaluate.coco_metrics(engine.predict(model, val, device), [i.target() for i in val], dataset.classes)
        return 0.0 if math.isnan(m["map50"]) else m["map50"]

    rows, history, models, predictions = [], {}, {}, {}
    for name in ("ours", *p.baselines):
        cfg = config_for(name)
        model, tag = builders.build_detector(cfg, copy.deepcopy(fused) if name != "frcnn_r50" else None,
                                             p.r50_weights, freeze_extractor=not p.train_backbone)

        def on_epoch(record: engine.EpochRecord, name: str = name) -> None:
            ctx.log_metrics({f"detect/{name}/train_loss": record.train_loss}
                            | ({f"detect/{name}/val_map50": record.val_score} if record.val_score is not None
                               else {}), step=record.epoch)
            ctx.logger.info("detect: %s epoch %d loss %.4f val AP50 %s (%.1f s)", name, record.epoch,
                            record.train_loss, record.val_score, record.seconds)

        result = engine.train_detector(
            model, train, **engine.options_from_params(p), checkpoint_path=ctx.scratch / f"{name}.pt",
            device=device, scorer=val_ap50 if val and p.epochs > 1 else None, on_epoch=on_epoch)
        preds = engine.predict(result.model, test, device)
        targets = [i.target() for i in test]
        coco = evaluate.coco_metrics(preds, targets, dataset.classes)
        rows.append({"model": name, "map50": coco["map50"], "map": coco["map"], "ar100": coco["ar100"],
                     "lesion_ap50": evaluate.lesion_ap50(preds, targets),
                     "latency_ms": float("nan"), "froc": evaluate.froc(preds, targets),
                     "per_class_ap50": coco["per_class_ap50"], "weights": tag,
                     "params_m": round(builders.parameter_millions(result.model), 3), "epochs": p.epochs,
                     "best_epoch": result.best_epoch, "resumed_from_epoch": result.resumed_from_epoch})
        history[name] = [h.to_dict() for h in result.history]
        models[name], predictions[name] = result.model, preds
        ctx.set_tags({f"detect.{name}.weights": tag})

    probe = test[0].image if test else (dataset.images[0].image if dataset.images else torch.rand(1, p.max_size,
                                                                                                     p.max_size))
    times = latency.measure_latency(models, engine.as_input(probe, device), repeats=p.latency_repeats)
    metrics: dict[str, float] = {}
    for row in rows:
        row["latency_ms"] = times[row["model"]]
        prefix = f"detect/{row['model']}"
        for key in ("map50", "map", "ar100", "lesion_ap50", "latency_ms"):
            metrics[f"{prefix}/{key}"] = row[key]
        for rate, value in row["froc"].items():
            metrics[f"{prefix}/froc_{rate.replace('.', '_')}fp"] = value
    if "frcnn_r50" in times:
        metrics["detect/ours/latency_ratio_vs_r50"] = times["ours"] / times["frcnn_r50"]
    metrics["detect/images_test"] = len(test)
    for name, value in size_summary["quantiles_px"].items():
        metrics[f"detect/lesion_size_{name}"] = value
    for reason, n in dataset.dropped.items():
        metrics[f"detect/dropped/{reason}"] = n
    ctx.log_metrics({k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))})

    write_json_atomic(ctx.workdir / DETECTION_FILE, {
        "classes": dataset.classes, "input_size": p.max_size, "rows": rows, "fast_rcnn": FAST_RCNN_ABSENT,
        "lesion_sizes": size_summary, "dropped_boxes": dict(dataset.dropped),
        "latency_input_hw": list(probe.shape[-2:]), "device": str(device),
        "split_images": {"train": len(train), "val": len(val), "test": len(test)},
        "training": {"epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr, "train_crop": p.train_crop,
                     "positive_fraction": p.positive_fraction, "train_backbone": p.train_backbone,
                     "roi_samples": p.roi_samples, "proposals_train": p.proposals_train},
    })
    flat = [_flatten(r) for r in rows]
    fields = list(dict.fromkeys(k for f in flat for k in f))
    with open(ctx.workdir / TABLE_FILE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)
    write_json_atomic(ctx.workdir / "history.json", history)
    for k, item in enumerate(test[: p.examples]):
        fig = plots.example_figure(item.image, item.target(), predictions["ours"][k], dataset.classes,
                                   ctx.workdir / f"examples_{k + 1}.png")
        ctx.log_artifact(fig, "figures")
    for name in (DETECTION_FILE, TABLE_FILE):
        ctx.log_artifact(ctx.workdir / name)

    checkpoint.save_atomic(models["ours"].state_dict(), ctx.workdir / WEIGHTS_FILE)
    write_json_atomic(ctx.workdir / CONFIG_FILE, config_for("ours").to_dict())
    detector_serving.log_and_register(ctx)


def key_inputs(params: Params) -> dict[str, Any]:
    """The ResNet-50 baseline's starting weights as found on disk (it falls back to random init)."""
    p = params.detect
    if "frcnn_r50" not in p.baselines:
        return {}
    return {"r50_weights": resolved_source(builders.r50_weights_file(p.r50_weights))}


SPEC = runtime.StageSpec(
    name="detect",
    upstream=("curate", "train"),
    sections=("detect",),
    run=_run,
    key_inputs=key_inputs,
)
