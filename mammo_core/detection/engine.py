"""Detector training with per-epoch atomic checkpoints and resume (the train stage's contract).

A checkpoint (``mammo_core.training.checkpoint``) holds the model, optimizer, scheduler, every RNG state (the
shuffling/augmentation generator included), the per-epoch history and the best-so-far weights, so a rerun
after a kill continues from the last finished epoch and ends with the same weights as an uninterrupted
run on CPU. "Best" is the highest validation score when a scorer is given (AP50), else the last epoch.

Schedule: SGD with momentum, a linear warm-up over the first epoch's iterations, and the learning rate
divided by 10 after 70% of the epochs (torchvision's detection recipe, shortened).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mammo_core.detection.data import DetectionImage, augment, random_window
from mammo_core.detection.feature_cache import WINDOW_GRID, FeatureCache, forward_with_maps
from mammo_core.runtime import faults, stop_request
from mammo_core.training import checkpoint

if TYPE_CHECKING:
    from mammo_core.config import DetectParams


@dataclass
class EpochRecord:
    """One epoch: loss, validation score, and where its seconds went (training steps vs validation)."""

    epoch: int
    train_loss: float
    val_score: float | None
    seconds: float
    train_seconds: float | None = None
    eval_seconds: float | None = None

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "val_score": self.val_score,
                "seconds": self.seconds, "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds}


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    resumed_from_epoch: int = 0


def as_input(image: Tensor, device: torch.device | str) -> Tensor:
    """(1, H, W) grey in [0, 1] -> (3, H, W) on ``device`` (the detectors' transform normalises)."""
    return image.to(device).expand(3, -1, -1)


def _lr_lambda(warmup_iters: int, milestone_iter: int) -> Callable[[int], float]:
    def factor(it: int) -> float:
        warm = min(1.0, (it + 1) / max(warmup_iters, 1))
        return warm * (0.1 if it >= milestone_iter else 1.0)
    return factor


def options_from_params(params: DetectParams) -> dict[str, Any]:
    """The keyword arguments of :func:`train_detector` that the ``detect`` params section sets."""
    return {"epochs": params.epochs, "lr": params.lr, "momentum": params.momentum,
            "weight_decay": params.weight_decay, "batch_size": params.batch_size, "seed": params.seed,
            "max_rotation": params.max_rotation, "crop_size": params.train_crop,
            "positive_fraction": params.positive_fraction, "augment_train": params.augment,
            "window_grid": WINDOW_GRID}


def train_detector(
    model: nn.Module,
    items: Sequence[DetectionImage],
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 2,
    seed: int = 0,
    checkpoint_path: Path | None = None,
    device: torch.device | str = "cpu",
    augment_train: bool = True,
    max_rotation: float = 10.0,
    crop_size: int | None = None,
    positive_fraction: float = 0.75,
    window_grid: int = 1,
    features: FeatureCache | None = None,
    scorer: Callable[[nn.Module], float] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``model`` in place; ``stop_after`` ends after that many epochs of this call (tests of resume).

    ``crop_size``: train on windows of that side (see :func:`random_crop`) instead of whole images; an
    epoch is still one window per training image. Only parameters with ``requires_grad`` are optimised.
    ``window_grid``: window corners on multiples of it (the same windows for every detector given the same
    seed). ``features``: the fused extractor's cached maps (:mod:`~mammo_core.detection.feature_cache`);
    the model then reads its windows from them instead of running its frozen extractor, and pixel
    augmentation is refused (it would need the extractor again).
    """
    if not items:
        raise ValueError("no training images for the detector")
    if features is not None:
        if augment_train:
            raise ValueError("cached extractor maps cannot be flipped or rotated like pixels: train with "
                             "augment_train False (detect.augment: false) or without the cache")
        if crop_size and window_grid % WINDOW_GRID:
            raise ValueError(f"cached maps need windows on the {WINDOW_GRID}-pixel grid, got grid {window_grid}")
        features.check(model)
        missing = [item.index for item in items if item.index not in features]
        if missing:
            raise ValueError(f"feature cache lacks {len(missing)} training image(s), e.g. index {missing[0]}")
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per step over all parameters instead of several passes over each (the ResNet-50's
    # 41M parameters: 32 vs 102 ms of CPU per step); the same update rule for every detector
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
    iters = math.ceil(len(items) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(iters, iters * max(1, int(0.7 * epochs))))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    history: list[EpochRecord] = []
    best_state: dict[str, Tensor] | None = None
    best_score, best_epoch, start = -math.inf, 0, 0
    if checkpoint_path is not None and checkpoint_path.is_file():
        saved = checkpoint.load_safely(checkpoint_path)
        checkpoint.check_same_architecture(checkpoint_path, saved["model"], model.state_dict())
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoint.restore_rng(saved["rng"], generator)
        history = [EpochRecord(**h) for h in saved["history"]]
        best_state, best_score, best_epoch = saved["best_state"], float(saved["best_score"]), int(saved["best_epoch"])
        start = int(saved["epoch"])
    resumed = start
    for epoch in range(start + 1, epochs + 1):
        if stop_after is not None and epoch - resumed > stop_after:
            break
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(items), generator=generator).tolist()
        total, count = 0.0, 0
        for b in range(0, len(order), batch_size):
            stop_request.check(f"detector training epoch {epoch}")  # between batches: last checkpoint stays valid
            faults.at("detect:batch")
            batch = [items[i] for i in order[b:b + batch_size]]
            images, targets, maps = [], [], []
            for item in batch:
                image, boxes, labels, (top, left) = item.image, item.boxes, item.labels, (0, 0)
                if crop_size:
                    image, boxes, labels, (top, left) = random_window(image, boxes, labels, crop_size, generator,
                                                                      positive_fraction, grid=window_grid)
                if augment_train:
                    image, boxes, labels = augment(image, boxes, labels, generator, max_rotation)
                images.append(as_input(image, device))
                targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
                if features is not None:
                    maps.append(features.window(item.index, top, left, *image.shape[-2:]))
            losses = model(images, targets) if features is None else forward_with_maps(model, images, targets, maps)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"detector loss is {loss.item()} at epoch {epoch}, batch {b // batch_size}: "
                                         f"lower detect.lr ({lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        trained = time.perf_counter()
        score = scorer(model) if scorer is not None else None
        finished = time.perf_counter()
        record = EpochRecord(epoch, total / max(count, 1), score, finished - started, trained - started,
                             finished - trained)
        history.append(record)
        current = score if score is not None else float(epoch)
        if current > best_score or best_state is None:
            best_score, best_epoch = current, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if checkpoint_path is not None:
            checkpoint.save_atomic({
                "format": checkpoint.FORMAT_VERSION, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": checkpoint.capture_rng(generator), "history": [h.to_dict() for h in history],
                "best_state": best_state, "best_score": best_score, "best_epoch": best_epoch,
            }, checkpoint_path)
        if on_epoch is not None:
            on_epoch(record)
    if best_state is not None and (stop_after is None or len(history) >= epochs):
        model.load_state_dict(copy.deepcopy(best_state))
    model.eval()
    return TrainResult(model, history, best_epoch, resumed)


@torch.inference_mode()
def predict(model: nn.Module, items: Sequence[DetectionImage], device: torch.device | str = "cpu",
            features: FeatureCache | None = None) -> list[dict[str, Tensor]]:
    """Boxes, scores and labels per image (CPU tensors), in input pixels.

    ``features``: the fused extractor's cached whole-image maps (missing images are computed and kept).
    """
    model.eval().to(device)
    if features is not None:
        features.add(model, items, device)
    out = []
    for item in items:
        image = as_input(item.image, device)
        result = (model([image]) if features is None
                  else forward_with_maps(model, [image], None, [features.full(item.index)]))[0]
        out.append({k: v.detach().cpu() for k, v in result.items()})
    return out
