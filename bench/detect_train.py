"""Detector training on a chosen device: AP50 reached, seconds per epoch and latency, one JSON line.

Why a bench and not the stage: the detect stage's CPU budget (``params/default.yaml``) is far below what
Faster R-CNN needs, so its AP50 says little about whether the method works. This script trains the same
detectors with the same code (``mammo_core.detection``) on a finished store's curate and train outputs,
with the epochs and device you choose, so the CPU figure and a GPU figure can be put side by side.

Data comes either from a store (``--store``: the newest finished curate and train stages in it) or from a
bundle written by ``--make-bundle`` (uint8 detector inputs, boxes, labels, splits and the fused weights in
half precision: small enough to carry to another machine; it holds no image ids).

Usage:
  python bench/detect_train.py --store STORE [--params params/default.yaml] [--epochs N] [--device auto]
  python bench/detect_train.py --store STORE --make-bundle bundle.pt
  python bench/detect_train.py --bundle bundle.pt --epochs 24 --device cuda [--set detect.train_backbone=true]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.config import load_params  # noqa: E402
from mammo_core.detection import builders, data, engine, evaluate, feature_cache  # noqa: E402
from mammo_core.detection.latency import measure_latency  # noqa: E402
from mammo_core.models.fused import FusedDenseNet  # noqa: E402


def _newest_stage(store: Path, name: str) -> Path:
    folders = [p for p in (store / "stages" / name).glob("*/") if (p / "manifest.json").is_file()]
    if not folders:
        raise SystemExit(f"{store}: no finished {name} stage (run `mammo run --until train` first)")
    return max(folders, key=lambda p: p.stat().st_mtime)


def from_store(store: Path, detect: object, max_images: int | None) -> dict:
    from tasks.stages.train import load_trained

    dataset = data.load_detection_data(_newest_stage(store, "curate"), detect.classes, detect.max_size, max_images)
    fused, config = load_trained(_newest_stage(store, "train"))
    return {"classes": dataset.classes, "items": dataset.images, "fused": fused,
            "freeze_upto": dict(config["freeze_upto"]), "num_classes": int(config["num_classes"])}


def _png(image: torch.Tensor) -> torch.Tensor:
    """(1, H, W) in [0, 1] -> the bytes of an 8-bit PNG, as a uint8 tensor (mammograms compress well)."""
    buffer = io.BytesIO()
    Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy()).save(buffer, format="PNG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _unpng(encoded: torch.Tensor) -> torch.Tensor:
    with Image.open(io.BytesIO(encoded.numpy().tobytes())) as im:
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]


def write_bundle(loaded: dict, path: Path, input_size: int) -> None:
    items = loaded["items"]
    torch.save({
        "input_size": input_size,
        "classes": loaded["classes"], "freeze_upto": loaded["freeze_upto"], "num_classes": loaded["num_classes"],
        "fused": {k: (v.half() if v.is_floating_point() else v) for k, v in loaded["fused"].state_dict().items()},
        "images": [_png(i.image) for i in items],
        "boxes": [i.boxes for i in items], "labels": [i.labels for i in items], "splits": [i.split for i in items],
    }, path)


def from_bundle(path: Path) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    fused = FusedDenseNet(saved["num_classes"], saved["freeze_upto"])
    fused.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in saved["fused"].items()})
    items = [data.DetectionImage(k, split, _unpng(image), boxes, labels, (0, 0), 1.0, 1.0)
             for k, (image, boxes, labels, split) in enumerate(zip(saved["images"], saved["boxes"], saved["labels"],
                                                                  saved["splits"], strict=True))]
    return {"input_size": saved["input_size"], "classes": saved["classes"], "items": items, "fused": fused.eval(),
            "freeze_upto": saved["freeze_upto"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", type=Path)
    source.add_argument("--bundle", type=Path)
    parser.add_argument("--make-bundle", type=Path, help="write a bundle from --store and stop")
    parser.add_argument("--params", type=Path, default=Path("params/default.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params override, as `mammo run --set` (e.g. detect.train_backbone=true)")
    parser.add_argument("--epochs", type=int, help="override detect.epochs")
    parser.add_argument("--max-images", type=int, help="override detect.max_images (training split)")
    parser.add_argument("--models", default="ours,ours_nohash,frcnn_r50")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = load_params(args.params, args.overrides).detect
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.make_bundle:
        loaded = from_store(args.store, p, None)
        write_bundle(loaded, args.make_bundle, p.max_size)
        print(json.dumps({"bundle": str(args.make_bundle), "images": len(loaded["items"]),
                          "bytes": args.make_bundle.stat().st_size}))
        return
    loaded = from_store(args.store, p, p.max_images) if args.store else from_bundle(args.bundle)
    if loaded.get("input_size", p.max_size) != p.max_size:
        raise SystemExit(f"{args.bundle}: images at {loaded['input_size']} px, params say detect.max_size "
                         f"{p.max_size}")
    epochs = args.epochs or p.epochs
    split = {name: [i for i in loaded["items"] if i.split == name] for name in ("train", "val", "test")}
    if args.max_images:
        split["train"] = split["train"][: args.max_images]
    test_targets = [i.target() for i in split["test"]]
    rows, models = {}, {}
    cache = None
    for name in args.models.split(","):
        config = builders.config_from_params(p, name, loaded["classes"], freeze_upto=loaded["freeze_upto"])
        model, tag = builders.build_detector(config, copy.deepcopy(loaded["fused"]) if name != "frcnn_r50" else None,
                                             p.r50_weights, freeze_extractor=not p.train_backbone)
        started = time.perf_counter()
        features = None
        if p.cache_extractor and not p.train_backbone and name != "frcnn_r50":  # as the detect stage does
            cache = cache or feature_cache.FeatureCache(model)
            cache.add(model, split["train"], device)
            features = cache
        with tempfile.TemporaryDirectory() as scratch:  # the stage's checkpoint path is exercised too
            result = engine.train_detector(
                model, split["train"], **(engine.options_from_params(p) | {"epochs": epochs}), device=device,
                checkpoint_path=Path(scratch) / f"{name}.pt", features=features,
                on_epoch=lambda r, name=name: print(f"{name} epoch {r.epoch} loss {r.train_loss:.4f} "
                                                    f"{r.seconds:.1f} s", file=sys.stderr, flush=True))
        seconds = time.perf_counter() - started
        preds = engine.predict(result.model, split["test"], device, features)
        coco = evaluate.coco_metrics(preds, test_targets, loaded["classes"])
        rows[name] = {"map50": coco["map50"], "map": coco["map"],
                      "lesion_ap50": evaluate.lesion_ap50(preds, test_targets),
                      "froc": evaluate.froc(preds, test_targets), "train_s": round(seconds, 1),
                      "s_per_epoch": round(seconds / epochs, 2),
                      "final_loss": round(result.history[-1].train_loss, 4), "weights": tag}
        models[name] = result.model
    probe = engine.as_input(split["test"][0].image, device)
    for name, ms in measure_latency(models, probe, repeats=10).items():
        rows[name]["latency_ms"] = round(ms, 2)
    print(json.dumps({
        "bench": "detect_train", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "epochs": epochs,
        "input_size": p.max_size, "train_crop": p.train_crop, "train_images": len(split["train"]),
        "test_images": len(split["test"]), "rows": rows,
    }))


if __name__ == "__main__":
    main()
